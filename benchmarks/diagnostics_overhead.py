"""Benchmark: training time with a Monitor recording every step and every 100 steps, against no monitor.

Two models, each trained with SGD (lr 0.1) on batches of the bundled names drawn with a fixed seed:

- ``lesson``: normlab's ``lesson-batchnorm`` preset (normlab.nn layers, what ``normlab train --diagnose`` runs),
  batch 32; targets: every step <= 2x the unmonitored time, every 100 steps <= +2%;
- ``wide``: a realistic CPU model in torch.nn, four hidden layers of 1,024 (Linear, BatchNorm1d, Tanh), batch
  256; targets: every step <= 1.5x, every 100 steps <= +2%.

For each model three identical copies train in the same process (no monitor, ``Monitor(every=1)``,
``Monitor(every=100)``) in alternating blocks of steps, the order rotated every block, so that a shared
machine's changing load hits all alike. The ratio of each monitored variant is reported from the totals of wall
time and of the process's CPU time (which waiting for a core shared with other work does not count), and as the
median over the blocks of the ratio to the plain block next to it (robust to load spikes); the monitored totals
include the final ``close()``, which summarises the recording steps still pending. Runs on one torch thread
(``--threads``). Prints a table (paired median and [min-max] range of the per-block ratios, and the ratio of the
totals, for wall and CPU time), the load averages (``/proc/loadavg``) before and after each model, each target
with its paired median wall-time ratio and whether it is met, and one JSON line.

    python benchmarks/diagnostics_overhead.py [--models lesson wide] [--lesson-steps 20000] [--wide-steps 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from normlab.config import get_preset
from normlab.data import Vocab, load_words, make_splits
from normlab.diagnostics import Monitor
from normlab.model import build_model

DATA_BATCHES = 500
LEARNING_RATE = 0.1
TARGETS = {"lesson": (2.0, 0.02), "wide": (1.5, 0.02)}  # (every step: at most this ratio, every 100: overhead)


def lesson_model(vocab_size: int) -> tuple[nn.Module, int]:
    """normlab's lesson-batchnorm model, its context length."""
    config = get_preset("lesson-batchnorm").model
    return build_model(config, vocab_size, seed=0), config.block_size


def wide_model(vocab_size: int) -> tuple[nn.Module, int]:
    """Embedding, four [Linear(1024, no bias), BatchNorm1d, Tanh] layers and an output Linear, in torch.nn."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Embedding(vocab_size, 24), nn.Flatten()]
    width = 3 * 24
    for _ in range(4):
        layers += [nn.Linear(width, 1024, bias=False), nn.BatchNorm1d(1024), nn.Tanh()]
        width = 1024
    layers.append(nn.Linear(width, vocab_size))
    return nn.Sequential(*layers), 3


MODELS: dict[str, tuple[Callable[[int], tuple[nn.Module, int]], int]] = {
    "lesson": (lesson_model, 32),
    "wide": (wide_model, 256),
}


@dataclass
class Trainer:
    """One model under training, optionally monitored, that runs blocks of steps and times them."""

    model: nn.Module
    data: tuple[torch.Tensor, torch.Tensor]
    every: int | None
    step: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    blocks: list[float] = field(default_factory=list)
    cpu_blocks: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.monitor = Monitor(self.model, self.optimizer, every=self.every) if self.every else None

    def run(self, steps: int) -> None:
        """Train ``steps`` more steps, adding their wall time to the totals."""
        inputs, targets = self.data
        model, optimizer, monitor = self.model, self.optimizer, self.monitor
        started, cpu = time.perf_counter(), time.process_time()
        for step in range(self.step, self.step + steps):
            if monitor is not None:
                monitor.begin_step(step)
            loss = F.cross_entropy(model(inputs[step % DATA_BATCHES]), targets[step % DATA_BATCHES])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if monitor is not None:
                monitor.end_step(loss)
        self.blocks.append(time.perf_counter() - started)
        self.cpu_blocks.append(time.process_time() - cpu)
        self.wall_s += self.blocks[-1]
        self.cpu_s += self.cpu_blocks[-1]
        self.step += steps

    def finish(self) -> None:
        """Close the monitor, timing it as part of the last block (it summarises the pending steps)."""
        started, cpu = time.perf_counter(), time.process_time()
        if self.monitor is not None:
            self.monitor.close()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        self.blocks[-1] += elapsed
        self.cpu_blocks[-1] += cpu
        self.wall_s += elapsed
        self.cpu_s += cpu

    def reset(self) -> None:
        """Forget the timings so far (after the warm-up)."""
        self.wall_s, self.cpu_s, self.blocks, self.cpu_blocks = 0.0, 0.0, [], []


def batches(splits_train: tuple[torch.Tensor, torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DATA_BATCHES batches of ``batch`` examples drawn with a fixed seed."""
    inputs, targets = splits_train
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, len(inputs), (DATA_BATCHES, batch), generator=generator)
    return inputs[rows], targets[rows]


