"""The ddp engine on two gloo processes (one spawn for the module) against one process on the whole batch, in
float64 over 200 steps: SyncBatchNorm follows the one-process BatchNorm run step for step, and per-rank BatchNorm
equals one process with ghost batches of the per-rank size (the same normalisation, computed in another way)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from normlab.model import build_model, dropout_seed
from normlab.training.schedule import batch_table

from . import distributed_worker as worker
from .helpers import TRAIN_XY, VOCAB, with_torch_dropout

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for the one-process runs, as each rank has: a second one only slows a tiny model down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results, from one spawn of two gloo processes."""
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker.run_rank, args=(str(folder / "store"), str(folder)), nprocs=worker.WORLD_SIZE, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(worker.WORLD_SIZE)]


def _one_process(name: str, **model_changes):
    model_config, train_config = worker.SCENARIOS[name]
    model_config = dataclasses.replace(model_config, **model_changes)
    return worker.train(model_config, dataclasses.replace(train_config, engine="reference"))


def test_two_ranks_with_syncbatchnorm_follow_the_one_process_batchnorm_run(ranks):
    engine, losses, rows = _one_process("syncbatch", norm="batch")
    got = [rank["syncbatch"] for rank in ranks]
    mean_of_ranks = (got[0]["losses"] + got[1]["losses"]) / 2  # each rank's loss is over its half of the batch
    assert len(losses) == len(mean_of_ranks) == 200
    torch.testing.assert_close(mean_of_ranks, losses, rtol=1e-10, atol=1e-12)
    for rank in got:  # weights and running statistics of every rank
        assert list(rank["state"]) == list(engine.model_state(0))
        for key, value in engine.model_state(0).items():
            torch.testing.assert_close(rank["state"][key], value, rtol=1e-9, atol=1e-11, msg=key)
        assert [row["val_loss"] for row in rank["rows"]] == pytest.approx([row["val_loss"] for row in rows],
                                                                             rel=1e-9)


def test_the_monitor_on_two_ranks_records_the_statistics_of_the_whole_batch(ranks):
    """Recorded on the ddp engine (reduced over both ranks) as on one process with the whole batch."""
    model_config, train_config = worker.SCENARIOS["syncbatch"]
    engine, _, _ = worker.train(dataclasses.replace(model_config, norm="batch"),
                                dataclasses.replace(train_config, engine="reference"), every=worker.RECORD_EVERY)
    expected = {(step, layer, metric): value for step, layer, metric, value in engine.monitors[0].diagnostics.rows()}
    got = {(step, layer, metric): value for step, layer, metric, value in ranks[0]["syncbatch"]["diagnostics"]}
    assert got.keys() == expected.keys() and any(key[2] == "update_to_data" for key in got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert ranks[1]["syncbatch"]["diagnostics"] == []  # rank 1 reduces with rank 0 and keeps nothing


def test_per_rank_batchnorm_equals_ghost_batches_of_the_per_rank_size(ranks):
    engine, losses, _ = _one_process("batch", norm="ghostbatch", ghost_batch_size=8)
    got = [rank["batch"] for rank in ranks]
    torch.testing.assert_close((got[0]["losses"] + got[1]["losses"]) / 2, losses, rtol=1e-10, atol=1e-12)
    for key, value in engine.model_state(0).items():
        if "running" in key or "num_batches" in key:  # one update per chunk on one process, one per rank here
            continue
        for rank in got:
            torch.testing.assert_close(rank["state"][key], value, rtol=1e-9, atol=1e-11, msg=key)
    norm = next(key for key in engine.model_state(0) if key.endswith("running_mean"))
    assert not torch.allclose(got[0]["state"][norm], got[1]["state"][norm])  # each rank its own statistics


def test_with_dropout_each_rank_drops_with_its_own_masks_and_the_ranks_keep_one_model(ranks):
    """A plain float64 loop replays the two ranks: each half of the batch through torch's dropout with the global
    generator seeded `dropout_seed(seed, step, rank, layer)`, the gradient of the mean of the two halves' losses."""
    model_config, config = worker.SCENARIOS["dropout"]
    model = build_model(model_config, VOCAB, seed=config.seed).double()
    dropouts = with_torch_dropout(model)
    assert len(dropouts) == 1
    x, y = TRAIN_XY
    indices = batch_table(config.seed, 0, len(x), config.batch_size)
    half = config.batch_size // 2
    for step in range(config.steps):
        losses = []
        for rank in range(2):
            index = indices[step, rank * half:(rank + 1) * half]
            dropouts[0].seed = dropout_seed(config.seed, step, rank, 0)
            losses.append(F.cross_entropy(model(x[index]), y[index]))
        model.zero_grad(set_to_none=True)
        ((losses[0] + losses[1]) / 2).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= (0.1 if step < 120 else 0.01) * p.grad
    for rank in ranks:
        state = rank["dropout"]["state"]
        for key, value in model.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-11, msg=key)


def test_ranks_agree_on_the_mean_loss_and_on_a_stop_asked_of_one_rank(ranks):
    for rank in ranks:
        agreed = rank["agree"]
        assert agreed["engine"] == "DistributedEngine"  # engine=auto under a group of two processes
        assert agreed["losses"][0, 0] == 2.0 and torch.isnan(agreed["losses"][1, 0])
        assert agreed["stop"] is True


def test_a_batch_the_ranks_cannot_split_evenly_is_refused(ranks):
    assert "train.batch_size=15 must be divisible by the 2 processes" in ranks[0]["agree"]["error"]
