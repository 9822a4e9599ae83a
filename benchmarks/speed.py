"""Speed benchmark: issue 15's targets, normlab against the plain PyTorch loop, in one run.

Sections (`--sections`; all but `lab` by default):
  whole    whole processes, as a user runs them: `normlab train --preset lesson-batchnorm` against
           benchmarks/plain_script.py (torch's default threads; plain at one thread as a second column), same
           words file, same steps, fresh processes run interleaved (plain, normlab, plain --threads 1, normlab
           uncompiled...), timed with time.perf_counter around subprocess.run. Median ratio and range over
           --repeat pairs. Targets: ≥ 2.5x at 20,000 steps, ≥ 4x at 200,000 steps, the uncompiled normlab
           (--set train.compile=false) ≥ 2x at 20,000 steps; final val losses within 0.02 of each other.
  scaling  steps/s at a fixed number of examples per cell (steps = examples / batch), batch 32..4096 at depth 1
           and depth 1..8 at batch 32 (--full-grid: every pair), each contender in a fresh process, measured in
           it after a warm-up: normlab as it chooses (engine auto, compile auto, its own threads; a kernel it
           compiles is compiled before the timed part), the plain loop at torch's default threads.
           Target: every row ≥ 1.0x.
  many     M = 32 lesson-batchnorm configurations (seeds 0..31) in lockstep in one process against 32 plain
           runs one after another (estimated as one plain run's steps/s × 32). Target: ≥ 15x aggregate steps/s.
  target   the `fast` preset's wall time to val loss ≤ 2.10 vs the plain loop's 200,000-step recipe.
           Target: ≤ 1/5.
  lab      `normlab lab run all --out TMP --force` as a whole process. Target: ≤ 300 s. Off by default (long).
Before measuring, `normlab compile --preset lesson-batchnorm` runs once (and says whether the kernel was
cached). Prints a table per section, the targets with their ratios and "met"/"NOT met", then one JSON line.
The issue's figures use the full names file on a quiet machine:

    python benchmarks/speed.py --data ../shared/anchors/names.txt
    python benchmarks/speed.py --sections whole --repeat 5
    python benchmarks/speed.py --quick --sections whole scaling many target lab   # smoke test only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop import plain_evaluate, plain_model, plain_train

from normlab.config import config_for_preset
from normlab.data import bundled_path
from normlab.runs.commands import load_data
from normlab.training import LoopEvents, choose_engine, create_engine, train_loop
from normlab.training.threads import threads_for, torch_threads, work_per_step

HERE = Path(__file__).resolve().parent
SECTIONS = ("whole", "scaling", "many", "target", "lab")
DEFAULT_SECTIONS = ("whole", "scaling", "many", "target")
TARGET_VAL = 2.10
# issue 15's targets
WHOLE_SHORT_X, WHOLE_LONG_X, WHOLE_EAGER_X, VAL_AGREEMENT = 2.5, 4.0, 2.0, 0.02
SCALING_X, MANY_X, TARGET_FRACTION, LAB_SECONDS = 1.0, 15.0, 0.2, 300.0
BATCHES, DEPTHS = (32, 128, 512, 2048, 4096), (1, 2, 4, 8)
FINAL = re.compile(r"final loss\s+train\s+(\S+)\s+val\s+(\S+)")
PLAIN_TRAINING = re.compile(r"training ([\d.]+) s")


@dataclasses.dataclass
class Target:
    """One of the issue's targets, as measured."""

    name: str
    value: float | None
    target: float
    at_least: bool = True  # else: at most
    unit: str = "x"

    @property
    def met(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.target if self.at_least else self.value <= self.target

    def line(self) -> str:
        digits = {"x": 2, "": 4}.get(self.unit, 1)
        shown = "n/a" if self.value is None else f"{self.value:.{digits}f}{self.unit}"
        sign = "≥" if self.at_least else "≤"
        return f"{self.name}: {shown} (target {sign} {self.target:g}{self.unit}): {'met' if self.met else 'NOT met'}"

    def json(self) -> dict:
        return {"value": self.value, "target": self.target, "at_least": self.at_least, "met": self.met}


TARGETS: list[Target] = []


def _target(name: str, value: float | None, target: float, *, at_least: bool = True, unit: str = "x") -> Target:
    """Record a target and print its line."""
    measured = Target(name, value, target, at_least, unit)
    TARGETS.append(measured)
    print(measured.line(), flush=True)
    return measured


def _data_path(args: argparse.Namespace) -> str:
    return str(args.data or bundled_path())


def _splits(data: str | None):
    config = config_for_preset("lesson-batchnorm")
    config.data.path = data
    return load_data(config)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


# ---------------------------------------------------------------------------------------------- whole processes
def _normlab_command() -> list[str]:
    """`normlab` as installed next to this Python (as a user runs it), else `python -m normlab`."""
    script = Path(sys.executable).with_name("normlab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "normlab"]


def _run(command: list[str]) -> tuple[float, str]:
    """Run a whole command; its wall time (time.perf_counter around subprocess.run) and its output."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"command failed with exit status {result.returncode}: {' '.join(command)}\n"
                         f"{output[-3000:]}")
    return seconds, output


def _final_val(output: str) -> float:
    match = FINAL.search(output)
    return float(match.group(2)) if match else float("nan")


def _plain_process(args: argparse.Namespace, steps: int, threads: int | None = None) -> dict:
    command = [sys.executable, str(HERE / "plain_script.py"), "--data", _data_path(args), "--steps", str(steps)]
    if threads:
        command += ["--threads", str(threads)]
    seconds, output = _run(command)
    training = PLAIN_TRAINING.search(output)
    return {"seconds": seconds, "val": _final_val(output),
            "training_s": float(training.group(1)) if training else None}


def _normlab_process(args: argparse.Namespace, steps: int, compile: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="normlab-speed-") as folder:
        command = _normlab_command() + ["train", "--preset", "lesson-batchnorm", "--data", _data_path(args),
                                        "--set", f"steps={steps}", "--out", str(Path(folder) / "run"), "--quiet"]
        if not compile:
            command += ["--set", "train.compile=false"]
        seconds, output = _run(command)
        rows = [json.loads(line) for line in (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
    elapsed = [row["elapsed_s"] for row in rows if "elapsed_s" in row]
    return {"seconds": seconds, "val": _final_val(output), "training_s": elapsed[-1] if elapsed else None}


def _compile_kernel(args: argparse.Namespace) -> dict:
    """`normlab compile --preset lesson-batchnorm` once, before anything is measured."""
    command = _normlab_command() + ["compile", "--preset", "lesson-batchnorm", "--data", _data_path(args)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    output = (result.stdout + result.stderr).strip()
    cached = "already compiled (cached)" in output
    lines = [line for line in output.splitlines() if line.startswith("lesson-batchnorm:")] or output.splitlines()
    print(f"`normlab compile --preset lesson-batchnorm`: {lines[-1] if lines else '(no output)'} "
          f"[{seconds:.1f} s; kernel was {'cached' if cached else 'NOT cached'} before this benchmark]", flush=True)
    return {"cached": cached, "seconds": seconds, "output": output, "exit_status": result.returncode}


def _whole_steps(args: argparse.Namespace, steps: int, repeat: int, eager: bool, target: float) -> dict:
    contenders = [("plain", f"plain_script.py ({torch.get_num_threads()} threads, torch's default)"),
                  ("normlab", "normlab train"),
                  ("plain_1thread", "plain_script.py --threads 1")]
    if eager:
        contenders.append(("normlab_eager", "normlab train --set train.compile=false"))
    print(f"\n== whole process: lesson-batchnorm, {steps} steps, {repeat} interleaved repeat(s) ==", flush=True)
    runs: dict[str, list[dict]] = {key: [] for key, _ in contenders}
    for index in range(repeat):
        for key, label in contenders:
            if key.startswith("plain"):
                row = _plain_process(args, steps, threads=1 if key == "plain_1thread" else None)
            else:
                row = _normlab_process(args, steps, compile=key == "normlab")
            runs[key].append(row)
            print(f"  repeat {index + 1}: {label:48} {row['seconds']:8.1f} s   val {row['val']:.4f}", flush=True)
    ratios = {"vs_plain": _spread([p["seconds"] / n["seconds"] for p, n in zip(runs["plain"], runs["normlab"])]),
              "vs_plain_1thread": _spread([p["seconds"] / n["seconds"]
                                           for p, n in zip(runs["plain_1thread"], runs["normlab"])])}
    if eager:
        ratios["eager_vs_plain"] = _spread([p["seconds"] / n["seconds"]
                                            for p, n in zip(runs["plain"], runs["normlab_eager"])])
    print(f"{'':50}{'median s':>10}{'range s':>18}{'training s':>12}{'val':>9}")
    for key, label in contenders:
        seconds = [row["seconds"] for row in runs[key]]
        training = [row["training_s"] for row in runs[key] if row["training_s"] is not None]
        print(f"{label:50}{statistics.median(seconds):10.1f}{min(seconds):9.1f}-{max(seconds):<8.1f}"
              f"{statistics.median(training) if training else float('nan'):12.1f}{runs[key][-1]['val']:9.4f}")
    print("(training s: the training loop alone, as each reports it; the rest is start-up, data, evaluation)")

    def ratio_text(name: str) -> str:
        spread = ratios[name]
        return f"{spread['median']:.2f}x median, range {spread['min']:.2f}-{spread['max']:.2f}x"

    print(f"normlab vs plain, torch's threads: {ratio_text('vs_plain')}   |   vs plain at 1 thread: "
          f"{ratio_text('vs_plain_1thread')}")
    if eager:
        print(f"uncompiled normlab vs plain, torch's threads: {ratio_text('eager_vs_plain')}")
    difference = max(abs(n["val"] - p["val"]) for p, n in zip(runs["plain"], runs["normlab"]))
    print(f"final val: plain {runs['plain'][-1]['val']:.4f}, normlab {runs['normlab'][-1]['val']:.4f}")
    result = {"steps": steps, "repeat": repeat, "runs": runs, "ratios": ratios, "val_difference": difference,
              "targets": {}}
    result["targets"]["speedup"] = _target(f"whole process at {steps} steps, normlab vs plain (median)",
                                           ratios["vs_plain"]["median"], target).json()
    if eager:
        result["targets"]["eager_speedup"] = _target(
            f"whole process at {steps} steps, uncompiled normlab vs plain (median)",
            ratios["eager_vs_plain"]["median"], WHOLE_EAGER_X).json()
    result["targets"]["val_agreement"] = _target(f"|val normlab - val plain| at {steps} steps", difference,
                                                 VAL_AGREEMENT, at_least=False, unit="").json()
    return result


def section_whole(args: argparse.Namespace) -> dict:
    return {"short": _whole_steps(args, args.short_steps, args.repeat, eager=True, target=WHOLE_SHORT_X),
            "long": _whole_steps(args, args.long_steps, args.repeat_long, eager=False, target=WHOLE_LONG_X)}


# ------------------------------------------------------------------------------------------- in-process helpers
def _plain(data: str | None, steps: int, batch: int = 32, n_layers: int = 1) -> dict:
    """The plain loop in this process at torch's threads, after a 20-step warm-up on a throwaway model."""
    vocab, splits = _splits(data)
    plain_train(plain_model(len(vocab), n_layers=n_layers), *splits.train, steps=20, batch_size=batch)
    model = plain_model(len(vocab), n_layers=n_layers)
    seconds = plain_train(model, *splits.train, steps=steps, batch_size=batch)
    return {"seconds": seconds, "steps_per_s": steps / seconds, "examples_per_s": steps * batch / seconds,
            "val": plain_evaluate(model, *splits.val), "threads": torch.get_num_threads()}


def _normlab(data: str | None, steps: int, batch: int = 32, n_layers: int = 1, count: int = 1,
             compile: str = "auto") -> dict:
    """`count` lesson-batchnorm configurations (seeds 0..count-1) as normlab chooses to train them: engine auto,
    compile `compile` (auto: normlab's choice for a run of `steps` steps, or a kernel it finds cached), threads as
    `normlab train` chooses. A kernel normlab would compile is compiled first, and a 40-step warm-up run goes
    before the timed run (a fresh engine: a compiled kernel is loaded from the cache)."""
    vocab, splits = _splits(data)
    settings = [f"steps={steps}", f"batch_size={batch}", f"eval_every={steps}", f"checkpoint_every={steps}",
                f"n_layers={n_layers}"] + ([] if compile == "auto" else [f"compile={compile}"])
    config = config_for_preset("lesson-batchnorm", settings)
    configs = [dataclasses.replace(config.train, seed=seed).resolved() for seed in range(count)]
    models = [config.model] * count
    threads = threads_for(work_per_step(models, batch))
    result: dict = {"engine": choose_engine(config.model, configs[0])}
    with torch_threads(threads):
        result["threads"] = torch.get_num_threads()
        engine = create_engine(models, configs, len(vocab), splits.train)
        compiling = getattr(engine, "compiling", False)
        result["kernel"] = ("built" if compiling else "cached" if getattr(engine, "compiled", False) else "none")
        if compiling:
            started = time.perf_counter()
            try:
                engine.compile()
            except Exception as error:  # as `normlab train` would, the run goes on uncompiled
                result["compile_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            result["compile_s"] = time.perf_counter() - started
        warm = [dataclasses.replace(c, steps=40, eval_every=40, checkpoint_every=40) for c in configs]
        train_loop(engine, warm, splits.train, splits.val, progress=False)
        engine = create_engine(models, configs, len(vocab), splits.train)
        result["compiled"] = bool(getattr(engine, "compiled", False))
        started = time.perf_counter()
        train_loop(engine, configs, splits.train, splits.val, progress=False)
        seconds = time.perf_counter() - started
    result.update(seconds=seconds, steps_per_s=steps / seconds, examples_per_s=steps * batch * count / seconds)
    if count == 1:
        result["val"] = engine.evaluate([splits.val])[0]
    return result


def _state(row: dict) -> str:
    """How a normlab measurement ran, for a person: engine, compiled or not, threads."""
    text = f"{row['engine']}, {'compiled' if row.get('compiled') else 'eager'}"
    if row.get("compiled"):
        text += (f" (kernel built, {row['compile_s']:.0f} s excluded)" if row["kernel"] == "built"
                 else " (kernel cached)")
    return text + f", {row['threads']} thread{'s' if row['threads'] != 1 else ''}"


# ------------------------------------------------------------------------------------------------------ scaling
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


def _measure(kind: str, data: str | None, steps: int, batch: int, depth: int, compile: str,
             queue: multiprocessing.Queue) -> None:
    """One scaling measurement in its own process, so that its memory is its own (a compilation, excluded from
    the time, is not excluded from the memory)."""
    try:
        _splits(data)  # data loaded before the memory baseline, as both contenders need it
        with PeakMemory() as memory:
            if kind == "plain":
                row = _plain(data, steps, batch=batch, n_layers=depth)
            else:
                row = _normlab(data, steps, batch=batch, n_layers=depth, compile=compile)
        row["peak_mb"] = memory.megabytes
    except Exception as error:  # reported by the parent
        row = {"error": f"{type(error).__name__}: {error}"}
    queue.put(row)


def section_scaling(args: argparse.Namespace) -> dict:
    """Batch sizes at depth 1 and depths at batch 32 (or every pair); each measurement in a fresh process."""
    context = multiprocessing.get_context("spawn")
    if args.full_grid:
        grid = [(b, d) for d in DEPTHS for b in BATCHES]
    else:
        grid = [(b, 1) for b in BATCHES] + [(32, d) for d in DEPTHS[1:]]
    if args.quick:
        grid = [(32, 1), (512, 2)]
    print(f"\n== scaling: {args.scaling_examples} examples per cell (steps = examples / batch); normlab as it "
          f"chooses (compile={args.scaling_compile}), compilation and first calls excluded; plain at torch's "
          f"threads; peak memory above the data ==", flush=True)
    print(f"{'batch':>6}{'depth':>6}{'steps':>7}{'plain st/s':>12}{'normlab st/s':>14}{'ratio':>7}"
          f"{'plain MB':>10}{'normlab MB':>12}  normlab ran")
    rows = []
    for batch, depth in grid:
        steps = max(200, args.scaling_examples // batch)
        measured = {}
        for kind in ("plain", "normlab"):
            queue = context.Queue()
            process = context.Process(target=_measure, args=(kind, args.data, steps, batch, depth,
                                                             args.scaling_compile, queue))
            process.start()
            measured[kind] = queue.get()
            process.join()
            if "error" in measured[kind]:
                raise SystemExit(f"scaling cell batch {batch} depth {depth}, {kind}: {measured[kind]['error']}")
        p, n = measured["plain"], measured["normlab"]
        ratio = n["steps_per_s"] / p["steps_per_s"]
        rows.append({"batch": batch, "depth": depth, "steps": steps, "plain": p, "normlab": n, "ratio": ratio,
                     "met": ratio >= SCALING_X})
        print(f"{batch:6}{depth:6}{steps:7}{p['steps_per_s']:12.0f}{n['steps_per_s']:14.0f}{ratio:7.2f}"
              f"{p['peak_mb']:10.0f}{n['peak_mb']:12.0f}  {_state(n)}"
              f"{'' if ratio >= SCALING_X else '   <-- below 1.0x'}", flush=True)
    worst = min(rows, key=lambda row: row["ratio"])
    target = _target(f"scaling, every row normlab vs plain steps/s (worst: batch {worst['batch']}, depth "
                     f"{worst['depth']})", worst["ratio"], SCALING_X)
    return {"examples": args.scaling_examples, "compile": args.scaling_compile, "rows": rows,
            "target": target.json()}


# --------------------------------------------------------------------------------------------- many at once
def section_many(args: argparse.Namespace) -> dict:
    """M configurations in lockstep against the plain loop's throughput (M runs one after another); the
    contenders interleaved, medians over --repeat."""
    count, steps = args.many, args.many_steps
    print(f"\n== {count} configurations at once: lesson-batchnorm (seeds 0..{count - 1}), batch 32, {steps} steps "
          f"each ==", flush=True)
    plains, locksteps = [], []
    for index in range(args.repeat):
        plains.append(_plain(args.data, args.many_plain_steps))
        print(f"  repeat {index + 1}: plain loop, one run of {args.many_plain_steps} steps: "
              f"{plains[-1]['steps_per_s']:.0f} steps/s ({plains[-1]['threads']} threads)", flush=True)
        locksteps.append(_normlab(args.data, steps, count=count))
        print(f"  repeat {index + 1}: normlab lockstep M={count}: {locksteps[-1]['steps_per_s']:.0f} lockstep "
              f"steps/s = {locksteps[-1]['steps_per_s'] * count:.0f} model-steps/s [{_state(locksteps[-1])}]",
              flush=True)
    plain = statistics.median(row["steps_per_s"] for row in plains)
    lockstep = statistics.median(row["steps_per_s"] * count for row in locksteps)
    ratios = [n["steps_per_s"] * count / p["steps_per_s"] for p, n in zip(plains, locksteps)]
    print(f"plain loop, {count} runs one after another: {plain:8.0f} model-steps/s (ESTIMATED: one plain run's "
          f"steps/s, median of {len(plains)}; {count} sequential runs take {count}x as long at this rate)")
    print(f"normlab lockstep, M={count}, one process:  {lockstep:8.0f} model-steps/s (median of {len(locksteps)})")
    compile_s = [row["compile_s"] for row in locksteps if "compile_s" in row]
    print("compilation, excluded above: " + (f"{compile_s[0]:.1f} s (kernel built in the first repeat)" if compile_s
                                             else "none (kernel cached)" if locksteps[0]["compiled"]
                                             else "none (ran eager)"))
    spread = _spread(ratios)
    print(f"aggregate steps/s ratio: {spread['median']:.2f}x median, range {spread['min']:.2f}-{spread['max']:.2f}x")
    target = _target(f"{count} configurations at once vs {count} plain runs one after another (median)",
                     spread["median"], MANY_X)
    return {"count": count, "steps": steps, "plain_steps": args.many_plain_steps, "plain": plains,
            "lockstep": locksteps, "plain_steps_per_s": plain, "lockstep_model_steps_per_s": lockstep,
            "ratios": spread, "plain_is_estimate": True, "target": target.json()}


# ------------------------------------------------------------------------------------------------------- target
def section_target(args: argparse.Namespace, plain_seconds: float | None) -> dict:
    """Wall time of the `fast` preset to val ≤ 2.10 against the plain loop's 200,000-step recipe (its training
    loop's seconds: from the whole section's 200,000-step plain run when there is one)."""
    source = "the whole section's plain_script.py run (its training loop)"
    if plain_seconds is None:
        plain_seconds = _plain(args.data, args.target_plain_steps)["seconds"]
        source = f"the plain loop in this process, {args.target_plain_steps} steps"
    config = config_for_preset("fast")
    config.data.path = args.data
    vocab, splits = load_data(config)
    train = config.train.resolved()
    reached: dict = {}
    with torch_threads(threads_for(work_per_step([config.model], train.batch_size))):
        threads = torch.get_num_threads()
        started = time.perf_counter()
        engine = create_engine([config.model], [train], len(vocab), splits.train)
        compiled, compiling = getattr(engine, "compiled", False), getattr(engine, "compiling", False)

        def log(_: int, row: dict) -> None:
            if "step" in row and not reached:
                val = engine.evaluate([splits.val])[0]  # the full val split, timed with the rest
                if val <= TARGET_VAL:
                    reached.update(step=row["step"], val=val, seconds=time.perf_counter() - started)

        train_loop(engine, [train], splits.train, splits.val, events=LoopEvents(log=log), progress=False)
        total = time.perf_counter() - started
        final_val = engine.evaluate([splits.val])[0]
    state = ("compiled, kernel built within the timed run" if compiling else "compiled, kernel cached" if compiled
             else "eager")
    print(f"\n== time to val ≤ {TARGET_VAL:.2f}: the `fast` preset vs the plain loop's 200,000-step recipe ==")
    print(f"plain loop: {plain_seconds:.1f} s ({source})")
    print(f"fast preset ran {choose_engine(config.model, train)}, {state}, {threads} thread(s)")
    if reached:
        print(f"fast preset: val {reached['val']:.4f} at step {reached['step']} after {reached['seconds']:.1f} s; "
              f"whole run {total:.1f} s, final val {final_val:.4f}")
    else:
        print(f"fast preset did NOT reach val ≤ {TARGET_VAL:.2f} (final val {final_val:.4f}, {total:.1f} s)")
    fraction = reached["seconds"] / plain_seconds if reached else None
    target = _target("`fast` preset's time to val ≤ 2.10 / plain's 200,000-step recipe", fraction, TARGET_FRACTION,
                     at_least=False, unit="")
    return {"plain_seconds": plain_seconds, "plain_source": source, "reached": reached, "fraction": fraction,
            "final_val": final_val, "total_seconds": total, "compiled": compiled, "kernel_built": compiling,
            "threads": threads, "target": target.json()}


# ---------------------------------------------------------------------------------------------------------- lab
def section_lab(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="normlab-speed-lab-") as folder:
        command = _normlab_command() + ["lab", "run", "all", "--out", folder, "--force", "--quiet"]
        if args.data:
            command += ["--data", args.data]
        if args.quick:
            command.append("--quick")
        print(f"\n== lab: normlab {' '.join(command[command.index('lab'):])} ==", flush=True)
        seconds, _ = _run(command)
    print(f"whole process: {seconds:.1f} s")
    target = _target("`normlab lab run all` wall time" + (" (--quick)" if args.quick else ""), seconds,
                     LAB_SECONDS, at_least=False, unit=" s")
    return {"seconds": seconds, "quick": args.quick, "target": target.json()}


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--data", help="words file (default: the bundled names; the issue's figures use "
                                       "../shared/anchors/names.txt)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                        help=f"default: {' '.join(DEFAULT_SECTIONS)}")
    parser.add_argument("--repeat", type=int, help="interleaved repeats at the short step count and of the many "
                                                   "section (default 3; --quick: 1)")
    parser.add_argument("--repeat-long", type=int, help="interleaved repeats at the long step count (default 1)")
    parser.add_argument("--short-steps", type=int, help="whole section (default 20000; --quick: 2000)")
    parser.add_argument("--long-steps", type=int, help="whole section (default 200000; --quick: 4000)")
    parser.add_argument("--scaling-examples", type=int, help="examples per scaling cell (default 400000; "
                                                             "--quick: 20000)")
    parser.add_argument("--scaling-compile", choices=("auto", "true", "false"), default="auto",
                        help="normlab's train.compile in the scaling cells (default: auto, normlab's choice)")
    parser.add_argument("--full-grid", action="store_true", help="scaling: every batch size at every depth")
    parser.add_argument("--many", type=int, help="configurations at once (default 32; --quick: 4)")
    parser.add_argument("--many-steps", type=int, help="steps of each configuration (default 30000; --quick: 1000)")
    parser.add_argument("--many-plain-steps", type=int, help="steps of the plain run whose steps/s is multiplied "
                                                             "(default 20000; --quick: 2000)")
    parser.add_argument("--target-plain-steps", type=int, help="the plain recipe of the target section: the whole "
                                                               "section's long plain run if it has these steps, "
                                                               "else a plain run in this process (default 200000; "
                                                               "--quick: 4000)")
    parser.add_argument("--quick", action="store_true", help="smoke test: small step counts, 2 scaling rows, M=4, "
                                                             "the lab's --quick; the ratios are then meaningless")
    args = parser.parse_args(argv)
    defaults = {"repeat": (3, 1), "repeat_long": (1, 1), "short_steps": (20_000, 2_000),
                "long_steps": (200_000, 4_000), "scaling_examples": (400_000, 20_000), "many": (32, 4),
                "many_steps": (30_000, 1_000), "many_plain_steps": (20_000, 2_000),
                "target_plain_steps": (200_000, 4_000)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main() -> None:
    args = parse_args()
    results: dict = {"quick": args.quick, "data": args.data or "bundled", "sections": args.sections,
                     "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "load_before": os.getloadavg(), "machine": platform.machine()}
    if args.quick:
        print("QUICK RUN: small step counts for a smoke test; the ratios and met/NOT met below are meaningless")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch's default threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}; data: {_data_path(args)}", flush=True)
    results["kernel"] = _compile_kernel(args)
    if "whole" in args.sections:
        results["whole"] = section_whole(args)
    if "scaling" in args.sections:
        results["scaling"] = section_scaling(args)
    if "many" in args.sections:
        results["many"] = section_many(args)
    if "target" in args.sections:
        plain_seconds = None
        if "whole" in results and args.long_steps == args.target_plain_steps:
            plain_seconds = results["whole"]["long"]["runs"]["plain"][0]["training_s"]
        results["target"] = section_target(args, plain_seconds)
    if "lab" in args.sections:
        results["lab"] = section_lab(args)
    print("\n== issue 15's targets" + (" (QUICK RUN: meaningless)" if args.quick else "") + " ==")
    for target in TARGETS:
        print(target.line())
    results["targets"] = {target.name: target.json() for target in TARGETS}
    results["load_after"] = os.getloadavg()
    print(json.dumps({"benchmark": "speed", **results}))


if __name__ == "__main__":
    main()
