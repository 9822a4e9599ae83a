"""Run configuration: presets, `--set` overrides with type conversion, and the JSON round trip."""

from __future__ import annotations

import pytest

from normlab.config import RunConfig, apply_override, config_for_preset
from normlab.errors import ConfigError


def test_preset_train_settings_apply():
    config = config_for_preset("wavenet")
    assert config.train.lr_decay_step == 150_000 and config.model.block_size == 8


def test_overrides_convert_to_each_fields_type():
    config = config_for_preset("lesson-batchnorm", ["n_hidden=300", "train.lr=0.05", "grad_clip=1",
                                                    "residual=true", "hidden_bias=null", "steps=2e5",
                                                    "data.split_seed=7", "optimizer=adamw", "model.dropout=0.1",
                                                    "n_layers=2"])
    assert config.model.n_hidden == 300 and config.train.lr == 0.05 and config.train.grad_clip == 1.0
    assert config.model.residual is True and config.model.hidden_bias is None
    assert config.train.steps == 200_000 and isinstance(config.train.steps, int)
    assert config.data.split_seed == 7 and config.train.optimizer == "adamw"
    assert config.model.dropout == 0.1 and config_for_preset("lesson-batchnorm", ["dropout=0"]).model.dropout == 0.0


@pytest.mark.parametrize("item, message", [
    ("n_hidden=2.5", "expected int"),
    ("residual=maybe", "expected bool"),
    ("model.lr=0.1", "unknown key 'model.lr'"),
    ("training.lr=0.1", "unknown section 'training'"),
    ("optimizer=rmsprop", "train.optimizer='rmsprop' is not one of"),
    ("steps=0", "train.steps must be at least 1"),
    ("lr=-1", "train.lr must be a positive number"),
    ("model.dropout=1", r"model.dropout must be in \[0, 1\), got 1.0: use e.g. --set model.dropout=0.1"),
    ("dropout=-0.1", r"model.dropout must be in \[0, 1\)"),
    ("dropout=NaN", "model.dropout must be a finite number"),
    ("dropout=0.1", "model.dropout=0.1 acts between hidden layers, so it needs n_layers of 2 or more, got 1: raise "
                    "model.n_layers or set model.dropout=0"),
])
def test_bad_overrides_name_the_problem(item, message):
    with pytest.raises(ConfigError, match=message):
        config_for_preset("lesson-batchnorm", [item])


def test_json_round_trip_and_unknown_keys():
    config = config_for_preset("lesson-deep", ["n_hidden=64"])
    assert RunConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="unknown key model.wings"):
        RunConfig.from_dict({"model": {"wings": 2}})


def test_apply_override_needs_key_equals_value():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(RunConfig(), "n_hidden")


def test_run_config_defaults_are_the_lesson_original_preset():
    config = RunConfig()
    assert config.preset == "lesson-original" and config == config_for_preset("lesson-original")


def test_presets_train_parts_are_typed_and_complete():
    from normlab.config import PRESETS, TrainConfig

    for name, preset in PRESETS.items():
        assert isinstance(preset.train, TrainConfig), name
        preset.train.validate()


def test_run_directories_written_with_train_fast_still_load():
    raw = RunConfig().to_dict()
    del raw["train"]["engine"]
    raw["train"]["fast"] = False
    assert RunConfig.from_dict(raw).train.engine == "reference"
    raw["train"]["fast"] = True
    assert RunConfig.from_dict(raw).train.engine == "auto"


def test_engine_is_validated():
    with pytest.raises(ConfigError, match="train.engine='turbo' is not one of auto, reference, stacked"):
        config_for_preset("lesson-batchnorm", ["engine=turbo"])
