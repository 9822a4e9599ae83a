"""The stacked engine against the reference engine (the specification), and the choice between them."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from normlab.config import ModelConfig, TrainConfig, get_preset
from normlab.diagnostics import metrics as m
from normlab.errors import ConfigError
from normlab.model import build_model
from normlab.training import LoopEvents, choose_engine, create_engine, train_loop
from normlab.training.engines import lockstep_key
from normlab.training.optimizers import make_optimizer

from .helpers import TRAIN_XY, VAL_XY, VOCAB, random_examples

BASE = TrainConfig(steps=60, batch_size=16, eval_every=30, checkpoint_every=1000, eval_examples=100)


def _train(models, configs, dtype=torch.float64, every=None, data=(TRAIN_XY, VAL_XY)):
    engine = create_engine(models, configs, VOCAB, data[0], dtype=dtype)
    if every is not None:
        engine.attach_monitors(every)
    rows = {i: [] for i in range(len(models))}
    train_loop(engine, configs, *data, progress=False,
               events=LoopEvents(log=lambda i, row: rows[i].append(row)))
    engine.close()
    return engine, rows


@pytest.mark.parametrize("changes", [
    {},
    {"momentum": 0.9, "weight_decay": 1e-3, "schedule": "cosine", "warmup_steps": 10},
    {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1, "grad_clip": 0.5},
])
def test_stacked_models_follow_their_reference_runs(changes):
    models = [dataclasses.replace(get_preset("lesson-batchnorm").model, n_hidden=24, bn_momentum=m)
              for m in (0.1, 0.01, 0.3)]
    configs = [dataclasses.replace(BASE, seed=seed, lr=lr, engine="stacked",
                                   **{k: v for k, v in changes.items() if k != "lr"})
               for seed, lr in ((1, changes.get("lr", 0.1)), (2, changes.get("lr", 0.05)), (3, 0.02))]
    stacked, logged = _train(models, configs)
    for i, (model, config) in enumerate(zip(models, configs)):
        reference, rows = _train([model], [dataclasses.replace(config, engine="reference")])
        for (name, a), b in zip(reference.model_state(0).items(), stacked.model_state(i).values()):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=name)
        assert [r["step"] for r in rows[0]] == [r["step"] for r in logged[i]] == [30, 60]
        for row, other in zip(rows[0], logged[i]):
            assert row["val_loss"] == pytest.approx(other["val_loss"], rel=1e-9)
        # the stacked optimizer's state, in torch's format, loads into torch's own optimizer and equals its state
        exported = stacked.optimizer_state(i)
        optimizer = make_optimizer(build_model(model, VOCAB).double().parameters(), config)
        optimizer.load_state_dict(exported)
        for key, values in reference.optimizer_state(0)["state"].items():
            for name, value in values.items():
                torch.testing.assert_close(optimizer.state_dict()["state"][key][name].to(value), value, rtol=1e-9,
                                           atol=1e-10)


@pytest.mark.parametrize("preset, norm", [("lesson-batchnorm", "batchrenorm"), ("lesson-batchnorm", "group"),
                                          ("wavenet", "batch"), ("wavenet", "batchrenorm"), ("wavenet", "layer")])
def test_stacked_norms_follow_their_reference_runs(preset, norm):
    model = dataclasses.replace(get_preset(preset).model, n_hidden=24, norm=norm, norm_groups=4,
                                renorm_hold_steps=10, renorm_warmup_steps=20, renorm_r_max=1.5, renorm_d_max=0.5)
    train_xy, val_xy = (random_examples(800, 0, model.block_size), random_examples(200, 1, model.block_size))
    config = dataclasses.replace(BASE, momentum=0.9)
    stacked, _ = _train([model], [dataclasses.replace(config, engine="stacked")], data=(train_xy, val_xy))
    reference, _ = _train([model], [dataclasses.replace(config, engine="reference")], data=(train_xy, val_xy))
    for (name, a), b in zip(reference.model_state(0).items(), stacked.model_state(0).values()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("preset, changes, batch_size", [
    ("lesson-batchnorm", {}, 16),
    ("lesson-batchnorm", {"activation": "relu", "n_layers": 2}, 12),  # 1/B is not a power of two
    ("lesson-kaiming", {"output_bias": False}, 16),  # no norm: hidden biases
    ("lesson-kaiming", {"hidden_bias": False, "activation": "relu"}, 16),
    ("wavenet", {}, 16),
])
def test_one_model_with_plain_sgd_takes_the_single_model_step_and_follows_its_reference_run(preset, changes,
                                                                                            batch_size):
    """One model, plain SGD, uncompiled: `SingleModelSGD` (2-D views, fused kernels, updates folded into the
    products) gives the reference engine's weights, buffers and losses within float64 rounding."""
    model = dataclasses.replace(get_preset(preset).model, n_hidden=24, **changes)
    data = (random_examples(800, 0, model.block_size), random_examples(200, 1, model.block_size))
    config = dataclasses.replace(BASE, batch_size=batch_size, compile=False)
    stacked, logged = _train([model], [dataclasses.replace(config, engine="stacked")], data=data)
    assert stacked._single is not None  # the dedicated step ran
    reference, rows = _train([model], [dataclasses.replace(config, engine="reference")], data=data)
    for (name, a), b in zip(reference.model_state(0).items(), stacked.model_state(0).values()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=name)
    for row, other in zip(rows[0], logged[0]):
        assert row["train_loss"] == pytest.approx(other["train_loss"], rel=1e-9)


