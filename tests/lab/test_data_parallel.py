"""data-parallel in tiny mode (from the shared `tiny_lab` run: one launch of two gloo processes): what holds at
any budget because it is the same computation, whatever the noise of a short run."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def measured(tiny_lab) -> dict:
    out, _ = tiny_lab
    return json.loads((out / "data-parallel" / "result.json").read_text(encoding="utf-8"))["measurements"]


def test_syncbatchnorm_and_layernorm_give_the_one_process_result_at_every_rank_count(measured):
    assert measured["ranks"] == [1, 2]
    for norm in ("syncbatch", "layer"):
        one, two = measured["val_loss"][norm]
        assert two == pytest.approx(one, abs=1e-4), norm
    one, two = measured["stats_error"]["syncbatch"]
    assert two == pytest.approx(one, rel=1e-3)


def test_per_rank_batchnorm_on_two_ranks_is_ghost_batchnorm_of_the_per_rank_size(measured):
    # ghost batches of 8 (the per-rank batch at 2 ranks): on 2 ranks each rank holds one ghost batch, so the two
    # norms compute the same thing there, running statistics included
    assert measured["val_loss"]["ghostbatch"][1] == pytest.approx(measured["val_loss"]["batch"][1], abs=1e-4)
    assert measured["stats_error"]["ghostbatch"][1] == pytest.approx(measured["stats_error"]["batch"][1], rel=1e-3)
    assert measured["stats_error"]["batch"][1] > measured["stats_error"]["batch"][0]  # smaller slices: noisier
