"""Benchmark: training wall time with and without ``normlab.diagnostics.Monitor(every=100)``.

The model is a plain ``torch.nn`` twin of the lesson-batchnorm recipe: Embedding(27, 10), flatten 3 positions,
Linear(30, 200, bias=False), BatchNorm1d(200, momentum=0.001), Tanh, Linear(200, 27); SGD with lr 0.1,
batch 32, random int tokens of a fixed seed as data. Both variants train in the same process, alternating
which goes first over ``--repeats`` rounds, on ``--threads`` torch threads (default 1: a tiny model gains
nothing from more, and on a shared machine more threads make the timings noisy). The minimum wall time of
each variant is compared (the least disturbed run on a shared machine). Also reports the cost of one
recording step, from a separate run with ``every=1``. Target: overhead at most 5%. Prints a table and one
JSON line.

    python benchmarks/diagnostics_overhead.py [--steps 20000] [--every 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import Monitor

VOCAB, CONTEXT, EMBEDDING, HIDDEN, BATCH, LEARNING_RATE = 27, 3, 10, 200, 32, 0.1
DATA_BATCHES = 1000


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The lesson-batchnorm model in plain torch.nn, and its SGD optimizer."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Embedding(VOCAB, EMBEDDING),
        nn.Flatten(),
        nn.Linear(CONTEXT * EMBEDDING, HIDDEN, bias=False),
        nn.BatchNorm1d(HIDDEN, momentum=0.001),
        nn.Tanh(),
        nn.Linear(HIDDEN, VOCAB),
    )
    return model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)


def train(steps: int, every: int | None, seed: int = 0) -> tuple[float, float]:
    """Train ``steps`` steps (with a Monitor when ``every`` is given); returns (wall seconds, final loss)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, VOCAB, (DATA_BATCHES, BATCH, CONTEXT), generator=generator)
    targets = torch.randint(0, VOCAB, (DATA_BATCHES, BATCH), generator=generator)
    model, optimizer = build(seed)
    monitor = Monitor(model, optimizer, every=every) if every is not None else None
    start = time.perf_counter()
    for step in range(steps):
        x, y = inputs[step % DATA_BATCHES], targets[step % DATA_BATCHES]
        if monitor is not None:
            monitor.begin_step(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.end_step(loss)
    elapsed = time.perf_counter() - start
    if monitor is not None:
        monitor.close()
    return elapsed, loss.item()


def main() -> None:
    """Run the benchmark and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recording-steps", type=int, default=300, help="steps of the every=1 run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noisy)")
    args = parser.parse_args()
    if min(args.steps, args.every, args.repeats, args.recording_steps, args.threads) < 1:
        parser.error("--steps, --every, --repeats, --recording-steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    train(200, None)  # warm-up: allocator, thread pools, first-call costs
    train(200, 1)
    plain, monitored = [], []
    for repeat in range(args.repeats):
        order = (None, args.every) if repeat % 2 == 0 else (args.every, None)
        for every in order:
            (plain if every is None else monitored).append(train(args.steps, every)[0])
    per_step_plain = min(plain) / args.steps
    recording, _ = train(args.recording_steps, 1)
    plain_short, _ = train(args.recording_steps, None)
    recording_step_ms = (recording - plain_short) / args.recording_steps * 1e3
    overhead = min(monitored) / min(plain) - 1

    print(
        f"lesson-batchnorm twin, {args.steps} steps, batch {BATCH}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"  no monitor        : {', '.join(f'{t:.2f}' for t in plain)} s  (min {min(plain):.2f} s, "
        f"{per_step_plain * 1e3:.3f} ms/step)"
    )
    print(
        f"  Monitor(every={args.every:<4}): {', '.join(f'{t:.2f}' for t in monitored)} s  "
        f"(min {min(monitored):.2f} s)"
    )
    print(f"  overhead          : {overhead:+.2%} (target <= +5%)")
    print(f"  one recording step: {recording_step_ms:.2f} ms on top of a {per_step_plain * 1e3:.3f} ms step")
    print(
        json.dumps(
            {
                "benchmark": "diagnostics_overhead",
                "steps": args.steps,
                "every": args.every,
                "repeats": args.repeats,
                "plain_s": plain,
                "monitored_s": monitored,
                "overhead_ratio": round(overhead, 4),
                "recording_step_ms": round(recording_step_ms, 3),
                "plain_step_ms": round(per_step_plain * 1e3, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