@pytest.mark.parametrize("norm", ["none", "batch", "layer", "rms"])
def test_stacked_diagnostics_equal_the_reference_engines_in_float64(norm):
    """The Monitor's statistics on the stacked engine (twins) equal those recorded on the reference engine."""
    model = dataclasses.replace(get_preset("lesson-kaiming").model, n_hidden=24, norm=norm)
    config = dataclasses.replace(BASE, optimizer="adamw", lr=1e-2, grad_clip=1.0)
    recorded = {}
    for name in ("reference", "stacked"):
        engine, _ = _train([model], [dataclasses.replace(config, engine=name)], every=7)
        recorded[name] = engine.monitors[0].diagnostics
    reference, stacked = recorded["reference"], recorded["stacked"]
    assert reference.steps() == stacked.steps() == list(range(0, 60, 7))
    expected = {(step, layer, metric): value for step, layer, metric, value in reference.rows()}
    actual = {(step, layer, metric): value for step, layer, metric, value in stacked.rows()}
    assert expected.keys() == actual.keys() and any(key[2] == "update_to_data" for key in expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key


@pytest.mark.parametrize("changes", [{"momentum": 0.9}, {"optimizer": "adamw", "lr": 1e-2, "grad_clip": 0.5}])
def test_a_recording_step_on_the_stacked_engine_leaves_every_model_and_optimizer_as_it_found_them(changes):
    """The stacked models take the observed step on trial only: their weights, batch norm buffers and optimizer
    state afterwards are bit for bit those before, and the monitors recorded the step (update included)."""
    model = dataclasses.replace(get_preset("lesson-batchnorm").model, n_hidden=24)
    configs = [dataclasses.replace(BASE, seed=seed, engine="stacked", **changes) for seed in (1, 2)]
    engine = create_engine([model, model], configs, VOCAB, TRAIN_XY, dtype=torch.float64)
    engine.run_steps(torch.randint(0, len(TRAIN_XY[0]), (3, 2, 16)), torch.full((3, 2), 0.1))  # momentum, moments
    engine.attach_monitors(1)
    before = [(engine.model_state(i), engine.optimizer_state(i)) for i in range(2)]
    before = [({k: v.clone() for k, v in m.items()}, torch.utils._pytree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, o)) for m, o in before]
    assert engine.record_step(3, torch.randint(0, len(TRAIN_XY[0]), (2, 16)), torch.tensor([0.1, 0.05])) is None
    for i, (model_state, optimizer_state) in enumerate(before):
        for name, value in engine.model_state(i).items():
            assert torch.equal(value, model_state[name]), name
        for key, values in engine.optimizer_state(i)["state"].items():
            for name, value in values.items():
                expected = optimizer_state["state"][key][name]
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(expected)), (key, name)
        diagnostics = engine.monitors[i].diagnostics
        assert diagnostics.steps() == [3]
        assert diagnostics.value("", m.LEARNING_RATE, 3) == pytest.approx([0.1, 0.05][i])
        assert diagnostics.layers(m.UPDATE_TO_DATA)
    engine.close()


