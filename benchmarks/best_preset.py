"""Quality benchmark: the `best` preset against the lesson's WaveNet, loss against wall time.

Trains each preset as a whole process (`python -m normlab train --preset P --out RUNS/P`, exactly what a user
runs), times it from launch to exit with the machine's load average before and after, reads the run's
`metrics.jsonl` (train/val loss on fixed 10,000-example subsets every eval_every steps, with the seconds since
training started; the full-split train/val/test losses in the final row) and prints a table and one JSON line.
With --plot it draws the val loss against wall time for every preset to a PNG.

    python benchmarks/best_preset.py --data ../shared/anchors/names.txt --plot docs/images/best_preset.png
    python benchmarks/best_preset.py                                   # the bundled names
    python benchmarks/best_preset.py --presets best --runs runs/bench   # keep the run directories
    python benchmarks/best_preset.py --reuse --runs runs/bench --plot best.png   # re-read finished runs only

The target (issue 15): `best` reaches val loss ≤ 1.95 (full val split) on the lesson's file and split in ≤ 10
minutes on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_VAL, TARGET_SECONDS = 1.95, 600.0
LESSON_WAVENET_VAL = 1.993  # the lesson's published WaveNet val loss, on its file and split


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (empty where /proc is missing)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def read_metrics(run: Path) -> tuple[list[dict], dict | None]:
    """The periodic rows of `run/metrics.jsonl` and its final row (None if the run did not finish)."""
    rows, final = [], None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("event") == "final":
            final = row
        elif "val_loss" in row:
            rows.append(row)
    return rows, final


def train(preset: str, run: Path, data: str | None, extra: list[str]) -> dict:
    """Train `preset` into `run` in a fresh process; its wall time (launch to exit) and the load around it."""
    command = [sys.executable, "-m", "normlab", "train", "--preset", preset, "--out", str(run), "--quiet", *extra]
    if data:
        command += ["--data", data]
    load_before, started = load_average(), time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stdout}{completed.stderr}")
    return {"wall_s": round(seconds, 1), "load_before": load_before, "load_after": load_average()}


def summarise(preset: str, run: Path, timing: dict) -> dict:
    rows, final = read_metrics(run)
    if final is None:
        sys.exit(f"{run} has no final row: the run did not finish (train it again without --reuse)")
    config = json.loads((run / "config.json").read_text())
    return {"preset": preset, "run": str(run), "steps": final["step"], "train": round(final["train"], 4),
            "val": round(final["val"], 4), "test": round(final["test"], 4),
            "train_s": rows[-1]["elapsed_s"] if rows else None, **timing,
            "data_sha256": config["data"].get("sha256"),
            "curve": [[row["elapsed_s"], row["step"], round(row["val_loss"], 4)] for row in rows]}


def plot(results: list[dict], path: str, data: str | None) -> None:
    """Val loss (10,000-example subset) against seconds of training, one line per preset; each run's full-split
    val loss as a marker at its process's wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for result in results:
        seconds = [point[0] for point in result["curve"]]
        losses = [point[2] for point in result["curve"]]
        line, = axes.plot(seconds, losses, marker=".", label=f"{result['preset']} (val subset during training)")
        axes.plot([result["wall_s"]], [result["val"]], marker="*", markersize=14, color=line.get_color(),
                  linestyle="none", label=f"{result['preset']}: full val split {result['val']:.4f} at "
                                          f"{result['wall_s']:.0f} s (process wall time)")
    axes.axhline(TARGET_VAL, color="grey", linestyle="--", linewidth=1, label=f"target val ≤ {TARGET_VAL}")
    axes.axhline(LESSON_WAVENET_VAL, color="grey", linestyle=":", linewidth=1,
                 label=f"lesson's WaveNet val {LESSON_WAVENET_VAL}")
    axes.axvline(TARGET_SECONDS, color="grey", linestyle="-.", linewidth=1, label="10 minutes")
    axes.set_xscale("log")
    axes.set_ylim(1.9, 2.35)
    axes.set_xlabel("seconds since training started (log scale)")
    axes.set_ylabel("val loss")
    axes.set_title(f"val loss against wall time, {Path(data).name if data else 'bundled names'}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="words file (default: the bundled names)")
    parser.add_argument("--presets", nargs="+", default=["best", "wavenet"])
    parser.add_argument("--runs", help="folder for the run directories, RUNS/PRESET (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="read runs already finished in --runs, train none")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every `normlab train` (e.g. --set steps=2000 for a quick look)")
    parser.add_argument("--plot", help="PNG of val loss against wall time")
    args = parser.parse_args()
    if args.reuse and not args.runs:
        parser.error("--reuse needs --runs")

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(args.runs or temporary)
        results = []
        for preset in args.presets:
            run = root / preset
            if args.reuse:
                timing = json.loads((run / "benchmark_timing.json").read_text())
            else:
                if run.exists():
                    sys.exit(f"{run} exists: remove it, or pass --reuse to read it")
                run.parent.mkdir(parents=True, exist_ok=True)
                extra = [part for item in args.set for part in ("--set", item)]
                timing = train(preset, run, args.data, extra)
                (run / "benchmark_timing.json").write_text(json.dumps(timing))
            results.append(summarise(preset, run, timing))
            result = results[-1]
            print(f"{preset:>10}: train {result['train']:.4f}  val {result['val']:.4f}  test {result['test']:.4f}  "
                  f"{result['steps']:,} steps  {result['wall_s']:.0f} s wall (training {result['train_s']:.0f} s)  "
                  f"load {result['load_before']} -> {result['load_after']}", flush=True)
        if args.plot:
            plot(results, args.plot, args.data)
    print(json.dumps({"benchmark": "best_preset", "data": args.data or "bundled", "cpus": os.cpu_count(),
                      "results": [{k: v for k, v in r.items() if k != "curve"} for r in results]}))


if __name__ == "__main__":
    main()
