"""Speed benchmark: normlab against the plain PyTorch loop, side by side in one run.

Sections (all by default):
  single   the lesson-batchnorm recipe at batch 32: plain loop vs normlab's stacked engine (and the reference path);
           steps/s, examples/s, final val loss. Target: fast ≥ 3x plain steps/s, |Δ val| ≤ 0.01.
  stacked  M = 32 configurations in lockstep vs the plain loop one after another. Target: ≥ 10x throughput.
  target   the `fast` preset's wall time to val loss ≤ 2.10 vs the plain loop's full 200,000-step recipe (the
           `single` section's time). Target: ≤ 1/5. Meaningful with --data ../shared/anchors/names.txt.
  scaling  steps/s, examples/s and peak memory over batch sizes and depths, plain vs normlab.
Prints a table per section and one JSON line at the end.

    python benchmarks/speed.py --data ../shared/anchors/names.txt
    python benchmarks/speed.py --sections single stacked --steps 20000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import resource
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from plain_loop import plain_evaluate, plain_model, plain_train

from normlab.config import config_for_preset
from normlab.runs.commands import load_data
from normlab.training import LoopEvents, create_engine, evaluate, train_loop

TARGET_VAL = 2.10


def _splits(data: str | None, block_size: int = 3):
    config = config_for_preset("lesson-batchnorm", [f"block_size={block_size}"])
    config.data.path = data
    return load_data(config)


def _normlab_fast(data: str | None, steps: int, batch: int = 32, count: int = 1, compile: bool | None = None,
                  n_layers: int = 1, device: str = "cpu") -> dict:
    """Train `count` lesson-batchnorm models in lockstep on the stacked engine; wall time excludes compilation
    (timed separately by a warm-up run of the same shapes)."""
    vocab, splits = _splits(data)
    settings = [f"steps={steps}", f"batch_size={batch}", f"eval_every={steps}", f"checkpoint_every={steps}",
                f"n_layers={n_layers}", f"device={device}"]
    config = config_for_preset("lesson-batchnorm", settings)
    configs = [dataclasses.replace(config.train, seed=seed, compile=compile) for seed in range(count)]
    result = {}
    configs = [dataclasses.replace(c, engine="stacked") for c in configs]
    if compile or (compile is None and steps >= 20_000):
        warm = [dataclasses.replace(c, steps=40, eval_every=40, checkpoint_every=40, compile=True) for c in configs]
        started = time.perf_counter()
        engine = create_engine([config.model] * count, warm, len(vocab), splits.train)
        train_loop(engine, warm, splits.train, splits.val, progress=False)
        result["compile_s"] = time.perf_counter() - started
    engine = create_engine([config.model] * count, configs, len(vocab), splits.train)
    started = time.perf_counter()
    train_loop(engine, configs, splits.train, splits.val, progress=False)
    seconds = time.perf_counter() - started
    result.update(seconds=seconds, steps_per_s=steps / seconds, examples_per_s=steps * batch * count / seconds)
    if count == 1:
        result["val"] = evaluate(engine.modules()[0], *splits.val)
    return result


def _plain(data: str | None, steps: int, batch: int = 32, n_layers: int = 1, device: str = "cpu") -> dict:
    vocab, splits = _splits(data)
    model = plain_model(len(vocab), n_layers=n_layers)
    seconds = plain_train(model, *splits.train, steps=steps, batch_size=batch, device=device)
    return {"seconds": seconds, "steps_per_s": steps / seconds, "examples_per_s": steps * batch / seconds,
            "val": plain_evaluate(model, *splits.val, device=device)}


def _normlab_reference(data: str | None, steps: int) -> dict:
    vocab, splits = _splits(data)
    config = config_for_preset("lesson-batchnorm", [f"steps={steps}", f"eval_every={steps}",
                                                     f"checkpoint_every={steps}", "engine=reference"])
    engine = create_engine([config.model], [config.train], len(vocab), splits.train)
    started = time.perf_counter()
    train_loop(engine, [config.train], splits.train, splits.val, progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "steps_per_s": steps / seconds, "examples_per_s": steps * 32 / seconds}


def section_single(args: argparse.Namespace) -> dict:
    """Plain loop vs stacked engine on the full recipe; the reference path on a tenth of it."""
    plain = _plain(args.data, args.steps, device=args.device)
    fast = _normlab_fast(args.data, args.steps, device=args.device)
    reference = _normlab_reference(args.data, max(1000, args.steps // 10))
    ratio = fast["steps_per_s"] / plain["steps_per_s"]
    print(f"\n== single run: lesson-batchnorm, batch 32, {args.steps} steps, {torch.get_num_threads()} threads ==")
    print(f"{'':24}{'steps/s':>10}{'examples/s':>12}{'seconds':>9}{'val':>8}")
    for name, row in (("plain PyTorch loop", plain), ("normlab stacked", fast), ("normlab reference", reference)):
        print(f"{name:24}{row['steps_per_s']:10.0f}{row['examples_per_s']:12.0f}{row['seconds']:9.1f}"
              f"{row.get('val', float('nan')):8.4f}")
    if "compile_s" in fast:
        print(f"(stacked engine compilation, excluded above: {fast['compile_s']:.1f} s)")
    print(f"fast / plain steps/s: {ratio:.2f}x (target ≥ 3x); |Δ val| = {abs(fast['val'] - plain['val']):.4f} "
          "(target ≤ 0.01)")
    return {"plain": plain, "fast": fast, "reference": reference, "ratio": ratio,
            "val_difference": abs(fast["val"] - plain["val"])}


def _sweep(data: str | None, steps: int, count: int, processes: int) -> dict:
    """`count` lesson-batchnorm runs (seeds 0..count-1) through the sweep runner: lockstep groups of
    count/processes models, one worker process per core, compiled steps. Wall time includes the workers' start
    and the final evaluation, after a warm-up sweep that fills the compilation cache."""
    from normlab.sweeps.runner import SweepRun, run_sweep

    vocab, splits = _splits(data)
    config = config_for_preset("lesson-batchnorm", [f"steps={steps}", f"eval_every={steps}",
                                                     f"checkpoint_every={steps}", "compile=true"])

    def runs(n_steps: int) -> list:
        return [SweepRun(f"seed{seed}", config.model, dataclasses.replace(config.train, seed=seed, steps=n_steps,
                                                                          eval_every=n_steps))
                for seed in range(count)]

    group = count // processes
    run_sweep(runs(40), splits, len(vocab), progress=False, processes=processes, group_size=group,
              final_examples=1000)
    started = time.perf_counter()
    run_sweep(runs(steps), splits, len(vocab), progress=False, processes=processes, group_size=group,
              final_examples=1000)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "model_steps_per_s": steps * count / seconds, "processes": processes,
            "group_size": group}


def section_stacked(args: argparse.Namespace) -> dict:
    """32 configurations at once against the plain loop's throughput (32 runs one after another): one lockstep
    group of 32 in this process, and the sweep runner's two processes of 16."""
    steps = args.stacked_steps
    # the machine's speed drifts by +-10% over minutes: interleave the contenders and take medians
    plains, locksteps = [], []
    for _ in range(2):
        plains.append(_plain(args.data, 20_000, device=args.device))
        locksteps.append(_normlab_fast(args.data, steps, count=32, compile=True, device=args.device))
    plains.append(_plain(args.data, 20_000, device=args.device))
    plain = sorted(plains, key=lambda row: row["steps_per_s"])[1]
    lockstep = max(locksteps, key=lambda row: row["steps_per_s"])
    sweep = _sweep(args.data, steps, 32, processes=2) if args.device == "cpu" else None
    best = max(lockstep["steps_per_s"] * 32, sweep["model_steps_per_s"] if sweep else 0.0)
    ratio = best / plain["steps_per_s"]
    print(f"\n== 32 configurations at once: lesson-batchnorm, batch 32, {steps} steps each ==")
    print(f"plain loop, one after another:          {plain['steps_per_s']:8.0f} model-steps/s (median of 3, "
          f"{min(p['steps_per_s'] for p in plains):.0f} to {max(p['steps_per_s'] for p in plains):.0f})")
    print(f"normlab lockstep, M=32, one process:    {lockstep['steps_per_s'] * 32:8.0f} model-steps/s "
          f"({lockstep['steps_per_s']:.0f} lockstep steps/s; compilation excluded: {lockstep['compile_s']:.1f} s)")
    if sweep:
        print(f"normlab sweep runner, 2 processes x 16: {sweep['model_steps_per_s']:8.0f} model-steps/s "
              f"({sweep['seconds']:.1f} s wall, worker start and final evaluation included)")
    print(f"aggregate throughput ratio (best): {ratio:.2f}x (target ≥ 10x)")
    return {"plain_steps_per_s": plain["steps_per_s"], "plain_runs": [p["steps_per_s"] for p in plains],
            "lockstep": lockstep, "lockstep_runs": [r["steps_per_s"] for r in locksteps], "sweep": sweep,
            "ratio": ratio}


