"""Every user error is one line and exit code 2, found before a run directory is created or changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_WORDS, tiny_command, user_error
from runs.helpers import checkpoint_file
from safetensors.torch import load_file, save_file

import normlab.runs.commands as commands_module
from normlab.cli import main


def _train(out: Path, words_file: Path, *extra: str) -> int:
    return tiny_command("train", "lesson-batchnorm", out, words_file, *extra)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A run trained once for the module (and one with diagnostics), with its own words file."""
    folder = tmp_path_factory.mktemp("trained")
    words = folder / "words.txt"
    words.write_text("\n".join(TINY_WORDS) + "\n")
    assert _train(folder / "run", words) == 0
    assert _train(folder / "diagnosed", words, "--diagnose", "--every", "40") == 0
    return folder


@pytest.fixture
def trained_run(trained_runs, tmp_path, capsys):
    capsys.readouterr()
    return Path(shutil.copytree(trained_runs / "run", tmp_path / "run"))


@pytest.mark.parametrize("extra, message", [
    (["--set", "device=xyz"], "train.device='xyz' is not a device"),
    (["--diagnose", "--every", "0"], "--every must be at least 1"),
    (["--every", "5"], "add --diagnose"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--set", "n_hidden=1000000"], "model.n_hidden=1000000 is beyond normlab's limit"),
    (["--set", "n_layers=1000000"], "model.n_layers=1000000 is beyond normlab's limit"),
    (["--set", "batch_size=1048576", "--set", "n_hidden=16384"], "this configuration needs about"),
    (["--set", "batch_size=1"], "train.batch_size=1 with a batch norm"),
    (["--set", "batch_size=1", "--set", "engine=reference"], "train.batch_size=1 with a batch norm"),
    (["--set", "norm=ghostbatch", "--set", "ghost_batch_size=4", "--set", "batch_size=9"], "a ghost batch of one"),
    (["--set", "momentum=-1"], "train.momentum must be between 0 and 1"),
    (["--set", "lr=NaN"], "train.lr must be a finite number"),
    (["--set", "weight_scale=1e999"], "model.weight_scale must be a finite number"),
    (["--set", "optimizer=adamw", "--set", "momentum=0.9"], "--set train.momentum would have no effect"),
    (["--set", "norm_groups=4"], "--set model.norm_groups would have no effect"),
    (["--set", "data.sha256=abc"], "--set data.sha256 would have no effect"),
    (["--set", "min_lr_factor=0.1"], "--set train.min_lr_factor would have no effect"),
    (["--calibrate", "--set", "norm=layer"], "--calibrate recomputes BatchNorm statistics"),
])
def test_bad_values_are_one_line_and_nothing_is_created(tmp_path, words_file, capsys, extra, message):
    out = tmp_path / "run"
    assert _train(out, words_file, *extra) == 2
    assert message in user_error(capsys)
    assert not out.exists()


def test_a_refused_size_leaves_the_out_free_for_the_fixed_command(tmp_path, words_file, capsys):
    out = tmp_path / "run"
    assert _train(out, words_file, "--set", "batch_size=1048576", "--set", "n_hidden=16384") == 2
    assert "this configuration needs about" in user_error(capsys)
    assert _train(out, words_file) == 0  # the same --out works once the mistake is fixed


def test_too_few_words_for_three_splits_are_refused(tmp_path, capsys):
    words = tmp_path / "two.txt"
    words.write_text("anna\nbob\n")
    for args in (["train", "--data", str(words), "--out", str(tmp_path / "run")],
                 ["train", "--data", str(words), "--set", "engine=reference", "--out", str(tmp_path / "run")],
                 ["sweep", "--data", str(words), "--vary", "seed=1,2", "--out", str(tmp_path / "grid")]):
        assert main(args) == 2
        assert "split(s) would be empty" in user_error(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "grid").exists()


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_out_that_cannot_be_created_is_one_line(tmp_path, words_file, capsys, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "run" if where == "under-a-file" else Path("/proc/normlab-test-run")
    assert _train(out, words_file) == 2
    assert "cannot create the run directory" in user_error(capsys)


def test_running_out_of_memory_while_training_is_one_line_and_frees_the_out(tmp_path, words_file, capsys,
                                                                            monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(commands_module, "train_loop", no_memory)
    out = tmp_path / "run"
    assert _train(out, words_file) == 2
    assert "out of memory" in user_error(capsys)
    assert not out.exists()  # nothing trained, nothing kept: the same --out can be used again
    out.mkdir()  # a folder the user made is left in place, empty
    assert _train(out, words_file) == 2
    assert "out of memory" in user_error(capsys) and out.is_dir() and not any(out.iterdir())


@pytest.mark.parametrize("field, value, message", [
    ("n_hidden", 10**9, "model.n_hidden=1000000000 is beyond normlab's limit"),
    ("n_layers", 10**6, "model.n_layers=1000000 is beyond normlab's limit"),
])
def test_an_edited_config_with_huge_sizes_is_refused_before_any_allocation(trained_run, capsys, field, value,
                                                                            message):
    config = json.loads((trained_run / "config.json").read_text())
    config["model"][field] = value
    (trained_run / "config.json").write_text(json.dumps(config))
    for command in (["sample", str(trained_run)], ["eval", str(trained_run)], ["calibrate", str(trained_run)]):
        assert main(command) == 2
        assert message in user_error(capsys)


def _restamp(path: Path, **metadata: str) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        old = file.metadata()
    save_file(load_file(path), path, metadata={**old, **metadata})


RESUME = ["train", "--resume", "--set", "steps=160", "--out"]


@pytest.mark.parametrize("damage, message, commands", [
    (lambda run: _restamp(checkpoint_file(run), step="abc"), "its step 'abc' is not a whole number",
     [RESUME, ["sample"], ["export", "--out", "x.safetensors"]]),
    (lambda run: (run / "checkpoint.json").write_text('{"step": "abc"}'), "checkpoint.json is damaged",
     [RESUME, ["eval"], ["calibrate"]]),
    (lambda run: (run / "checkpoint.json").write_text(
        (run / "checkpoint.json").read_text().replace('"checkpoint-120"', '"../elsewhere"')), "is damaged",
     [RESUME, ["sample"]]),
    (lambda run: (run / "metrics.jsonl").write_text('{"step": "forty", "val_loss": 3.0}\n'),
     "step 'forty' is not a whole number", [RESUME, ["report"]]),
    (lambda run: (run / "metrics.jsonl").write_text('{"step": 40, "val_loss": "low"}\n'), "'val_loss'",
     [RESUME, ["report"]]),
])
def test_non_integer_steps_and_damaged_records_are_one_line(trained_run, capsys, damage, message, commands):
    damage(trained_run)
    for command in commands:
        assert main([*command, str(trained_run)]) == 2
        assert message in user_error(capsys)


@pytest.mark.parametrize("file, content", [
    ("scalars.csv", "step,layer,metric,value\n1,x\n"),
    ("scalars.csv", "garbage"),
    ("layers.json", "[1, 2"),
    ("layers.json", '{"format": 1}'),
    ("histograms.safetensors", "not safetensors"),
])
def test_report_on_damaged_diagnostics_is_one_line(trained_runs, tmp_path, capsys, file, content):
    out = Path(shutil.copytree(trained_runs / "diagnosed", tmp_path / "diagnosed"))
    capsys.readouterr()
    (out / "diagnostics" / file).write_text(content)
    assert main(["report", str(out)]) == 2
    assert "cannot build the report" in user_error(capsys)


@pytest.mark.parametrize("args, message", [
    (["-n", "100000000"], "between 1 and 1,000,000"),
    (["-n", "0"], "between 1 and 1,000,000"),
    (["--greedy", "-n", "5"], "--greedy takes the most likely character"),
    (["--greedy", "--temperature", "0.5"], "--greedy takes the most likely character"),
    (["--top-k", "0"], "top_k must be between 1"),
])
def test_bad_sampling_flags_are_one_line(trained_run, capsys, args, message):
    assert main(["sample", str(trained_run), *args]) == 2
    assert message in user_error(capsys)


@pytest.mark.parametrize("batch, preset", [("0", "lesson-kaiming"), ("-1", "lesson-kaiming"),
                                           ("1", "lesson-batchnorm"), ("2000000", "lesson-kaiming")])
def test_inspect_refuses_batches_it_cannot_use(words_file, capsys, batch, preset):
    assert main(["inspect", "--preset", preset, "--data", str(words_file), "--batch", batch]) == 2
    assert "--batch" in user_error(capsys)


@pytest.mark.parametrize("args, message", [
    (["train", "--out"], "expected one argument"),
    (["train", "--out", "x", "--every", "many"], "invalid int value: 'many'"),
    (["nope"], "invalid choice: 'nope'"),
    ([], "the following arguments are required: COMMAND"),
    (["eval", "RUN", "--split", "val", "--data", "x.txt"], "give one"),
    (["train", "--out", "x", "--data", "a.txt", "--set", "data.path=b.txt"], "--data and --set data.path"),
    (["train", "--out", "x", "--resume", "--set", "lr=0.1"], "only --set steps=N"),
    (["compile", "--threads", "0"], "--threads must be at least 1"),
    (["compile", "--preset", "lesson-batchnorm", "--set", "n_hidden=0"], "n_hidden"),
])
def test_bad_command_lines_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    error = user_error(capsys)
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "x").exists()