def test_compiled_calls_follow_the_eager_steps_and_a_later_engine_loads_the_cached_kernel():
    """The compiled calls of ten steps (AOTInductor) against one step at a time, in float32: equal within
    rounding; a second engine of the same configuration loads the kernel from the cache (no compilation) and
    repeats the first compiled run exactly; a damaged kernel file is not used but rebuilt."""
    from normlab.training.engines.stacked.kernels import cache_dir

    model = dataclasses.replace(get_preset("lesson-batchnorm").model, n_hidden=24)
    results = []
    for compile in (False, True, None):
        config = dataclasses.replace(BASE, steps=40, eval_every=40, momentum=0.9, compile=compile, engine="stacked")
        probe = create_engine([model], [config], VOCAB, TRAIN_XY)  # what the run's engine will do
        assert probe.compiled == (compile is not False)
        assert probe.compiling == (compile is True)  # auto: the kernel the previous run built, though 40 steps
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine, _ = _train([model], [config], dtype=None)
        if any("compiling the training steps failed" in str(w.message) for w in caught):
            pytest.skip("AOTInductor is not available here (no C++ compiler?): the eager path is used instead")
        results.append(engine.model_state(0))
    kernels = list(cache_dir().glob(f"{engine._key}.pt2"))
    assert len(kernels) == 1
    for (name, a), b, c in zip(results[0].items(), results[1].values(), results[2].values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(b, c), name
    kernels[0].write_bytes(b"not a kernel")
    assert create_engine([model], [dataclasses.replace(config, compile=True)], VOCAB, TRAIN_XY).compiling


def test_the_stacked_engine_starts_from_and_returns_reference_state_dicts():
    models = [dataclasses.replace(get_preset("lesson-batchnorm").model, n_hidden=8)] * 2
    states = [build_model(m, VOCAB, seed=s).state_dict() for m, s in zip(models, (1, 2))]
    engine = create_engine(models, [dataclasses.replace(BASE, engine="stacked")] * 2, VOCAB, TRAIN_XY, states=states)
    for index, state in enumerate(states):
        mine = engine.model_state(index)
        assert list(mine) == list(state)
        for key in state:
            assert torch.equal(mine[key], state[key]), key
        module = engine.modules()[index]
        for key, value in module.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_auto_chooses_the_stacked_engine_where_it_runs_and_the_reference_elsewhere():
    train = TrainConfig()
    assert choose_engine(get_preset("lesson-batchnorm").model, train) == "stacked"
    assert choose_engine(get_preset("wavenet").model, train) == "stacked"
    assert choose_engine(get_preset("lesson-batchnorm").model.__class__(norm="ghostbatch"), train) == "reference"
    assert choose_engine(get_preset("lesson-deep").model, train) == "reference"
    assert choose_engine(get_preset("lesson-batchnorm").model, TrainConfig(engine="reference")) == "reference"
    with pytest.raises(ConfigError, match="engine=stacked cannot run a norm after the output layer"):
        choose_engine(get_preset("lesson-deep").model, TrainConfig(engine="stacked"))


def test_dropout_runs_on_the_reference_engine_and_the_stacked_engine_refuses_it():
    model = dataclasses.replace(get_preset("best").model, dropout=0.1)
    assert choose_engine(model, TrainConfig()) == "reference"
    assert lockstep_key(model, TrainConfig()) is None  # it trains alone in a sweep
    with pytest.raises(ConfigError, match=r"^train.engine=stacked cannot run dropout \(model.dropout=0.1\): use "
                                          "engine=auto or engine=reference$"):
        choose_engine(model, TrainConfig(engine="stacked"))
    assert choose_engine(dataclasses.replace(model, dropout=0.0), TrainConfig()) == "stacked"


def test_models_trained_at_once_must_share_the_architecture_and_the_shared_train_fields():
    with pytest.raises(ConfigError, match="share their architecture"):
        create_engine([ModelConfig(n_hidden=8), ModelConfig(n_hidden=9)], [BASE, BASE], VOCAB, TRAIN_XY)
    with pytest.raises(ConfigError, match="share their architecture"):
        create_engine([ModelConfig()] * 2, [BASE, dataclasses.replace(BASE, batch_size=8)], VOCAB, TRAIN_XY)


@pytest.mark.parametrize("changes", [{}, {"momentum": 0.9, "weight_decay": 1e-3},
                                     {"optimizer": "adamw", "lr": 3e-3, "beta1": 0.8, "weight_decay": 0.1}])
def test_the_written_out_param_group_settings_equal_torchs(changes):
    from normlab.training.optimizers import param_group_defaults

    config = dataclasses.replace(BASE, **changes)
    group = dict(make_optimizer([torch.nn.Parameter(torch.zeros(1))], config).param_groups[0])
    del group["params"]
    assert param_group_defaults(config) == group
