"""The stacked training loop against the reference loop (`train.train` on separate normlab models)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from normlab.fast import train_stacked
from normlab.model import ModelConfig, build_model, get_preset
from normlab.stacked import StackedMLP
from normlab.stacked_optim import StackedOptimizer
from normlab.train import TrainConfig, TrainEvents, make_optimizer, train

VOCAB = 27


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, 3), generator=generator), torch.randint(0, VOCAB, (n,), generator=generator)


TRAIN, VAL = _data(800, 0), _data(200, 1)
BASE = TrainConfig(steps=60, batch_size=16, eval_every=30, checkpoint_every=1000, eval_examples=100)


def _reference(model_config: ModelConfig, config: TrainConfig):
    model = build_model(model_config, VOCAB, seed=config.seed).double()
    rows: list[dict] = []
    optimizer = train(model, TRAIN, VAL, config, progress=False, events=TrainEvents(log=rows.append))
    return model, optimizer, rows


@pytest.mark.parametrize("changes", [
    {},
    {"momentum": 0.9, "weight_decay": 1e-3, "schedule": "cosine", "warmup_steps": 10},
    {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1, "grad_clip": 0.5},
])
def test_stacked_runs_follow_their_reference_runs(changes):
    model_configs = [dataclasses.replace(get_preset("lesson-batchnorm").model, n_hidden=24, bn_momentum=m)
                     for m in (0.1, 0.01, 0.3)]
    configs = [dataclasses.replace(BASE, seed=seed, lr=lr, **{k: v for k, v in changes.items() if k != "lr"})
               for seed, lr in ((1, changes.get("lr", 0.1)), (2, changes.get("lr", 0.05)), (3, 0.02))]
    models = [build_model(m, VOCAB, seed=c.seed).double() for m, c in zip(model_configs, configs)]
    stacked = StackedMLP.from_models(models, model_configs)
    logged: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    optimizer = StackedOptimizer(stacked, configs)
    train_stacked(stacked, TRAIN, VAL, configs, optimizer=optimizer, progress=False,
                  log=lambda i, row: logged[i].append(row))
    for i, (model_config, config) in enumerate(zip(model_configs, configs)):
        reference, reference_optimizer, rows = _reference(model_config, config)
        mine = stacked.to_models()[i]
        for (name, a), b in zip(reference.state_dict().items(), mine.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=name)
        for row, other in zip(rows, logged[i]):
            assert row["step"] == other["step"]
            assert row["val_loss"] == pytest.approx(other["val_loss"], rel=1e-9)
        exported = optimizer.state_dict_for(i, make_optimizer(mine, config))
        for key, values in reference_optimizer.state_dict()["state"].items():
            for name, value in values.items():
                torch.testing.assert_close(exported["state"][key][name].to(value), value, rtol=1e-9, atol=1e-10)


def test_optimizer_state_survives_export_and_import():
    model_configs = [dataclasses.replace(get_preset("lesson-batchnorm").model, n_hidden=8)] * 2
    configs = [dataclasses.replace(BASE, optimizer="adamw", lr=1e-2, steps=5, seed=s) for s in (1, 2)]
    stacked = StackedMLP.build(model_configs, VOCAB, [1, 2])
    optimizer = StackedOptimizer(stacked, configs)
    train_stacked(stacked, TRAIN, VAL, configs, optimizer=optimizer, progress=False)
    models = stacked.to_models()
    states = [optimizer.state_dict_for(i, make_optimizer(m, c)) for i, (m, c) in enumerate(zip(models, configs))]
    restored = StackedOptimizer(StackedMLP.from_models(models, model_configs), configs)
    restored.load_state_dicts(states, 5)
    assert int(restored.step_count) == 5
    for mine, theirs in zip(restored.buffers, optimizer.buffers):
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)


def test_one_diverging_model_does_not_stop_the_others_when_recording():
    model_configs = [get_preset("lesson-original").model] * 2
    configs = [dataclasses.replace(BASE, lr=lr) for lr in (1e38, 0.01)]  # the first overflows float32
    stacked = StackedMLP.build(model_configs, VOCAB, [0, 0])
    diverged = train_stacked(stacked, TRAIN, VAL, configs, on_divergence="record", progress=False)
    assert list(diverged) == [0]
    assert torch.isfinite(stacked.output_weight[1]).all()


def test_compiled_chunks_follow_the_eager_steps():
    """The torch.compile'd path (steps in chunks) against the eager one, in float32: equal within rounding."""
    model_config = dataclasses.replace(get_preset("lesson-batchnorm").model, n_hidden=24)
    results = []
    for compile in (False, True):
        config = dataclasses.replace(BASE, steps=40, eval_every=40, momentum=0.9, compile=compile)
        stacked = StackedMLP.build([model_config], VOCAB, [config.seed])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_stacked(stacked, TRAIN, VAL, [config], progress=False, chunk_size=4)
        if any("torch.compile failed" in str(w.message) for w in caught):
            pytest.skip("torch.compile is not available here (no C++ compiler?): the eager path is used instead")
        results.append(stacked.to_models()[0])
    assert counters["stats"]["unique_graphs"] >= 1  # the chunks really ran through torch.compile
    for (name, a), b in zip(results[0].state_dict().items(), results[1].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
