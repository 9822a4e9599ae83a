"""The sweep runner against the reference: every run of a sweep ends where the reference engine alone ends it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from normlab.config import ModelConfig, TrainConfig
from normlab.data import Vocab, load_words, make_splits
from normlab.errors import ConfigError
from normlab.model import build_model
from normlab.sweeps.runner import SweepRun, run_sweep
from normlab.training import LoopEvents, evaluate, train_loop
from normlab.training.engines.reference import ReferenceEngine

MODEL = ModelConfig(n_embd=4, n_hidden=16, init="kaiming", output_weight_scale=0.1, output_bias_scale=0.0)
TRAIN = TrainConfig(steps=120, batch_size=8, eval_every=40, eval_examples=200, checkpoint_every=1000)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32 over 120 steps: the stacked engine's rounding differs slightly


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as the sweep uses: on a busy 2-core machine a second thread slows small models down a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data(words_file):
    words = load_words(words_file)
    vocab = Vocab.from_words(words)
    return vocab, make_splits(words, vocab, 3)


def _alone(run: SweepRun, splits, vocab_size: int):
    """The reference: the run trained by itself on the reference engine; (model, rows, divergences)."""
    model = build_model(run.model, vocab_size, seed=run.train.seed)
    if run.prepare is not None:
        run.prepare(model)
    rows: list[dict] = []
    engine = ReferenceEngine(model, run.train, splits.train)
    diverged = train_loop(engine, [run.train], splits.train, splits.val, progress=False,
                          events=LoopEvents(log=lambda _, row: rows.append(row)))
    return model, rows, diverged


def _runs() -> list[SweepRun]:
    """Two stackable groups (no norm: three runs; BatchNorm: two), and a run only the reference engine takes."""
    return [SweepRun("none lr 0.1", MODEL, TRAIN),
            SweepRun("none lr 0.3 seed 5", MODEL, dataclasses.replace(TRAIN, lr=0.3, seed=5)),
            SweepRun("none relu", dataclasses.replace(MODEL, activation="relu", weight_scale=0.5), TRAIN),
            SweepRun("batch", dataclasses.replace(MODEL, norm="batch"), TRAIN),
            SweepRun("batch momentum", dataclasses.replace(MODEL, norm="batch", bn_momentum=0.01),
                     dataclasses.replace(TRAIN, momentum=0.9)),
            SweepRun("residual", dataclasses.replace(MODEL, n_layers=2, residual=True), TRAIN)]


def _assert_same(result, model, rows, splits) -> None:
    for (name, expected), actual in zip(model.state_dict().items(), result.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, **TOLERANCE, msg=name)
    assert [row["step"] for row in result.rows] == [row["step"] for row in rows]
    for mine, theirs in zip(result.rows, rows):
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)
    assert result.train_loss == pytest.approx(evaluate(model, *splits.train), rel=1e-4)
    assert result.val_loss == pytest.approx(evaluate(model, *splits.val), rel=1e-4)
    assert result.diverged_at is None


def test_a_sweep_ends_every_run_where_training_it_alone_ends(data):
    vocab, splits = data
    runs = _runs()
    results = run_sweep(runs, splits, len(vocab), progress=False, keep_models=True, group_size=2)
    assert [r.name for r in results] == [run.name for run in runs]
    assert [r.engine for r in results] == ["stacked"] * 5 + ["reference"]
    for run, result in zip(runs, results):
        model, rows, _ = _alone(run, splits, len(vocab))
        _assert_same(result, model, rows, splits)


def test_two_processes_give_the_results_of_one(data):
    vocab, splits = data
    runs = _runs()[:4]
    one = run_sweep(runs, splits, len(vocab), progress=False, processes=1)
    two = run_sweep(runs, splits, len(vocab), progress=False, processes=2)
    for a, b in zip(one, two):
        assert (a.name, a.train_loss, a.val_loss, a.rows[-1]["val_loss"]) == (b.name, b.train_loss, b.val_loss,
                                                                              b.rows[-1]["val_loss"])


@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_a_diverged_run_is_a_result_with_its_step_and_the_others_go_on(data, engine):
    vocab, splits = data
    exploding = dataclasses.replace(TRAIN, lr=1e38, engine=engine)  # the first updates overflow float32
    runs = [SweepRun("explodes", MODEL, exploding), SweepRun("fine", MODEL, dataclasses.replace(TRAIN, engine=engine))]
    results = run_sweep(runs, splits, len(vocab), progress=False, keep_models=True)
    _, _, diverged = _alone(dataclasses.replace(runs[0], train=dataclasses.replace(exploding, engine="reference")),
                            splits, len(vocab))
    assert results[0].diverged_at == diverged[0].step
    assert math.isnan(results[0].train_loss) and math.isnan(results[0].val_loss)
    model, rows, _ = _alone(runs[1], splits, len(vocab))
    _assert_same(results[1], model, rows, splits)


def test_snapshots_hold_the_model_after_each_requested_step(data):
    vocab, splits = data
    run = SweepRun("one", MODEL, dataclasses.replace(TRAIN, schedule="constant"))  # 40 steps: the first 40 of 120
    result = run_sweep([run], splits, len(vocab), progress=False, keep_models=True, snapshot_steps=[0, 40, 120])
    assert sorted(result[0].snapshots) == [0, 40, 120]
    initial = build_model(MODEL, len(vocab), seed=TRAIN.seed)
    partial, _, _ = _alone(dataclasses.replace(run, train=dataclasses.replace(run.train, steps=40)), splits,
                           len(vocab))
    for expected, step in ((initial, 0), (partial, 40), (result[0].model, 120)):
        for (name, a), b in zip(expected.state_dict().items(), result[0].snapshot(step).state_dict().values()):
            torch.testing.assert_close(b, a, **TOLERANCE, msg=f"step {step}: {name}")


def test_final_losses_on_subsets_use_at_most_that_many_examples(data):
    vocab, splits = data
    result = run_sweep([SweepRun("one", MODEL, TRAIN)], splits, len(vocab), progress=False, keep_models=True,
                       final_examples=50)[0]
    keep = torch.randperm(len(splits.val[0]), generator=torch.Generator().manual_seed(2))[:50]
    assert result.val_loss == pytest.approx(evaluate(result.model, splits.val[0][keep], splits.val[1][keep]))


@pytest.mark.parametrize(("runs", "options", "message"), [
    ([], {}, "at least one run"),
    ([SweepRun("a", MODEL, TRAIN), SweepRun("a", MODEL, TRAIN)], {}, "repeated: a"),
    ([SweepRun("a", MODEL, TRAIN)], {"snapshot_steps": [500]}, r"snapshot steps \[500\]"),
    ([SweepRun("a", MODEL, TRAIN)], {"processes": 0}, "processes must be at least 1"),
    ([SweepRun("a", dataclasses.replace(MODEL, norm="batchnorm"), TRAIN)], {}, "model.norm='batchnorm'"),
])
def test_bad_sweeps_are_refused_before_any_training(data, runs, options, message):
    vocab, splits = data
    with pytest.raises(ConfigError, match=message):
        run_sweep(runs, splits, len(vocab), progress=False, **options)
