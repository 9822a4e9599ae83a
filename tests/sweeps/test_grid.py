"""`normlab sweep` end to end on a tiny word list: a run directory per configuration, each like one trained alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_command, user_error
from runs.helpers import checkpoint_file
from safetensors.torch import load_file

from normlab.cli import main
from normlab.runs.rundir import RunDir


def _train(out, words_file, *extra):
    return tiny_command("train", "lesson-batchnorm", out, words_file, *extra)


def test_sweep_trains_every_combination_into_its_own_run_directory(tmp_path, words_file, capsys):
    out = tmp_path / "grid"
    assert tiny_command("sweep", "lesson-batchnorm", out, words_file, "--vary", "lr=0.05,0.2", "--vary", "seed=1,2",
                 "--diagnose", "--every", "40") == 0
    names = sorted(path.name for path in out.iterdir() if path.is_dir())
    assert names == ["lr-0.05_seed-1", "lr-0.05_seed-2", "lr-0.2_seed-1", "lr-0.2_seed-2"]
    assert "4 run directories" in capsys.readouterr().out
    for name in names:
        run = RunDir.open(out / name)
        final = run.read_metrics()[-1]
        assert final["event"] == "final"
        assert (out / name / "report.html").is_file()
        capsys.readouterr()
        assert main(["eval", str(out / name), "--split", "val"]) == 0  # the reference path's evaluation
        assert f"loss {final['val']:.4f}" in capsys.readouterr().out
        assert main(["sample", str(out / name), "-n", "3"]) == 0
    # one grid run against the same configuration trained alone
    alone = tmp_path / "alone"
    assert _train(alone, words_file, "--set", "lr=0.2", "--set", "seed=2") == 0
    grid_model, alone_model = load_file(checkpoint_file(out / "lr-0.2_seed-2")), load_file(checkpoint_file(alone))
    for key in alone_model:
        torch.testing.assert_close(grid_model[key], alone_model[key], rtol=1e-4, atol=1e-5)


def test_sweep_records_the_words_file_by_its_full_path(tmp_path, words_file, monkeypatch, capsys):
    monkeypatch.chdir(words_file.parent)
    assert tiny_command("sweep", "lesson-kaiming", tmp_path / "grid", words_file.name, "--vary", "seed=1,2") == 0
    recorded = json.loads((tmp_path / "grid" / "seed-1" / "config.json").read_text())["data"]["path"]
    assert recorded == str(words_file.resolve())


def test_sweep_with_a_missing_words_file_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "grid"
    assert main(["sweep", "--data", str(tmp_path / "nope.txt"), "--vary", "seed=1,2", "--out", str(out)]) == 2
    assert "does not exist" in user_error(capsys) and not out.exists()


@pytest.mark.parametrize("vary, message", [
    ("lr", "expected key=value1,value2"),
    ("lr=0.1,", "expected key=value1,value2"),
    ("data.split_seed=1,2", "share their data"),
    ("n_hiden=3,4", "unknown key 'n_hiden'"),
    ("lr=0.1,0.2,0.1", "lists 0.1 more than once"),
])
def test_bad_sweep_variations_give_one_clear_error(tmp_path, capsys, vary, message):
    assert main(["sweep", "--vary", vary, "--out", str(tmp_path / "grid")]) == 2
    assert message in user_error(capsys)


def test_a_diverged_grid_run_is_reported_and_keeps_no_weights(tmp_path, words_file, capsys):
    out = tmp_path / "grid"
    assert tiny_command("sweep", "lesson-kaiming", out, words_file, "--vary", "lr=0.1,1e30") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("lr-0.1 ") and "diverged at step" in lines[2] and lines[2].startswith("lr-1e30 ")
    metrics = RunDir.open(out / "lr-1e30").read_metrics()
    assert metrics[-2]["event"] == "diverged" and math.isnan(metrics[-1]["val"])
    assert RunDir.open(out / "lr-1e30").checkpoint() is None
    assert main(["sample", str(out / "lr-1e30")]) == 2
    assert "diverged, before its first checkpoint" in user_error(capsys)


def test_sweep_writes_a_summary_and_report_draws_one_comparison_page(tmp_path, words_file, capsys):
    import csv
    import statistics

    out = tmp_path / "grid"
    assert tiny_command("sweep", "lesson-batchnorm", out, words_file, "--vary", "lr=0.05,0.2", "--vary",
                        "seed=1,2,3") == 0
    finals = {}  # each run's final losses, read from its own metrics.jsonl
    for folder in (p for p in out.iterdir() if p.is_dir()):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        finals[folder.name] = rows[-1]
    with open(out / "summary.csv") as file:
        table = list(csv.DictReader(file))
    assert [row["run"] for row in table] == [f"lr-{lr}_seed-{seed}" for lr in ("0.05", "0.2") for seed in (1, 2, 3)]
    for row in table:
        assert float(row["val"]) == finals[row["run"]]["val"] and row["lr"] in row["run"]
    summary = json.loads((out / "summary.json").read_text())
    groups = {group["label"]: group for group in summary["configurations"]}
    assert sorted(groups) == ["lr=0.05", "lr=0.2"]
    vals = [finals[f"lr-0.2_seed-{seed}"]["val"] for seed in (1, 2, 3)]
    assert groups["lr=0.2"]["val_mean"] == pytest.approx(statistics.fmean(vals))
    assert groups["lr=0.2"]["val_std"] == pytest.approx(statistics.stdev(vals))
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert f"{groups['lr=0.2']['val_mean']:.4f} ± {groups['lr=0.2']['val_std']:.4f}" in page
    assert page.count("<img") == 2 and "http" not in page.replace("http://www.w3.org", "")
    assert main(["report", str(out), "--tensorboard"]) == 2
    assert "give one of the sweep's run directories" in user_error(capsys)
