"""`normlab lab list | run` through `add_lab_commands`, on a parser of our own (as normlab.cli will build it)."""

from __future__ import annotations

import argparse
import json

import pytest

from normlab.cli import main
from normlab.errors import ConfigError
from normlab.lab import EXPERIMENTS, add_lab_commands, softmax_init


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="normlab")
    add_lab_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_lab_list_shows_every_experiment_with_its_budgets_and_claim(capsys):
    assert _main(["lab", "list", "-v"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for name, experiment in EXPERIMENTS.items():
        budgets = experiment.budgets()
        assert f"quick: {budgets['quick']}" in flat and f"full: {budgets['full']}" in flat
        assert " ".join(experiment.claim.split()) in flat and name in out


def test_lab_run_writes_one_experiment_and_keeps_it_unless_forced(tmp_path, monkeypatch, capsys, words_file):
    monkeypatch.setitem(softmax_init.SETTINGS, "quick", softmax_init.SETTINGS["tiny"])  # a tiny budget for the test
    argv = ["lab", "run", "softmax-init", "--quick", "--out", str(tmp_path), "--data", str(words_file), "--quiet"]
    assert _main(argv) == 0
    assert "softmax-init: HOLDS" in capsys.readouterr().out
    result = json.loads((tmp_path / "softmax-init" / "result.json").read_text(encoding="utf-8"))
    assert result["config"]["data"] == str(words_file.resolve()) and result["config"]["mode"] == "quick"
    assert result["config"]["vocab_size"] == len(set(words_file.read_text(encoding="utf-8")) - {"\n"}) + 1  # and "."
    with pytest.raises(ConfigError, match="softmax-init already exist.*--force"):
        _main(argv)
    assert _main(argv + ["--force"]) == 0


def test_a_bad_experiment_name_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown experiment 'nope': choose one of depth, .* or all"):
        _main(["lab", "run", "nope", "--out", str(tmp_path / "lab")])
    assert main(["lab", "run", "nope", "--out", str(tmp_path / "lab")]) == 2  # through the normlab command
    error = capsys.readouterr().err
    assert error.startswith("normlab: error: unknown experiment 'nope'") and error.count("\n") == 1
    assert not (tmp_path / "lab").exists()


def test_lab_output_has_the_usual_permissions_and_one_verdict_line(tmp_path, monkeypatch, capsys, words_file):
    import os

    monkeypatch.setitem(softmax_init.SETTINGS, "quick", softmax_init.SETTINGS["tiny"])
    assert main(["lab", "run", "softmax-init", "--quick", "--out", str(tmp_path), "--data", str(words_file)]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("softmax-init: HOLDS") == 1
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "softmax-init").stat().st_mode & 0o777 == 0o777 & ~umask
