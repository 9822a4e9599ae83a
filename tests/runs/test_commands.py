"""The commands as library calls: which engine trains, what it records, and that state needs no detours."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest
import torch
from conftest import TINY_SETTINGS, tiny_command, user_error
from safetensors.torch import load_file

from normlab.cli import main
from normlab.config import TrainConfig, config_for_preset
from normlab.model import LanguageModel, build_model
from normlab.runs.commands import calibrate_run, load_data, start_training
from normlab.runs.rundir import RunDir

from .helpers import assert_same_checkpoint, checkpoint_file


def _config(words_file, *extra):
    config = config_for_preset("lesson-batchnorm", [*TINY_SETTINGS, *extra])
    config.data.path = str(words_file)
    return config


@pytest.mark.parametrize("preset, engine", [("lesson-batchnorm", "stacked"), ("lesson-deep", "reference")])
def test_diagnose_records_every_statistic_on_the_engine_the_config_chooses(tmp_path, words_file, preset, engine):
    config = config_for_preset(preset, [*TINY_SETTINGS, "n_layers=2" if preset == "lesson-deep" else "n_layers=1"])
    config.data.path = str(words_file)
    outcome = start_training(config, tmp_path / "run", diagnose=True, every=20, progress=False)
    assert outcome.engine == engine and outcome.report.is_file()
    with open(tmp_path / "run" / "diagnostics" / "scalars.csv") as file:
        rows = list(csv.DictReader(file))
    assert {int(row["step"]) for row in rows} == set(range(0, 120, 20))
    assert {"act_std", "grad_std", "grad_to_data", "update_to_data"} <= {row["metric"] for row in rows}


def test_checkpoints_of_the_stacked_engine_build_no_modules(tmp_path, words_file, monkeypatch):
    built = []
    original = LanguageModel.__init__

    def counting(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(not next(self.parameters()).is_meta)  # models on the meta device (shapes only) cost nothing

    monkeypatch.setattr(LanguageModel, "__init__", counting)
    counts = []
    for every in ("120", "10"):  # one checkpoint, then twelve
        built.clear()
        start_training(_config(words_file, f"checkpoint_every={every}"), tmp_path / every, progress=False)
        counts.append(sum(built))
    assert counts[0] == counts[1] == 2  # the initial draw, and the module the final losses are measured on


def _train(out, words_file, *extra):
    return tiny_command("train", "lesson-batchnorm", out, words_file, *extra)


def test_set_data_path_trains_on_that_file_like_data(tmp_path, words_file, capsys):
    other = tmp_path / "other.txt"
    other.write_text("xavier\nxena\nxiomara\nzuzu\nzelda\nxander\nzoe\nxylia\nzara\nzion\nxeno\n")
    args = ["train", "--preset", "lesson-kaiming", "--out", str(tmp_path / "a"), "--quiet", "--set", "steps=10"]
    assert main([*args, "--set", f"data.path={other}"]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["data"]["path"] == str(other.resolve())
    assert config["data"]["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    expected = "." + "".join(sorted(set(other.read_text()) - {"\n"}))
    assert "".join(json.loads((tmp_path / "a" / "vocab.json").read_text())["itos"]) == expected


def test_a_changed_words_file_makes_eval_sample_and_calibrate_warn_naming_it(tmp_path, words_file, capsys):
    out = tmp_path / "run"
    assert _train(out, words_file) == 0
    words_file.write_text(words_file.read_text().replace("emma\n", "emma\nemmy\n"))
    capsys.readouterr()
    for command in (["eval", str(out)], ["sample", str(out), "-n", "2"], ["calibrate", str(out)]):
        assert main(command) == 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"normlab: warning: the words file {words_file.resolve()} "
                                                       f"changed since {out} was created")


def test_calibrate_refuses_an_unfinished_run(tmp_path, words_file, capsys):
    out = tmp_path / "run"
    assert _train(out, words_file, "--set", "steps=40") == 0
    config = json.loads((out / "config.json").read_text())
    config["train"]["steps"] = 120  # as if stopped at step 40 of 120
    (out / "config.json").write_text(json.dumps(config))
    before = checkpoint_file(out).read_bytes()
    assert main(["calibrate", str(out)]) == 2
    assert "stopped at step 40 of 120: finish it first" in user_error(capsys)
    assert checkpoint_file(out).read_bytes() == before


def test_calibrate_keeps_training_weights_labels_its_losses_and_gives_the_same_twice(tmp_path, words_file, capsys):
    out = tmp_path / "run"
    assert _train(out, words_file) == 0
    trained = load_file(checkpoint_file(out))
    results = [calibrate_run(out), calibrate_run(out)]
    assert results[0] == results[1]
    assert results[0]["before"] == "running"
    # the val loss with the running statistics, recomputed from training's weights by hand
    run = RunDir.open(out)
    model = build_model(run.config.model, len(run.vocab))
    model.load_state_dict(trained)
    _, splits = load_data(run.config, run.vocab)
    model.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(splits.val[0]), splits.val[1]).item()
    assert results[0]["val_before"] == pytest.approx(loss, rel=1e-6)
    kept = load_file(checkpoint_file(out, "model.uncalibrated.safetensors"))
    assert all(torch.equal(kept[key], trained[key]) for key in trained)
    calibrated = load_file(checkpoint_file(out))
    assert not torch.equal(calibrated["layers.3.running_mean"], trained["layers.3.running_mean"])
    assert main(["calibrate", str(out)]) == 0
    assert "(running statistics) ->" in capsys.readouterr().out


def test_intervals_left_unset_scale_with_the_steps(tmp_path, words_file, capsys):
    assert (TrainConfig(steps=200_000).resolved().eval_every, TrainConfig(steps=200_000).resolved().checkpoint_every
            ) == (10_000, 50_000)
    assert (TrainConfig(steps=2000).resolved().eval_every, TrainConfig(steps=2000).resolved().checkpoint_every
            ) == (100, 500)
    assert TrainConfig(steps=3).resolved().eval_every == 1
    out = tmp_path / "run"
    assert main(["train", "--data", str(words_file), "--out", str(out), "--quiet", "--set", "n_hidden=16",
                 "--set", "steps=100"]) == 0
    steps = [row["step"] for row in RunDir.open(out).read_metrics() if "val_loss" in row]
    assert steps == list(range(5, 101, 5))  # twenty evaluations, not one at the end
    assert json.loads((out / "config.json").read_text())["train"]["eval_every"] is None  # what the user set


def test_extending_a_finished_run_trains_on_as_one_longer_run(tmp_path, words_file, capsys):
    out = tmp_path / "run"
    assert _train(out, words_file) == 0  # 120 steps, the learning rate decays at step 60
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 2
    assert "already finished its 120 steps: to train it further, give the new total" in user_error(capsys)
    assert main(["calibrate", str(out)]) == 0  # calibrated weights are not what training continues from
    assert main(["train", "--resume", "--set", "steps=200", "--out", str(out), "--quiet"]) == 0
    longer = tmp_path / "longer"  # trained 200 steps at once, with the decay where the first run had it
    assert _train(longer, words_file, "--set", "steps=200", "--set", "lr_decay_step=60") == 0
    assert_same_checkpoint(out, longer)
    rows = RunDir.open(out).read_metrics()
    assert [row["step"] for row in rows if "val_loss" in row] == [40, 80, 120, 160, 200]
    assert [row.get("event") for row in rows if "event" in row] == ["final"]
    assert json.loads((out / "config.json").read_text())["train"]["lr_decay_step"] == 60


def test_tensorboard_shows_the_losses_and_diagnostics_while_training_runs(tmp_path, words_file, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from normlab.runs.rundir import RunDir

    seen: list[set[str]] = []
    original = RunDir.save_checkpoint

    def look_then_save(self, model_state, optimizer_state, step):
        if step == 80:  # two thirds of the way (after the checkpoint at 40): what TensorBoard shows now
            events = EventAccumulator(str(tmp_path / "tb"))
            events.Reload()
            seen.append(set(events.Tags()["scalars"]))
        original(self, model_state, optimizer_state, step)

    monkeypatch.setattr(RunDir, "save_checkpoint", look_then_save)
    start_training(_config(words_file), tmp_path / "run", diagnose=True, every=20, progress=False,
                   tensorboard=tmp_path / "tb")
    assert seen and any("loss" in tag for tag in seen[0]) and any("act_std" in tag for tag in seen[0])
