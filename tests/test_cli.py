"""End to end through the command line on a tiny word list: train, resume, sample, eval, calibrate, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_command, user_error
from runs.helpers import assert_same_checkpoint, assert_same_tensors, checkpoint_file

from normlab.cli import main
from normlab.runs.rundir import RunDir


def _train(out: Path, words_file: Path, *extra: str) -> int:
    return tiny_command("train", "lesson-batchnorm", out, words_file, *extra)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def trained_run(tmp_path, words_file):
    out = tmp_path / "run"
    assert _train(out, words_file) == 0
    return out


def test_train_writes_a_complete_run_directory(trained_run, capsys):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "vocab.json", "checkpoint.json", "checkpoint-120", "metrics.jsonl"} <= names
    assert {p.name for p in (trained_run / "checkpoint-120").iterdir()} == {"model.safetensors",
                                                                          "optimizer.safetensors"}
    rows = RunDir.open(trained_run).read_metrics()
    assert [row["step"] for row in rows if "val_loss" in row] == [40, 80, 120]
    assert rows[-1]["event"] == "final" and rows[-1]["val"] > 0
    assert json.loads((trained_run / "vocab.json").read_text())["itos"][0] == "."


def test_the_same_command_gives_the_same_numbers(tmp_path, words_file, trained_run):
    again = tmp_path / "again"
    assert _train(again, words_file) == 0
    assert_same_tensors(checkpoint_file(again), checkpoint_file(trained_run))


@pytest.mark.parametrize("optimizer", [[], ["--set", "optimizer=adamw", "--set", "lr=0.01"],
                                       ["--set", "momentum=0.9", "--set", "schedule=cosine"],
                                       ["--set", "engine=reference"],
                                       ["--set", "engine=reference", "--set", "optimizer=adamw"],
                                       ["--set", "dropout=0.2", "--set", "n_layers=2", "--set", "optimizer=adamw"]])
def test_resume_after_ctrl_c_ends_with_the_uninterrupted_parameters(tmp_path, words_file, monkeypatch, capsys,
                                                                     optimizer):
    uninterrupted = tmp_path / "uninterrupted"
    assert _train(uninterrupted, words_file, *optimizer) == 0
    out = tmp_path / "interrupted"
    original = RunDir.save_checkpoint

    def save_then_press_ctrl_c(self, model, optimizer, step):
        original(self, model, optimizer, step)
        if step == 40:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunDir, "save_checkpoint", save_then_press_ctrl_c)
    assert _train(out, words_file, *optimizer) == 130
    assert "checkpoint saved at step 40" in capsys.readouterr().err  # Ctrl-C came during the save of step 40
    assert RunDir.open(out).model_step() == 40
    monkeypatch.setattr(RunDir, "save_checkpoint", original)
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    assert_same_checkpoint(out, uninterrupted)
    steps = [row["step"] for row in RunDir.open(out).read_metrics() if "val_loss" in row]
    assert steps == [40, 80, 120]


def test_sample_prints_names_and_their_diversity(trained_run, capsys):
    assert main(["sample", str(trained_run), "-n", "7", "--temperature", "0.8", "--top-k", "10", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    words = out.split("\n\n")[0].splitlines()
    assert len(words) == 7 and all(w.isalpha() or w == "" for w in words)
    assert "mean entropy per character" in out and "not in training data" in out
    assert main(["sample", str(trained_run), "-n", "7", "--temperature", "0.8", "--top-k", "10", "--seed", "3"]) == 0
    assert capsys.readouterr().out == out


def test_eval_and_calibrate_report_losses(trained_run, capsys):
    assert main(["eval", str(trained_run), "--split", "test"]) == 0
    assert "test split: loss" in capsys.readouterr().out
    assert main(["calibrate", str(trained_run)]) == 0
    assert "->" in capsys.readouterr().out
    assert RunDir.open(trained_run).read_metrics()[-1]["event"] == "calibrate"


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("   \n\n", "no usable lines"),
])
def test_bad_words_files_are_refused_before_anything_is_written(tmp_path, capsys, content, message):
    data = tmp_path / "bad.txt"
    data.write_text(content)
    assert _train(tmp_path / "run", data) == 2
    assert message in user_error(capsys)
    assert not (tmp_path / "run").exists()


def test_characters_outside_the_vocabulary_are_listed(trained_run, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("anna\nzoë\nbob\nchloé\n", encoding="utf-8")
    assert main(["eval", str(trained_run), "--data", str(other)]) == 2
    assert "'é' (word 4); 'ë' (word 2)" in user_error(capsys)


def test_an_existing_run_is_never_overwritten(trained_run, words_file, capsys):
    before = _digest(trained_run)
    assert _train(trained_run, words_file) == 2
    assert "already exists" in user_error(capsys)
    assert _digest(trained_run) == before


@pytest.mark.parametrize("damage, message", [
    (lambda run: checkpoint_file(run).write_bytes(b"\x00garbage"), "corrupted"),
    (lambda run: checkpoint_file(run).unlink(), "is missing"),
    (lambda run: (run / "config.json").write_text(
        (run / "config.json").read_text().replace('"n_hidden": 16', '"n_hidden": 17')), "does not match"),
    (lambda run: (run / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda run: (run / "vocab.json").unlink(), "vocab.json is missing"),
])
def test_damaged_run_directories_give_one_clear_error(trained_run, capsys, damage, message):
    damage(trained_run)
    assert main(["sample", str(trained_run)]) == 2
    assert message in user_error(capsys)


def test_resume_refuses_a_changed_words_file(tmp_path, words_file, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _train(out, words_file, "--set", "steps=40") == 0
    config = json.loads((out / "config.json").read_text())
    config["train"]["steps"] = 80
    (out / "config.json").write_text(json.dumps(config))
    words_file.write_text(words_file.read_text() + "newname\n")
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 2
    assert "changed since" in user_error(capsys)


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "nope", "--out", "x"], "unknown preset 'nope'"),
    (["train", "--set", "n_hiddn=3", "--out", "x"], "unknown key 'n_hiddn'"),
    (["train", "--set", "n_hidden=wide", "--out", "x"], "expected int"),
    (["train", "--set", "lr", "--out", "x"], "expected key=value"),
    (["sample", "no/such/run"], "does not exist"),
    (["eval", "no/such/run"], "does not exist"),
])
def test_bad_flags_give_one_clear_error(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in user_error(capsys)
    assert not (tmp_path / "x").exists()


def test_temperature_must_be_positive(trained_run, capsys):
    assert main(["sample", str(trained_run), "--temperature", "0"]) == 2
    assert "temperature must be greater than 0" in user_error(capsys)


def test_the_console_script_prints_no_traceback_for_user_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "normlab.cli", "train", "--preset", "nope", "--out",
                             str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_training_on_cuda_end_to_end(tmp_path, words_file, capsys, engine):
    out = tmp_path / "cuda"
    assert _train(out, words_file, "--device", "cuda", "--set", f"engine={engine}", "--calibrate") == 0
    assert main(["sample", str(out), "-n", "5"]) == 0
    assert main(["eval", str(out)]) == 0
    assert "val split: loss" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path, words_file, capsys):
    assert _train(tmp_path / "cuda", words_file, "--device", "cuda") == 2
    assert "no CUDA GPU is available" in user_error(capsys)


def test_train_with_diagnose_writes_diagnostics_a_report_and_tensorboard(tmp_path, words_file, capsys):
    out = tmp_path / "diagnosed"
    assert _train(out, words_file, "--diagnose", "--every", "20") == 0
    assert (out / "report.html").is_file() and (out / "diagnostics" / "scalars.csv").is_file()
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    assert main(["report", str(out), "--tensorboard"]) == 0
    assert any(path.name.startswith("events.out.tfevents") for path in (out / "tensorboard").rglob("*"))


def test_report_without_diagnostics_cannot_export_tensorboard(trained_run, capsys):
    assert main(["report", str(trained_run), "--tensorboard"]) == 2
    assert "train it with --diagnose" in user_error(capsys)


def test_inspect_prints_the_layer_table_and_the_findings(words_file, capsys):
    assert main(["inspect", "--preset", "lesson-original", "--data", str(words_file), "--batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "Tanh" in out and "Linear" in out and "initial loss" in out
    assert "confidently wrong" in out  # the naive output layer's initial loss is far above -log(1/27)


def test_split_seed_chooses_another_lesson_style_split(tmp_path, words_file, capsys):
    out = tmp_path / "split7"
    assert _train(out, words_file, "--split-seed", "7") == 0
    assert json.loads((out / "config.json").read_text())["data"]["split_seed"] == 7
    # the val split is the second 10% of the words after Python's random.Random(7) shuffle, cut by hand here
    words = words_file.read_text().split()
    random.Random(7).shuffle(words)
    val_file = tmp_path / "val.txt"
    val_file.write_text("\n".join(words[int(0.8 * len(words)):int(0.9 * len(words))]) + "\n")
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "val"]) == 0
    split_loss = capsys.readouterr().out.split("loss")[1].split()[0]
    assert main(["eval", str(out), "--data", str(val_file)]) == 0
    assert capsys.readouterr().out.split("loss")[1].split()[0] == split_loss
    assert main(["train", "--resume", "--out", str(out), "--split-seed", "8"]) == 2
    assert "drop --preset, --data, --split-seed and --device" in user_error(capsys)


def test_help_and_version_import_nothing_heavy():
    probe = """
