"""The `normlab` command: parses arguments (`normlab.cli_parser`), calls the library, prints. User errors print
one line, `normlab: error: ...`, and exit with code 2; warnings print one line each, `normlab: warning: ...`.

The library (torch with it) is imported only by the handler that needs it, so that `normlab --help` and
`normlab --version` answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from normlab.cli_parser import DEFAULT_PRESET, UsageError, build_parser, command_of
from normlab.errors import ConfigError, NormlabError

if TYPE_CHECKING:
    from normlab.config import RunConfig

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _config(preset: str, args: argparse.Namespace) -> RunConfig:
    """The preset's config with `--set`, `--data` and `--split-seed` applied; every setting must take effect."""
    from normlab.config import config_for_preset
    from normlab.runs.preflight import canonical_key, check_settings_take_effect

    config = config_for_preset(preset, args.set or [])
    keys = [canonical_key(item) for item in args.set or []]
    for flag, value, key in (("--data", args.data, "data.path"), ("--split-seed", args.split_seed, "data.split_seed")):
        if value is not None and key in keys:
            raise ConfigError(f"{flag} and --set {key} both set it: give one")
    if args.data is not None:
        config.data.path = args.data
    if args.split_seed is not None:
        config.data.split_seed = args.split_seed
    check_settings_take_effect(config, keys)
    return config


def _notice(line: str) -> None:
    print(f"normlab: {line}", file=sys.stderr, flush=True)


def _resume_steps(items: list[str]) -> int | None:
    """The new number of steps of `train --resume --set steps=N`; any other --set is refused."""
    from normlab.config import RunConfig, apply_override
    from normlab.runs.preflight import canonical_key

    steps = None
    for item in items:
        scratch = RunConfig()
        apply_override(scratch, item)
        if canonical_key(item) != "train.steps":
            raise ConfigError(f"--resume continues a run with its saved config: only --set steps=N (to train it "
                              f"further) may change, not {item.split('=')[0]}")
        steps = scratch.train.steps
    return steps


def _train_config(args: argparse.Namespace) -> RunConfig:
    """The configuration of a new run: the preset with the command line's settings and --device."""
    config = _config(args.preset or DEFAULT_PRESET, args)
    if args.device:
        if any(item.split("=")[0].strip() in ("device", "train.device") for item in args.set or []):
            raise ConfigError("--device and --set device both set it: give one")
        config.train.device = args.device
    return config


def _train(args: argparse.Namespace) -> int:
    from normlab.runs import launch, ranks

    if args.nproc is not None and not ranks.launched():  # this process launches; the workers train
        return launch.launch_training(args.argv, args.nproc, args.out, None if args.resume else _train_config(args))
    with ranks.as_rank(args.nproc):  # one rank of `--nproc`/torchrun workers (only rank 0 prints), or alone
        return _train_here(args)


