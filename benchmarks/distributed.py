"""Benchmark: the ddp engine on 1 and 2 ranks, per-rank BatchNorm against SyncBatchNorm, and the share of a step
spent in communication.

The model is `lesson-batchnorm` (or `--preset`), trained with its SGD recipe on the bundled names, one global
batch of `--batch` examples a step. Ranks are processes of this machine started by torch's elastic launcher (gloo
on CPU; with `--device cuda`, NCCL, one GPU a rank). Variants, each timed over `--steps` steps after a warm-up,
the order rotated over `--repeats` rounds (medians reported), inside one launch per rank count:

    1 rank     reference      the one-process reference engine on the whole batch (the baseline)
    2 ranks    ddp-batch      the ddp engine, per-rank BatchNorm: one gradient all-reduce a step
    2 ranks    ddp-sync       the ddp engine, SyncBatchNorm: also an all_gather and an all_reduce per norm layer

Communication is timed where it happens: every `torch.distributed` collective the step calls (SyncBatchNorm's) is
wrapped in a timer, and DDP's gradient all-reduce runs through a comm hook that calls the same timed all-reduce
and waits for it (the lesson's models fill one gradient bucket, which DDP only sends at the end of the backward,
so waiting there hides no overlap). The communication share is that time over the step time, on rank 0: it
includes waiting for the other rank. Prints a table and one JSON line.

    python benchmarks/distributed.py [--steps 2000] [--repeats 3] [--preset lesson-batchnorm] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from normlab.config import config_for_preset
from normlab.model import build_model
from normlab.runs.commands import load_data
from normlab.runs.launch import run_processes
from normlab.training import create_engine
from normlab.training.engines.reference import ReferenceEngine
from normlab.training.schedule import batch_table

WARMUP = 100


class Collectives:
    """Seconds spent in torch.distributed's all_reduce and all_gather while `timing` (patched in, restored after)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        import torch.distributed as dist

        originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

        def timed(call: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return call(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - started
            return run

        for name, call in originals.items():
            setattr(dist, name, timed(call))
        try:
            yield
        finally:
            for name, call in originals.items():
                setattr(dist, name, call)


def _blocking_allreduce(state, bucket):  # no annotations: DDP checks them against its own (strings fail)
    """DDP's default gradient averaging, through `dist.all_reduce` (timed) and waited for here."""
    import torch.distributed as dist

    tensor = bucket.buffer()
    dist.all_reduce(tensor)
    tensor.div_(dist.get_world_size())
    future = torch.futures.Future()
    future.set_result(tensor)
    return future


def _engine(variant: str, preset: str, batch: int, device: str) -> Any:
    """The engine of `variant`."""
    config = config_for_preset(preset, [f"batch_size={batch}", f"device={device}"])
    vocab, splits = load_data(config)
    if variant == "reference":
        model = build_model(config.model, len(vocab), seed=config.train.seed)
        return ReferenceEngine(model, config.train, splits.train)
    config.model.norm = "syncbatch" if variant == "ddp-sync" else "batch"
    config.train.engine = "ddp"
    engine = create_engine([config.model], [config.train], len(vocab), splits.train)
    engine.ddp.register_comm_hook(None, _blocking_allreduce)
    return engine


def _time(engine: Any, steps: int, batch: int) -> tuple[float, float]:
    """Seconds for `steps` steps after a warm-up, between barriers (so every rank has finished), and the seconds
    of it spent in collectives."""
    import torch.distributed as dist

    indices = batch_table(1, 0, len(engine.x), batch)[:, None]  # (L, 1, B)
    rates = torch.full((1, 1), 0.1, dtype=torch.float64)
    for step in range(WARMUP):
        engine.run_steps(indices[step:step + 1], rates)
    collectives = Collectives()
    dist.barrier()
    started = time.perf_counter()
    with collectives.timing():
        for step in range(steps):
            engine.run_steps(indices[(WARMUP + step) % len(indices)][None], rates)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    dist.barrier()
    return elapsed, collectives.seconds


def measure(variants: list[str], steps: int, repeats: int, preset: str, batch: int, device: str
            ) -> dict[str, list[tuple[float, float]]] | None:
    """On each rank of this launch: every variant `repeats` times, rotating the order; rank 0's (steps/s,
    communication share) of each round."""
    import torch.distributed as dist

    from normlab.runs.ranks import joined

    torch.set_num_threads(1)
    with joined():
        results: dict[str, list[tuple[float, float]]] = {variant: [] for variant in variants}
        for round_ in range(repeats):
            for variant in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
                elapsed, communication = _time(_engine(variant, preset, batch, device), steps, batch)
                results[variant].append((steps / elapsed, communication / elapsed))
        return results if dist.get_rank() == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="lesson-batchnorm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    common = (args.steps, args.repeats, args.preset, args.batch, args.device)
    results = {**run_processes(measure, (["reference"], *common), 1)[0],
               **run_processes(measure, (["ddp-batch", "ddp-sync"], *common), 2)[0]}
    rates = {variant: statistics.median(rate for rate, _ in rounds) for variant, rounds in results.items()}
    shares = {variant: statistics.median(share for _, share in rounds) for variant, rounds in results.items()}
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    print(f"{args.preset}, global batch {args.batch}, {args.steps} steps x {args.repeats} rounds, {backend}, "
          f"torch {torch.__version__}, 1 thread a rank")
    print(f"{'ranks':>5}  {'variant':<10} {'steps/s':>9}  {'vs 1 rank':>9}  {'communication':>13}  steps/s by round")
    for variant, ranks in (("reference", 1), ("ddp-batch", 2), ("ddp-sync", 2)):
        print(f"{ranks:>5}  {variant:<10} {rates[variant]:9.0f}  {rates[variant] / rates['reference']:8.2f}x  "
              f"{shares[variant]:13.0%}  {[round(rate) for rate, _ in results[variant]]}")
    print(json.dumps({"benchmark": "distributed", "preset": args.preset, "batch": args.batch, "steps": args.steps,
                      "repeats": args.repeats, "backend": backend,
                      "steps_per_s": {k: round(v, 1) for k, v in rates.items()},
                      "communication_share": {k: round(v, 3) for k, v in shares.items()},
                      "sync_vs_batch": round(rates["ddp-sync"] / rates["ddp-batch"], 3)}))

if __name__ == "__main__":
    main()
