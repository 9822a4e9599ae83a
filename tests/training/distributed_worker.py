"""What each of the two gloo processes of `test_distributed.py` runs: the scenarios below on the ddp engine,
through the one training loop, saving each rank's batch losses and final state to `rank<r>.pt`."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from normlab.config import TrainConfig, get_preset
from normlab.errors import ConfigError
from normlab.training import LoopEvents, create_engine, train_loop

from .helpers import TRAIN_XY, VAL_XY, VOCAB

WORLD_SIZE = 2
TRAIN = TrainConfig(steps=200, batch_size=16, lr=0.1, lr_decay_step=120, eval_every=100, checkpoint_every=1000,
                    eval_examples=100, seed=3)
DEEP = dataclasses.replace(get_preset("lesson-deep").model, n_hidden=12, n_layers=2, n_embd=4)
SCENARIOS = {
    # every batch norm synchronised (the output norm too), SGD with momentum and clipping
    "syncbatch": (dataclasses.replace(DEEP, norm="syncbatch"), dataclasses.replace(TRAIN, momentum=0.9, grad_clip=1.0)),
    # per-rank BatchNorm, AdamW
    "batch": (dataclasses.replace(DEEP, norm="batch", output_norm=False),
              dataclasses.replace(TRAIN, optimizer="adamw", lr=3e-3, weight_decay=0.1)),
    # dropout between the two hidden layers, each rank its own masks; a per-example norm, plain SGD
    "dropout": (dataclasses.replace(DEEP, norm="layer", output_norm=False, dropout=0.3), TRAIN),
}


RECORD_EVERY = 50  # the syncbatch scenario also records diagnostics


def train(model_config, train_config, dtype=torch.float64, every=None):
    """Train one run with `create_engine`'s choice of engine; (engine, batch losses (steps,), eval rows). With
    `every`, a Monitor records every that many steps (`engine.monitors[0].diagnostics` after)."""
    engine = create_engine([model_config], [train_config], VOCAB, TRAIN_XY, dtype=dtype)
    if every is not None:
        engine.attach_monitors(every)
    losses, rows = [], []
    run_steps = engine.run_steps

    def recording(indices, rates):
        out = run_steps(indices, rates)
        losses.append(out.clone())
        return out

    record_step = engine.record_step

    def recorded(step, indices, rates):
        out = record_step(step, indices, rates)
        if out is not None:
            losses.append(out.clone())
        return out

    engine.run_steps, engine.record_step = recording, recorded
    train_loop(engine, [train_config], TRAIN_XY, VAL_XY, progress=False,
               events=LoopEvents(log=lambda _, row: rows.append(row)))
    engine.close()
    return engine, torch.cat(losses).view(-1), rows


def _agreement(rank: int) -> dict:
    """`agree` on crafted windows: rank 0 holds a NaN, rank 1 alone was asked to stop."""
    engine = create_engine([SCENARIOS["batch"][0]], [TRAIN], VOCAB, TRAIN_XY)
    window = torch.tensor([[1.0], [float("nan")]]) if rank == 0 else torch.tensor([[3.0], [1.0]])
    losses, stop = engine.agree(window, stop=rank == 1)
    try:
        create_engine([SCENARIOS["batch"][0]], [dataclasses.replace(TRAIN, batch_size=15)], VOCAB, TRAIN_XY)
        error = None
    except ConfigError as refused:
        error = str(refused)
    return {"losses": losses, "stop": stop, "engine": type(engine).__name__, "error": error}


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    """Join the gloo group, run every scenario and the agreement check, save this rank's results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, (model_config, train_config) in SCENARIOS.items():
            every = RECORD_EVERY if name == "syncbatch" else None
            engine, losses, rows = train(model_config, train_config, every=every)
            results[name] = {"losses": losses, "rows": rows, "state": engine.model_state(0)}
            if every is not None:
                results[name]["diagnostics"] = engine.monitors[0].diagnostics.rows()
        results["agree"] = _agreement(rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
