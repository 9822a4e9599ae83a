"""The `normlab` command: parses arguments, calls the library, prints. User errors print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from normlab.errors import NormlabError

if TYPE_CHECKING:
    from normlab.config import RunConfig

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_config_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The arguments every command that builds a configuration shares: --set, --data, --split-seed."""
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help=f"override a config value{what}, e.g. --set n_hidden=300 --set train.lr=0.05 "
                             "(repeatable; `normlab presets -v` lists the keys)")
    parser.add_argument("--data", help="UTF-8 file, one word per line (default: the bundled names)")
    parser.add_argument("--split-seed", type=int,
                        help="seed of the 80/10/10 split of the words (default 42: the lesson's split)")


def _config(preset: str, args: argparse.Namespace) -> RunConfig:
    """The preset's config with `--set`, `--data` and `--split-seed` applied."""
    from normlab.config import config_for_preset

    config = config_for_preset(preset, args.set or [])
    config.data.path = args.data
    if args.split_seed is not None:
        config.data.split_seed = args.split_seed
    return config


def _train_config(args: argparse.Namespace) -> RunConfig:
    config = _config(args.preset or "lesson-batchnorm", args)
    if args.device:
        config.train.device = args.device
    return config


def _train(args: argparse.Namespace) -> int:
    from normlab.runs import launch, ranks

    if args.resume and (args.preset or args.set or args.data or args.split_seed is not None):
        raise NormlabError("--resume continues a run with its saved config: drop --preset, --set, --data and "
                           "--split-seed")
    if args.nproc is not None and not ranks.launched():  # this process launches; the workers train
        return launch.launch_training(args.argv, args.nproc, args.out, None if args.resume else _train_config(args))
    with ranks.as_rank(args.nproc):  # one rank of `--nproc`/torchrun workers (only rank 0 prints), or alone
        return _train_here(args)


