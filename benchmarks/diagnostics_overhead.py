"""Benchmark: training time with and without ``normlab.diagnostics.Monitor(every=100)``, side by side.

The model is normlab's ``lesson-batchnorm`` preset (normlab.nn layers, the reference path that ``normlab train
--diagnose`` uses), trained with SGD at lr 0.1 and batch 32 on batches of the bundled names drawn with a fixed
seed. Two identical models train in the same process, one
without and one with a Monitor, in alternating blocks of ``--block`` steps (the order swapped every block),
so that a shared machine's changing load hits both alike. Reports wall and CPU time per variant (the monitored
one including the final ``close()``, which summarises the recording steps still pending), the overhead ratio
(target: at most +5%) from the totals and as the median over pairs of neighbouring blocks (robust to load
spikes), and the cost of one recording step: its capture (the median recording step minus the median other
step) and in all (the mean recording step, batched summaries and final close included, minus the median
other step).
Runs on ``--threads`` torch threads (default 1: a tiny model gains nothing from more, and on a shared machine
more threads make the timings noisy). Prints a table and one JSON line.

    python benchmarks/diagnostics_overhead.py [--steps 20000] [--every 100] [--block 500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from normlab.config import config_for_preset
from normlab.diagnostics import Monitor
from normlab.model import build_model
from normlab.runs.commands import load_data

BATCH, LEARNING_RATE, DATA_BATCHES = 32, 0.1, 1000
CONFIG = config_for_preset("lesson-batchnorm")
VOCAB, SPLITS = load_data(CONFIG)


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """normlab's lesson-batchnorm model and its SGD optimizer."""
    model = build_model(CONFIG.model, len(VOCAB), seed=seed)
    return model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)


@dataclass
class Trainer:
    """One model under training, optionally monitored, that can run a block of steps and time it."""

    every: int | None
    seed: int = 0
    step: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    closing_s: float = 0.0
    blocks: list[float] = field(default_factory=list)
    recording_steps: list[float] = field(default_factory=list)
    other_steps: list[float] = field(default_factory=list)
    data: tuple[torch.Tensor, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        x, y = SPLITS.train
        index = torch.randint(0, len(x), (DATA_BATCHES, BATCH), generator=generator)
        self.data = (x[index], y[index])
        self.model, self.optimizer = build(self.seed)
        self.monitor = Monitor(self.model, self.optimizer, every=self.every) if self.every else None

    def run(self, steps: int) -> None:
        """Train ``steps`` more steps, adding their wall and CPU time to the totals."""
        inputs, targets = self.data
        model, optimizer, monitor = self.model, self.optimizer, self.monitor
        wall, cpu = time.perf_counter(), time.process_time()
        for step in range(self.step, self.step + steps):
            started = time.perf_counter()
            x, y = inputs[step % DATA_BATCHES], targets[step % DATA_BATCHES]
            recording = monitor is not None and monitor.begin_step(step)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if monitor is not None:
                monitor.end_step(loss)
            (self.recording_steps if recording else self.other_steps).append(time.perf_counter() - started)
        self.blocks.append(time.perf_counter() - wall)
        self.wall_s += self.blocks[-1]
        self.cpu_s += time.process_time() - cpu
        self.step += steps

    def finish(self) -> None:
        """Close the monitor, timing it as part of the last block (it summarises the pending steps)."""
        wall, cpu = time.perf_counter(), time.process_time()
        if self.monitor is not None:
            self.monitor.close()
        self.closing_s = time.perf_counter() - wall
        self.blocks[-1] += self.closing_s
        self.wall_s += self.closing_s
        self.cpu_s += time.process_time() - cpu

    def reset(self) -> None:
        """Forget the timings so far (after the warm-up)."""
        self.wall_s = self.cpu_s = 0.0
        self.blocks, self.recording_steps, self.other_steps = [], [], []


def main() -> None:
    """Run the benchmark and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000, help="training steps of each variant")
    parser.add_argument("--every", type=int, default=100, help="the monitor records every N steps")
    parser.add_argument("--block", type=int, default=500, help="steps per block of the alternation")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noisy)")
    args = parser.parse_args()
    if min(args.steps, args.every, args.block, args.threads) < 1:
        parser.error("--steps, --every, --block and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    plain, monitored = Trainer(None), Trainer(args.every)
    for warm_up in (plain, monitored):  # allocator, thread pools, first-call costs
        warm_up.run(200)
        warm_up.reset()
    blocks = -(-args.steps // args.block)
    for block in range(blocks):
        size = min(args.block, args.steps - block * args.block)
        for trainer in (plain, monitored) if block % 2 == 0 else (monitored, plain):
            trainer.run(size)
    plain.finish()
    monitored.finish()

    wall_overhead = monitored.wall_s / plain.wall_s - 1
    cpu_overhead = monitored.cpu_s / plain.cpu_s - 1
    # each monitored block against the plain block next to it: robust to the machine's load changing
    paired_overhead = (
        statistics.median(m / p for m, p in zip(monitored.blocks, plain.blocks, strict=True)) - 1
    )
    recordings = len(monitored.recording_steps)
    other_step = statistics.median(monitored.other_steps)
    capture_ms = (statistics.median(monitored.recording_steps) - other_step) * 1e3
    recording_ms = (statistics.mean(monitored.recording_steps) - other_step + monitored.closing_s / recordings) * 1e3
    step_ms = statistics.median(plain.other_steps) * 1e3
    print(
        f"lesson-batchnorm (normlab reference path), {args.steps} steps per variant in blocks of {args.block}, "
        f"batch {BATCH}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    plain_line = f"wall {plain.wall_s:7.2f} s  cpu {plain.cpu_s:7.2f} s  ({step_ms:.3f} ms/step)"
    print(f"  no monitor         : {plain_line}")
    print(
        f"  Monitor(every={args.every:<4}): wall {monitored.wall_s:7.2f} s  cpu {monitored.cpu_s:7.2f} s  "
        f"({recordings} recording steps)"
    )
    print(
        f"  overhead           : wall {wall_overhead:+.2%}  cpu {cpu_overhead:+.2%}  "
        f"median of paired blocks {paired_overhead:+.2%}  (target <= +5%)"
    )
    print(
        f"  one recording step : {recording_ms:.2f} ms on top of a {step_ms:.3f} ms step, its statistics "
        f"included (capture alone: {capture_ms:.2f} ms, median)"
    )
    record = {
        "benchmark": "diagnostics_overhead",
        "steps": args.steps,
        "every": args.every,
        "block": args.block,
        "plain_wall_s": round(plain.wall_s, 4),
        "monitored_wall_s": round(monitored.wall_s, 4),
        "plain_cpu_s": round(plain.cpu_s, 4),
        "monitored_cpu_s": round(monitored.cpu_s, 4),
        "overhead_wall": round(wall_overhead, 4),
        "overhead_cpu": round(cpu_overhead, 4),
        "overhead_paired_median": round(paired_overhead, 4),
        "recording_step_ms": round(recording_ms, 3),
        "capture_ms": round(capture_ms, 3),
        "plain_step_ms": round(step_ms, 4),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