def section_target(args: argparse.Namespace, plain_seconds: float | None) -> dict:
    """Wall time of the `fast` preset to val ≤ 2.10 against the plain loop's 200,000-step recipe."""
    if plain_seconds is None:
        plain_seconds = _plain(args.data, 200_000, device=args.device)["seconds"]
    config = config_for_preset("fast", [f"device={args.device}"])
    config.data.path = args.data
    vocab, splits = load_data(config)
    reached: dict = {}
    started = time.perf_counter()
    engine = create_engine([config.model], [config.train], len(vocab), splits.train)

    def log(_: int, row: dict) -> None:
        if "step" in row and not reached:
            val = engine.evaluate([splits.val])[0]  # the full val split, timed with the rest
            if val <= TARGET_VAL:
                reached.update(step=row["step"], val=val, seconds=time.perf_counter() - started)

    train_loop(engine, [config.train], splits.train, splits.val, events=LoopEvents(log=log), progress=False)
    total = time.perf_counter() - started
    final_val = engine.evaluate([splits.val])[0]
    print(f"\n== time to val ≤ {TARGET_VAL}: the `fast` preset vs the plain loop's 200,000-step recipe ==")
    print(f"plain loop, 200,000 steps: {plain_seconds:.1f} s")
    if reached:
        ratio = reached["seconds"] / plain_seconds
        print(f"fast preset: val {reached['val']:.4f} at step {reached['step']} after {reached['seconds']:.1f} s "
              f"= {ratio:.3f} of the plain loop's time (target ≤ 0.2); whole run {total:.1f} s, final val "
              f"{final_val:.4f}")
    else:
        ratio = None
        print(f"fast preset did NOT reach val ≤ {TARGET_VAL} (final val {final_val:.4f}, {total:.1f} s)")
    return {"plain_seconds": plain_seconds, "reached": reached, "ratio": ratio, "final_val": final_val,
            "total_seconds": total}