def _train_here(args: argparse.Namespace) -> int:
    from normlab.runs import commands
    from normlab.training import Interrupted

    options = dict(diagnose=args.diagnose, every=args.every, calibrate=args.calibrate, progress=not args.quiet,
                   threads=args.threads)
    try:
        if args.resume:
            outcome = commands.resume_training(args.out, **options)
        else:
            outcome = commands.start_training(_train_config(args), args.out, **options)
    except Interrupted as stop:
        print(f"interrupted: checkpoint saved at step {stop.step} in {args.out}; continue with "
              f"`normlab train --resume --out {args.out}`", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.calibration:
        calibration = outcome.calibration
        print(f"calibrated {calibration['layers']} BatchNorm layer(s): val loss {calibration['val_before']:.4f} "
              f"(running statistics) -> {calibration['val_after']:.4f} (population statistics)")
    final = outcome.final
    print(f"final loss  train {final['train']:.4f}  val {final['val']:.4f}  test {final['test']:.4f}")
    print(f"run directory: {outcome.run.path}")
    if outcome.report:
        print(f"report: {outcome.report}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from normlab.sweeps.grid import parse_variations, train_grid

    config = _config(args.preset, args)
    runs = train_grid(config, parse_variations(args.vary), args.out, diagnose=args.diagnose, every=args.every,
                      progress=not args.quiet, backend=ray_backend(args.ray))
    width = max(len(run.name) for run in runs)
    print(f"{'run':{width}}  {'train':>7}  {'val':>7}  {'test':>7}")
    for run in sorted(runs, key=lambda r: (r.diverged_at is not None, r.final["val"])):
        status = f"  diverged at step {run.diverged_at}" if run.diverged_at is not None else ""
        print(f"{run.name:{width}}  {run.final['train']:7.4f}  {run.final['val']:7.4f}  {run.final['test']:7.4f}"
              f"{status}")
    print(f"{len(runs)} run directories in {args.out}")
    return 0


def ray_backend(address: str | None) -> object | None:
    """`--ray [ADDRESS]`: a Ray backend (a local Ray instance without an address), or None without the flag."""
    if address is None:
        return None
    from normlab.sweeps.backends import RayBackend

    return RayBackend(address or None)


def add_ray_argument(parser: argparse.ArgumentParser) -> None:
    """`--ray [ADDRESS]`, for every command that runs sweeps."""
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="train the lockstep groups as Ray tasks: on a local Ray instance, or on the cluster at "
                             "ADDRESS (e.g. auto, ray://host:10001); needs pip install 'normlab[ray]'")


def _sample(args: argparse.Namespace) -> int:
    from normlab.runs.commands import sample_run

    samples, stats = sample_run(args.run, args.n, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print("\n".join(samples.words))
    print()
    print("\n".join(stats.lines()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from normlab.runs.commands import evaluate_run

    loss, count = evaluate_run(args.run, args.split, data=args.data)
    where = args.data if args.data else f"{args.split} split"
    print(f"{where}: loss {loss:.4f} over {count} examples")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from normlab.runs.commands import calibrate_run

    result = calibrate_run(args.run)
    print(f"calibrated {result['layers']} BatchNorm layer(s) on the training split: val loss "
          f"{result['val_before']:.4f} (running statistics) -> {result['val_after']:.4f} (population statistics)")
    return 0


def _presets(args: argparse.Namespace) -> int:
    import dataclasses

    from normlab.config import PRESETS, config_for_preset

    for name, preset in PRESETS.items():
        print(f"{name}: {preset.description}")
        if args.verbose:
            config = config_for_preset(name)
            print(json.dumps({"model": dataclasses.asdict(config.model),
                              "train": dataclasses.asdict(config.train)}, indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from normlab.runs.commands import write_report

    print(f"report: {write_report(args.run, tensorboard=args.tensorboard)}")
    if args.tensorboard:
        print(f"tensorboard: tensorboard --logdir {args.run}")
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="normlab", description="Activations, gradients and BatchNorm: a lab.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a preset on a words file into a run directory")
    train.add_argument("--preset", help="a preset from `normlab presets` (default lesson-batchnorm)")
    _add_config_arguments(train, "")
    train.add_argument("--out", required=True, help="run directory to create (or continue with --resume)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--calibrate", action="store_true", help="recompute BatchNorm statistics at the end")
    train.add_argument("--diagnose", action="store_true", help="record diagnostics and write report.html")
    train.add_argument("--every", type=int, default=100, help="steps between diagnostic recordings")
    train.add_argument("--device", help="cpu or cuda (overrides train.device)")
    train.add_argument("--threads", type=int, help="torch threads (default: 1 for lesson-sized models, else torch's)")
    train.add_argument("--nproc", type=int, help="train on N local processes with DistributedDataParallel, "
                       "launched by torch's elastic launcher (as torchrun --nproc_per_node N); batch_size must be "
                       "divisible by N")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    sweep = commands.add_parser("sweep", help="train a grid of configurations at once, a run directory each")
    sweep.add_argument("--preset", default="lesson-batchnorm")
    _add_config_arguments(sweep, " for all runs")
    sweep.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...",
                       help="values to try, e.g. --vary lr=0.05,0.1 --vary seed=1,2,3 (every combination)")
    sweep.add_argument("--out", required=True, help="folder to create, one run directory per configuration")
    sweep.add_argument("--diagnose", action="store_true", help="record diagnostics and write each run's report")
    sweep.add_argument("--every", type=int, help="steps between diagnostic recordings (default: ten a run)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_argument(sweep)
    sweep.set_defaults(handler=_sweep)

    sample = commands.add_parser("sample", help="sample words from a run")
    sample.add_argument("run")
    sample.add_argument("-n", type=int, default=20, help="number of words")
    sample.add_argument("--temperature", type=float, default=1.0, help="> 0; below 1 sharpens, above 1 flattens")
    sample.add_argument("--top-k", type=int, default=None, help="sample among the k most likely characters")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=_sample)

    evaluate = commands.add_parser("eval", help="loss of a run on a split (or another words file)")
    evaluate.add_argument("run")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="val")
    evaluate.add_argument("--data", help="evaluate on every word of this file instead of a split")
    evaluate.set_defaults(handler=_eval)

    calibrate = commands.add_parser("calibrate", help="set BatchNorm statistics to the training split's")
    calibrate.add_argument("run")
    calibrate.set_defaults(handler=_calibrate)

    presets = commands.add_parser("presets", help="list the presets")
    presets.add_argument("-v", "--verbose", action="store_true", help="print each preset's full config")
    presets.set_defaults(handler=_presets)

    report = commands.add_parser("report", help="rebuild report.html of a run from its stored diagnostics")
    report.add_argument("run")
    report.add_argument("--tensorboard", action="store_true", help="also export to RUN/tensorboard/")
    report.set_defaults(handler=_report)

    inspect = commands.add_parser("inspect", help="one forward and backward pass of a preset at initialisation")
    inspect.add_argument("--preset", default="lesson-batchnorm")
    _add_config_arguments(inspect, "")
    inspect.add_argument("--batch", type=int, default=256, help="examples in the batch")
    inspect.set_defaults(handler=_inspect)

    from normlab.lab.cli import add_lab_commands

    add_lab_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `train --nproc`, which reruns it per process
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except NormlabError as error:
        print(f"normlab: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("normlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`normlab presets | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