def _train_here(args: argparse.Namespace) -> int:
    from normlab.runs import commands
    from normlab.training import Interrupted

    if args.every is not None and not args.diagnose:
        raise ConfigError("--every is the number of steps between diagnostic recordings: add --diagnose, or drop "
                          "--every")
    options = dict(diagnose=args.diagnose, every=args.every, calibrate=args.calibrate, progress=not args.quiet,
                   threads=args.threads, notice=_notice, tensorboard=args.tensorboard)
    try:
        if args.resume:
            if args.preset or args.data or args.split_seed is not None or args.device:
                raise ConfigError("--resume continues a run with its saved config: drop --preset, --data, "
                                  "--split-seed and --device")
            outcome = commands.resume_training(args.out, steps=_resume_steps(args.set or []), **options)
        else:
            outcome = commands.start_training(_train_config(args), args.out, **options)
    except Interrupted as stop:
        print(f"interrupted: checkpoint saved at step {stop.step} in {args.out}; continue with "
              f"`normlab train --resume --out {args.out}`", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.calibration:
        _print_calibration(outcome.calibration, "")
    final = outcome.final
    print(f"final loss  train {final['train']:.4f}  val {final['val']:.4f}  test {final['test']:.4f}")
    print(f"run directory: {outcome.run.path}")
    if outcome.report:
        print(f"report: {outcome.report}")
    return 0


def _print_calibration(result: dict[str, Any], where: str) -> None:
    before = ("running statistics" if result["before"] == "running"
              else "population statistics of an earlier calibration")
    print(f"calibrated {result['layers']} BatchNorm layer(s){where}: val loss {result['val_before']:.4f} ({before}) "
          f"-> {result['val_after']:.4f} (population statistics)")


def _sweep(args: argparse.Namespace) -> int:
    from normlab.sweeps.grid import parse_variations, train_grid

    if args.every is not None and not args.diagnose:
        raise ConfigError("--every is the number of steps between diagnostic recordings: add --diagnose, or drop "
                          "--every")
    config = _config(args.preset, args)
    runs = train_grid(config, parse_variations(args.vary), args.out, diagnose=args.diagnose, every=args.every,
                      progress=not args.quiet, backend=ray_backend(args.ray))
    width = max(len(run.name) for run in runs)
    print(f"{'run':{width}}  {'train':>7}  {'val':>7}  {'test':>7}")
    for run in sorted(runs, key=lambda r: (r.diverged_at is not None, r.final["val"])):
        status = f"  diverged at step {run.diverged_at}" if run.diverged_at is not None else ""
        print(f"{run.name:{width}}  {run.final['train']:7.4f}  {run.final['val']:7.4f}  {run.final['test']:7.4f}"
              f"{status}")
    print(f"{len(runs)} run directories in {args.out}; summary.csv and summary.json there "
          f"(`normlab report {args.out}` compares them on one page)")
    return 0


def ray_backend(address: str | None) -> object | None:
    """`--ray [ADDRESS]`: a Ray backend (a local Ray instance without an address), or None without the flag."""
    if address is None:
        return None
    from normlab.sweeps.backends import RayBackend

    return RayBackend(address or None)


def _sample(args: argparse.Namespace) -> int:
    from normlab.runs.commands import sample_run

    if args.greedy:
        given = [flag for flag, value in (("-n", args.n), ("--temperature", args.temperature),
                                          ("--top-k", args.top_k), ("--seed", args.seed)) if value is not None]
        if given:
            raise ConfigError(f"--greedy takes the most likely character every time, so it gives one word whatever "
                              f"the {', '.join(given)}: drop them")
    temperature = 1.0 if args.temperature is None else args.temperature
    samples, stats = sample_run(args.run, 1 if args.greedy else 20 if args.n is None else args.n,
                                temperature=temperature, top_k=args.top_k, seed=args.seed or 0, greedy=args.greedy)
    print("\n".join(samples.words))
    print()
    print("\n".join(stats.lines()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from normlab.runs.commands import evaluate_run

    if args.data is not None and args.split is not None:
        raise ConfigError("--data evaluates on every word of that file, --split on a split of the run's words: "
                          "give one")
    loss, count = evaluate_run(args.run, args.split or "val", data=args.data)
    where = args.data if args.data else f"{args.split or 'val'} split"
    print(f"{where}: loss {loss:.4f} over {count} examples")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from normlab.runs.commands import calibrate_run

    _print_calibration(calibrate_run(args.run), " on the training split")
    return 0


def _presets(args: argparse.Namespace) -> int:
    import dataclasses

    from normlab.config import PRESETS, config_for_preset

    for name, preset in PRESETS.items():
        print(f"{name}: {preset.description}")
        if args.verbose:
            config = config_for_preset(name)
            print(json.dumps({"model": dataclasses.asdict(config.model), "train": dataclasses.asdict(config.train),
                              "data": dataclasses.asdict(config.data)}, indent=2))
    return 0


def _compile(args: argparse.Namespace) -> int:
    from normlab.config import PRESETS
    from normlab.runs.commands import compile_steps

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    names = args.preset or list(PRESETS)
    configs = {name: _config(name, args) for name in names}  # every preset and setting checked before compiling
    failed = False
    for name, outcome in compile_steps(configs, threads=args.threads, everything=args.preset is None):
        print(f"{name}: {outcome}", flush=True)
        failed |= outcome.startswith("FAILED")
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from normlab.runs.commands import write_report

    print(f"report: {write_report(args.run, tensorboard=args.tensorboard)}")
    if args.tensorboard:
        print(f"tensorboard: tensorboard --logdir {args.run}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from normlab.runs.commands import export_run

    exported = export_run(args.run, args.out, fold=args.fold, force=args.force)
    folded = (f"; folded {len(exported.folded)} batch norm(s) into the Linear before them: "
              f"{', '.join(exported.folded)}" if exported.folded else "; nothing folded" if args.fold else "")
    calibrated = " (BatchNorm-calibrated)" if exported.calibrated else ""
    print(f"wrote {exported.path}: the weights of step {exported.step}{calibrated}{folded}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from normlab.runs.commands import inspect_preset

    config = _config(args.preset, args)
    result = inspect_preset(config, batch_size=args.batch)
    print(result.table)
    print(f"\ninitial loss {result.initial_loss:.4f} (a uniform guess over the vocabulary: {result.uniform_loss:.4f})")
    if result.findings:
        print("\nfindings:")
        for finding in result.findings:
            print(f"- {finding.message} Remedy: {finding.remedy}")
    else:
        print("\nno findings: every rule passed")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train, "sweep": _sweep, "sample": _sample, "eval": _eval, "calibrate": _calibrate, "export": _export,
    "presets": _presets, "compile": _compile, "report": _report, "inspect": _inspect}


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Warnings as one line each (the library's say what to do; others are prefixed with their kind)."""
    from normlab.errors import NormlabWarning

    kind = "" if issubclass(category, NormlabWarning) else f"{category.__name__}: "
    print(f"normlab: warning: {kind}{str(message).splitlines()[0] if str(message) else ''}", file=sys.stderr)


def _out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of `python -m normlab`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(command_of(argv)).parse_args(argv)
        args.argv = argv  # for `train --nproc`, which runs the same command in every process
        handler: Callable[[argparse.Namespace], int] = getattr(args, "handler", None) or HANDLERS[args.command]
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return handler(args)
    except (NormlabError, UsageError) as error:
        print(f"normlab: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        print("normlab: error: out of memory: make the model or the batch smaller (model.n_hidden, model.n_layers, "
              "train.batch_size)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("normlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`normlab presets | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
