"""Benchmark: the ddp engine on 1 and 2 ranks, per-rank BatchNorm against SyncBatchNorm, and what communication
costs.

The model is `lesson-batchnorm` (or `--preset`), trained with its SGD recipe on the bundled names, one global
batch of `--batch` examples a step. Ranks are processes of this machine started by torch's elastic launcher (gloo
on CPU; with `--device cuda`, NCCL, one GPU a rank). Variants, each timed over `--steps` steps after a warm-up,
the order rotated over `--repeats` rounds (medians reported), inside one launch per rank count:

    1 rank     reference      the one-process reference engine on the whole batch (the baseline)
    2 ranks    no-comm        each rank steps its own model on its half of the batch: no DDP, no collective (the
                              compute of a 2-rank step without its communication)
    2 ranks    ddp-batch      the ddp engine, per-rank BatchNorm: one gradient all-reduce a step
    2 ranks    ddp-sync       the ddp engine, SyncBatchNorm: also an all_gather and an all_reduce per norm layer

The communication share of a variant is 1 - (no-comm step time) / (its step time): the part of a step spent in
collectives and in waiting for the other rank. Prints a table and one JSON line.

    python benchmarks/distributed.py [--steps 2000] [--repeats 3] [--preset lesson-batchnorm] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from normlab.config import config_for_preset
from normlab.model import build_model
from normlab.runs.commands import load_data
from normlab.runs.launch import run_processes
from normlab.training import create_engine
from normlab.training.engines.distributed import rank_slice
from normlab.training.engines.reference import ReferenceEngine
from normlab.training.schedule import batch_table

WARMUP = 100


def _engine(variant: str, preset: str, batch: int, device: str) -> tuple[Any, slice]:
    """The engine of `variant` and the part of each global batch it takes."""
    import torch.distributed as dist

    config = config_for_preset(preset, [f"batch_size={batch}", f"device={device}"])
    vocab, splits = load_data(config)
    if variant in ("reference", "no-comm"):
        rank, world = (dist.get_rank(), dist.get_world_size()) if variant == "no-comm" else (0, 1)
        model = build_model(config.model, len(vocab), seed=config.train.seed)
        return ReferenceEngine(model, config.train, splits.train), rank_slice(batch, rank, world)
    config.model.norm = "syncbatch" if variant == "ddp-sync" else "batch"
    config.train.engine = "ddp"
    engine = create_engine([config.model], [config.train], len(vocab), splits.train)
    return engine, slice(None)


def _time(engine: Any, part: slice, steps: int, batch: int) -> float:
    """Seconds for `steps` steps after a warm-up, between barriers (so every rank has finished)."""
    import torch.distributed as dist

    indices = batch_table(1, 0, len(engine.x), batch)[:, None, part]  # (L, 1, B or B/W)
    rates = torch.full((1, 1), 0.1, dtype=torch.float64)
    for step in range(WARMUP):
        engine.run_steps(indices[step:step + 1], rates)
    dist.barrier()
    started = time.perf_counter()
    for step in range(steps):
        engine.run_steps(indices[(WARMUP + step) % len(indices)][None], rates)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - started


def measure(variants: list[str], steps: int, repeats: int, preset: str, batch: int, device: str
            ) -> dict[str, list[float]] | None:
    """On each rank of this launch: every variant `repeats` times, rotating the order; rank 0's steps/s."""
    import torch.distributed as dist

    from normlab.runs.ranks import joined

    torch.set_num_threads(1)
    with joined():
        rates: dict[str, list[float]] = {variant: [] for variant in variants}
        for round_ in range(repeats):
            for variant in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
                engine, part = _engine(variant, preset, batch, device)
                rates[variant].append(steps / _time(engine, part, steps, batch))
        return rates if dist.get_rank() == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="lesson-batchnorm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    common = (args.steps, args.repeats, args.preset, args.batch, args.device)
    one = run_processes(measure, (["reference"], *common), 1)[0]
    two = run_processes(measure, (["no-comm", "ddp-batch", "ddp-sync"], *common), 2)[0]
    rates = {variant: statistics.median(values) for variant, values in {**one, **two}.items()}
    spreads = {variant: [round(v, 1) for v in values] for variant, values in {**one, **two}.items()}
    share = {variant: 1 - rates[variant] / rates["no-comm"] for variant in ("ddp-batch", "ddp-sync")}
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    print(f"{args.preset}, global batch {args.batch}, {args.steps} steps x {args.repeats} rounds, {backend}, "
          f"torch {torch.__version__}, 1 thread a rank")
    print(f"{'ranks':>5}  {'variant':<10} {'steps/s':>9}  {'vs 1 rank':>9}  {'communication':>13}  rounds")
    for variant, ranks in (("reference", 1), ("no-comm", 2), ("ddp-batch", 2), ("ddp-sync", 2)):
        communication = f"{share[variant]:13.0%}" if variant in share else f"{'':13}"
        print(f"{ranks:>5}  {variant:<10} {rates[variant]:9.0f}  {rates[variant] / rates['reference']:8.2f}x  "
              f"{communication}  {spreads[variant]}")
    print(json.dumps({"benchmark": "distributed", "preset": args.preset, "batch": args.batch, "steps": args.steps,
                      "repeats": args.repeats, "backend": backend, "steps_per_s": {k: round(v, 1) for k, v in
                                                                                    rates.items()},
                      "communication_share": {k: round(v, 3) for k, v in share.items()},
                      "sync_vs_batch": round(rates["ddp-sync"] / rates["ddp-batch"], 3)}))


if __name__ == "__main__":
    main()
