"""`normlab export`: the exported weights, folded or not, give the run's eval-mode logits, by a forward pass
written here with plain tensor operations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_command, user_error
from safetensors import safe_open
from safetensors.torch import load_file

from normlab.cli import main
from normlab.runs.export import load_exported
from normlab.runs.rundir import RunDir


@pytest.fixture
def trained_run(tmp_path, words_file):
    out = tmp_path / "run"
    assert tiny_command("train", "lesson-batchnorm", out, words_file) == 0
    return out


def _run_logits(run_path, x):
    model, _ = RunDir.open(run_path).load_model()
    with torch.no_grad():
        return model.eval()(x)


def _contexts(run_path) -> torch.Tensor:
    return torch.randint(0, len(RunDir.open(run_path).vocab), (64, 3), generator=torch.Generator().manual_seed(0))


def test_folded_export_reproduces_the_eval_mode_logits(trained_run, tmp_path, capsys):
    out = tmp_path / "folded.safetensors"
    assert main(["export", str(trained_run), "--fold", "--out", str(out)]) == 0
    assert "folded 1 batch norm(s) into the Linear before them: layers.3" in capsys.readouterr().out
    weights = load_file(out)
    assert not any("running" in key for key in weights)  # no batch norm left
    x = _contexts(trained_run)
    # Embedding -> Flatten -> Linear (BatchNorm folded in: now with a bias) -> Tanh -> Linear, by hand
    hidden = torch.tanh(weights["layers.0.weight"][x].flatten(1) @ weights["layers.2.weight"].T
                        + weights["layers.2.bias"])
    logits = hidden @ weights["layers.5.weight"].T + weights["layers.5.bias"]
    torch.testing.assert_close(logits, _run_logits(trained_run, x), rtol=0, atol=1e-5)
    model, vocab = load_exported(out)
    torch.testing.assert_close(model(x), logits, rtol=0, atol=1e-6)
    assert vocab == RunDir.open(trained_run).vocab
    with safe_open(str(out), framework="pt") as file:
        metadata = file.metadata()
    assert json.loads(metadata["folded"]) == ["layers.3"] and json.loads(metadata["model"])["norm"] == "batch"
    assert metadata["step"] == "120" and metadata["calibrated"] == "false"


def test_an_unfolded_export_holds_the_run_weights(trained_run, tmp_path, capsys):
    assert main(["calibrate", str(trained_run)]) == 0
    out = tmp_path / "plain.safetensors"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    assert "(BatchNorm-calibrated)" in capsys.readouterr().out
    state, _ = RunDir.open(trained_run).load_state()
    weights = load_file(out)
    assert weights.keys() == state.keys() and all(torch.equal(weights[key], state[key]) for key in state)
    x = _contexts(trained_run)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)[0](x), _run_logits(trained_run, x), rtol=0, atol=0)


def test_export_refuses_to_replace_a_file_unless_forced(trained_run, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    out.write_bytes(b"precious")
    assert main(["export", str(trained_run), "--out", str(out)]) == 2
    assert "already exists: pass --force" in user_error(capsys)
    assert out.read_bytes() == b"precious"
    assert main(["export", str(trained_run), "--out", str(out), "--force"]) == 0
    assert main(["export", str(trained_run), "--out", str(tmp_path / "weights.pt")]) == 2
    assert "must end in .safetensors" in user_error(capsys)
    assert main(["export", str(trained_run), "--out", str(tmp_path / "no" / "w.safetensors")]) == 2
    assert "does not exist: create it first" in user_error(capsys)