import sys
from normlab.cli import main
for argv in (["--help"], ["--version"], ["sample", "--help"], ["export", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted({"torch", "numpy", "matplotlib", "normlab.config", "normlab.lab"} & set(sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_version_and_python_dash_m(tmp_path):
    from normlab import __version__

    for command in ([sys.executable, "-m", "normlab", "--version"], [sys.executable, "-m", "normlab.cli", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout == f"normlab {__version__}\n"
    result = subprocess.run([sys.executable, "-m", "normlab", "eval", str(tmp_path / "nope")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr.startswith("normlab: error: ") and result.stderr.count("\n") == 1


def test_every_option_shows_its_default_in_its_help():
    import argparse

    from normlab.cli_parser import COMMANDS, build_parser

    subparsers = next(action for action in build_parser(every=True)._actions
                      if isinstance(action, argparse._SubParsersAction))
    without = []
    for name in COMMANDS:
        parser = subparsers.choices[name]
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and not action.required:
                text = parser.formatter_class("normlab")._get_help_string(action)
                if "default" not in text:
                    without.append((name, action.dest))
    assert without == [("train", "set"), ("sweep", "set"), ("eval", "data"), ("compile", "set"),
                       ("inspect", "set")]  # none to show


def test_train_help_lists_the_presets_and_every_key(capsys):
    from normlab.cli_parser import DEFAULT_PRESET as CLI_DEFAULT
    from normlab.config import DEFAULT_PRESET, PRESETS, config_keys

    assert CLI_DEFAULT == DEFAULT_PRESET
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert all(key.split(".")[1] in out for key in config_keys() if key != "data.sha256")
    assert "(default: lesson-batchnorm)" in out


def test_presets_verbose_shows_the_data_settings_too(capsys):
    assert main(["presets", "-v"]) == 0
    assert '"split_seed": 42' in capsys.readouterr().out


@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_diagnose_says_which_engine_records(tmp_path, words_file, capsys, engine):
    assert _train(tmp_path / "run", words_file, "--set", f"engine={engine}", "--diagnose", "--every", "40") == 0
    assert f"recording diagnostics every 40 steps on the {engine} engine" in capsys.readouterr().err


def test_a_compiled_run_says_so_before_it_starts(tmp_path, words_file, capsys, monkeypatch):
    from normlab.training.engines.stacked.engine import StackedEngine

    monkeypatch.setattr(StackedEngine, "compiling", property(lambda self: True))  # without compiling for real
    assert tiny_command("train", "lesson-batchnorm", tmp_path / "run", words_file) == 0
    assert "compiling" not in capsys.readouterr().err  # --quiet: no notices
    assert main(["train", "--preset", "lesson-batchnorm", "--data", str(words_file), "--out", str(tmp_path / "b"),
                 "--set", "steps=20", "--set", "n_hidden=16"]) == 0
    assert "compiling the training steps (once for this configuration, ~30 s" in capsys.readouterr().err


def test_greedy_sampling_prints_the_most_likely_word(trained_run, capsys):
    assert main(["sample", str(trained_run), "--greedy"]) == 0
    word = capsys.readouterr().out.split("\n\n")[0]
    assert main(["sample", str(trained_run), "--top-k", "1", "-n", "1"]) == 0  # top-1 sampling is greedy too
    assert capsys.readouterr().out.split("\n\n")[0] == word


def test_compile_prepares_a_presets_steps_once_and_a_run_then_starts_compiled(tmp_path, words_file, capsys,
                                                                              monkeypatch):
    from normlab.training.engines.stacked.kernels import Kernel

    settings = ["--data", str(words_file), "--set", "n_hidden=8", "--set", "n_embd=2"]
    assert main(["compile", "--preset", "lesson-batchnorm", "--preset", "lesson-deep", *settings]) == 0
    out = capsys.readouterr().out
    if "FAILED" in out:
        pytest.skip(f"no compiler here: {out}")
    assert out.splitlines()[0].startswith("lesson-batchnorm: compiled in ")
    assert out.splitlines()[1] == "lesson-deep: nothing to compile: it trains on the reference engine"
    assert main(["compile", "--preset", "lesson-batchnorm", *settings]) == 0
    assert capsys.readouterr().out == "lesson-batchnorm: already compiled (cached)\n"
    # a short run (far below the threshold where a first compilation pays) now runs compiled, without a notice
    calls = []
    run = Kernel.__call__
    monkeypatch.setattr(Kernel, "__call__", lambda self, tensors: calls.append(1) or run(self, tensors))
    assert main(["train", "--preset", "lesson-batchnorm", *settings, "--set", "steps=400", "--out",
                 str(tmp_path / "run")]) == 0
    assert "compiling" not in capsys.readouterr().err and calls  # calls of ten steps through the kernel
    assert main(["compile", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
