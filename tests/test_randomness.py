"""Randomness flows from explicit seeds and generators: nothing in normlab touches torch's global random state."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SETTINGS

from normlab.config import config_for_preset
from normlab.runs.commands import calibrate_run, evaluate_run, inspect_preset, sample_run, start_training


@pytest.mark.parametrize("engine, dropout", [("stacked", 0.0), ("reference", 0.0), ("reference", 0.2)])
def test_building_training_sampling_and_evaluating_leave_the_global_state_alone(tmp_path, words_file, engine,
                                                                                 dropout):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    config = config_for_preset("lesson-batchnorm", [*TINY_SETTINGS, f"engine={engine}", f"dropout={dropout}",
                                                       "n_layers=2"])
    config.data.path = str(words_file)
    run = tmp_path / "run"
    start_training(config, run, diagnose=True, every=40, calibrate=True, progress=False)
    sample_run(run, 5, seed=3)
    evaluate_run(run, "test")
    calibrate_run(run)
    inspect_preset(config, batch_size=16)
    assert torch.equal(torch.get_rng_state(), state)
