"""The run directory: what it writes reads back exactly, and what does not match its config is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from normlab.config import config_for_preset
from normlab.data import Vocab
from normlab.errors import CheckpointError
from normlab.model import build_model
from normlab.runs.metrics import read_metrics
from normlab.runs.rundir import RunDir
from normlab.training.optimizers import make_optimizer

VOCAB = Vocab(tuple(".abcdefghijklmnopqrstuvwxyz"))


@pytest.fixture
def run(tmp_path):
    config = config_for_preset("lesson-batchnorm", ["n_hidden=8", "optimizer=adamw"])
    return RunDir.create(tmp_path / "run", config, VOCAB)


def test_a_new_run_directory_refuses_a_folder_that_holds_files(tmp_path, run):
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        RunDir.create(run.path, run.config, VOCAB)
    opened = RunDir.open(run.path)
    assert opened.config == run.config and opened.vocab == VOCAB


def test_weights_and_optimizer_state_read_back_as_saved(run):
    model = build_model(run.config.model, len(VOCAB))
    optimizer = make_optimizer(model.parameters(), run.config.train)
    model(torch.randint(0, 27, (16, 3))).sum().backward()
    optimizer.step()
    run.save_checkpoint(model.state_dict(), optimizer.state_dict(), 7)
    state, step = run.load_state()
    assert step == 7 and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    fresh = make_optimizer(build_model(run.config.model, len(VOCAB)).parameters(), run.config.train)
    fresh.load_state_dict(run.load_optimizer_state(7))
    for key, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            assert torch.equal(fresh.state_dict()["state"][key][name], value), (key, name)
    with pytest.raises(CheckpointError, match="from step 7 but the model is from step 8"):
        run.load_optimizer_state(8)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("layers.2.weight"), "missing layers.2.weight"),
    (lambda s: s.update(extra=torch.zeros(1)), "unexpected extra"),
    (lambda s: s.update({"layers.2.weight": torch.zeros(8, 31)}), r"layers.2.weight is \(8, 31\) torch.float32, "
                                                                   r"expected \(8, 30\) torch.float32"),
    (lambda s: s.update({"layers.0.weight": torch.zeros(27, 10, dtype=torch.int32)}), "torch.int32, expected"),
])
def test_weights_that_do_not_match_the_config_are_refused_by_name(run, change, message):
    state = build_model(run.config.model, len(VOCAB)).state_dict()
    change(state)
    run.save_model(state, 3)
    with pytest.raises(CheckpointError, match=message):
        run.load_state()


def test_metrics_rows_read_back_and_a_bad_line_is_named(run):
    run.append_metrics({"step": 1, "val_loss": 2.5})
    assert read_metrics(run.path) == run.read_metrics() == [{"step": 1, "val_loss": 2.5}]
    with open(run.path / "metrics.jsonl", "a") as file:
        file.write("[1, 2]\n")
    with pytest.raises(CheckpointError, match="line 2 is not a JSON object"):
        run.read_metrics()
    (run.path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n{oops\n")
    with pytest.raises(CheckpointError, match="line 2 is not valid JSON"):
        run.read_metrics()