def measure(name: str, steps: int, block: int) -> dict:
    """Train the three variants of model ``name`` side by side; return its figures."""
    make, batch = MODELS[name]
    words = load_words()
    vocab = Vocab.from_words(words)
    _, block_size = make(len(vocab))
    data = batches(make_splits(words, vocab, block_size).train, batch)
    trainers = {variant: Trainer(make(len(vocab))[0], data, every) for variant, every in
                (("plain", None), ("every 1", 1), ("every 100", 100))}
    for trainer in trainers.values():  # allocator, thread pools, first-call costs
        trainer.run(max(block // 5, 20))
        trainer.reset()
    order = list(trainers.values())
    for number in range(-(-steps // block)):
        size = min(block, steps - number * block)
        for trainer in order[number % 3:] + order[: number % 3]:
            trainer.run(size)
    for trainer in trainers.values():
        trainer.finish()
    plain = trainers["plain"]
    figures = {"model": name, "steps": steps, "batch": batch, "blocks": len(plain.blocks),
               "step_ms": round(plain.wall_s / steps * 1e3, 4), "cpu_step_ms": round(plain.cpu_s / steps * 1e3, 4)}
    for variant in ("every 1", "every 100"):
        monitored = trainers[variant]
        paired = [m / p for m, p in zip(monitored.blocks, plain.blocks)]
        cpu_paired = [m / p for m, p in zip(monitored.cpu_blocks, plain.cpu_blocks)]
        figures[variant] = {
            "ratio": round(monitored.wall_s / plain.wall_s, 4),
            "paired_median_ratio": round(statistics.median(paired), 4),
            "paired_range": [round(min(paired), 4), round(max(paired), 4)],
            "cpu_ratio": round(monitored.cpu_s / plain.cpu_s, 4),
            "cpu_paired_median_ratio": round(statistics.median(cpu_paired), 4),
            "cpu_paired_range": [round(min(cpu_paired), 4), round(max(cpu_paired), 4)],
        }
    return figures


def loadavg() -> str:
    """The machine's load averages over 1, 5 and 15 minutes (``/proc/loadavg``), or ``?`` where unavailable."""
    try:
        with open("/proc/loadavg") as file:
            return " ".join(file.read().split()[:3])
    except OSError:
        return "?"


def verdicts(figures: dict) -> list[dict]:
    """Each target of one model with its ratio and whether it is met.

    The ratio judged is that of the total CPU times: waiting for a core shared with other work does not count
    in it, and unlike a median over blocks it counts the recording steps' costs that fall in a few blocks only
    (batches of statistics, histogram steps: with ``every=100`` most blocks hold none). The paired wall-time
    median and the range of the per-block CPU ratios come with it.
    """
    every_step, every_hundred = TARGETS[figures["model"]]
    rows = []
    for variant, limit in (("every 1", every_step), ("every 100", 1 + every_hundred)):
        ratio = figures[variant]["cpu_ratio"]
        rows.append({"model": figures["model"], "variant": variant, "target": limit, "ratio": ratio,
                     "cpu_range": figures[variant]["cpu_paired_range"],
                     "wall_paired_median": figures[variant]["paired_median_ratio"], "met": ratio <= limit})
    return rows


def main() -> None:
    """Run the benchmark and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["lesson", "wide"])
    parser.add_argument("--lesson-steps", type=int, default=20_000, help="training steps of each lesson variant")
    parser.add_argument("--wide-steps", type=int, default=1_000, help="training steps of each wide variant")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noisy)")
    args = parser.parse_args()
    if min(args.lesson_steps, args.wide_steps, args.threads) < 1:
        parser.error("--lesson-steps, --wide-steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    results, targets, loads = [], [], [loadavg()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {loads[0]}; "
          "ratios: monitored / unmonitored time, paired median over blocks [min-max]")
    header = f"{'model':8} {'steps':>6} {'batch':>5} {'step ms':>8}"
    print(f"{header}   {'every 1 (target)':>32}   {'every 100 (target)':>34}")
    for name in args.models:
        steps = args.lesson_steps if name == "lesson" else args.wide_steps
        figures = measure(name, steps, block=max(steps // 20, 10))
        results.append(figures)
        targets += verdicts(figures)
        loads.append(loadavg())
        every_step, every_hundred = TARGETS[name]
        one, hundred = figures["every 1"], figures["every 100"]
        for label, key, step_ms in (("wall", "", "step_ms"), ("cpu", "cpu_", "cpu_step_ms")):
            low, high = one[f"{key}paired_range"]
            low_h, high_h = hundred[f"{key}paired_range"]
            print(
                f"{name if label == 'wall' else '  cpu':8} {steps if label == 'wall' else '':>6} "
                f"{figures['batch'] if label == 'wall' else '':>5} {figures[step_ms]:>8.3f}   "
                f"{one[f'{key}paired_median_ratio']:5.2f}x [{low:4.2f}-{high:4.2f}] "
                f"(total {one[f'{key}ratio']:4.2f}x, <= {every_step}x)   "
                f"{hundred[f'{key}paired_median_ratio'] - 1:+6.1%} [{low_h - 1:+.1%} {high_h - 1:+.1%}] "
                f"(total {hundred[f'{key}ratio'] - 1:+.1%}, <= +{every_hundred:.0%})"
            )
    print(f"load average after: {loads[-1]}")
    for row in targets:
        low, high = row["cpu_range"]
        limit = f"<= {row['target']}x" if row["variant"] == "every 1" else f"<= +{row['target'] - 1:.0%}"
        print(f"target {row['model']:6} {row['variant']:9} {limit:8}: CPU time {row['ratio']:.3f}x (blocks "
              f"{low:.3f}-{high:.3f}; wall paired median {row['wall_paired_median']:.3f}x) "
              f"{'met' if row['met'] else 'UNMET'}")
    print(json.dumps({"benchmark": "diagnostics_overhead", "threads": args.threads, "loadavg": loads,
                      "targets": targets, "results": results}))

if __name__ == "__main__":
    main()