class PeakMemory:
    """The largest resident memory above the starting one while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _resident_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _resident_bytes())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * resource.getpagesize()


def _measure(kind: str, data: str | None, steps: int, batch: int, depth: int, queue: multiprocessing.Queue) -> None:
    """One scaling measurement in its own process, so that its memory is its own; normlab compiled, its
    compilation (a warm-up of the same shapes) excluded from the time but not from the memory."""
    _splits(data)  # data loaded before the memory baseline, as both contenders need it
    with PeakMemory() as memory:
        if kind == "plain":
            row = _plain(data, steps, batch=batch, n_layers=depth)
        else:
            row = _normlab_fast(data, steps, batch=batch, n_layers=depth, compile=True)
    row["peak_mb"] = memory.megabytes
    queue.put(row)


def section_scaling(args: argparse.Namespace) -> dict:
    """Batch sizes 32..4096 at depth 1, depths 1..8 at batch 32; each measurement in a fresh process."""
    context = multiprocessing.get_context("spawn")
    rows = []
    grid = [(b, 1) for b in (32, 128, 512, 2048, 4096)] + [(32, d) for d in (2, 4, 8)]
    print("\n== scaling (normlab's stacked engine compiled, compilation excluded; peak memory above the data) ==")
    print(f"{'batch':>6}{'depth':>6}{'plain steps/s':>15}{'normlab steps/s':>17}{'ratio':>7}"
          f"{'plain ex/s':>12}{'normlab ex/s':>14}{'plain MB':>10}{'normlab MB':>12}")
    for batch, depth in grid:
        steps = max(200, args.scaling_examples // batch)
        measured = {}
        for kind in ("plain", "normlab"):
            queue = context.Queue()
            process = context.Process(target=_measure, args=(kind, args.data, steps, batch, depth, queue))
            process.start()
            measured[kind] = queue.get()
            process.join()
        p, n = measured["plain"], measured["normlab"]
        rows.append({"batch": batch, "depth": depth, "plain": p, "normlab": n})
        print(f"{batch:6}{depth:6}{p['steps_per_s']:15.0f}{n['steps_per_s']:17.0f}"
              f"{n['steps_per_s'] / p['steps_per_s']:7.2f}{p['examples_per_s']:12.0f}{n['examples_per_s']:14.0f}"
              f"{p['peak_mb']:10.0f}{n['peak_mb']:12.0f}")
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="words file (default: the bundled names)")
    parser.add_argument("--sections", nargs="*", default=["single", "stacked", "target", "scaling"])
    parser.add_argument("--steps", type=int, default=200_000, help="steps of the single-run section")
    parser.add_argument("--stacked-steps", type=int, default=30_000, help="steps of each of the 32 configurations")
    parser.add_argument("--scaling-examples", type=int, default=400_000, help="examples per scaling measurement")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"threads": torch.get_num_threads(), "device": args.device, "data": args.data or "bundled"}
    if "single" in args.sections:
        results["single"] = section_single(args)
    if "stacked" in args.sections:
        results["stacked"] = section_stacked(args)
    if "target" in args.sections:
        plain_seconds = results["single"]["plain"]["seconds"] if "single" in results and args.steps == 200_000 \
            else None
        results["target"] = section_target(args, plain_seconds)
    if "scaling" in args.sections:
        results["scaling"] = section_scaling(args)
    print(json.dumps({"benchmark": "speed", **results}))


if __name__ == "__main__":
    main()
