"""What `lab run` writes: per experiment result.json, figures and summary.md; index.html for `run all`."""

from __future__ import annotations

import json

import pytest

from normlab.errors import ConfigError, DataError
from normlab.lab import DOES_NOT_HOLD, EXPERIMENTS, HOLDS, run_experiment, run_experiments

ROBUST = ("depth", "saturation", "init-schemes", "softmax-init", "train-vs-eval", "temperature")


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_writes_its_result_figures_and_summary(tiny_lab, name):
    out, _ = tiny_lab
    folder = out / name
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    assert {"name", "claim", "verdict", "config", "measurements"} <= set(result)
    assert result["name"] == name and result["claim"] == EXPERIMENTS[name].claim
    assert result["verdict"] in (HOLDS, DOES_NOT_HOLD)
    assert result["config"]["mode"] == "tiny"
    assert result["figures"]
    assert all((folder / figure).read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for figure in result["figures"])
    summary = (folder / "summary.md").read_text(encoding="utf-8")
    assert EXPERIMENTS[name].claim in summary and f"**Verdict: {result['verdict']}**" in summary


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_the_verdict_follows_from_the_stored_measurements(tiny_lab, name):
    out, _ = tiny_lab
    result = json.loads((out / name / "result.json").read_text(encoding="utf-8"))
    assert EXPERIMENTS[name].check(result["measurements"]).text == result["verdict"]


@pytest.mark.parametrize("name", ROBUST)
def test_claims_that_hold_even_at_tiny_budgets_hold(tiny_lab, name):
    _, results = tiny_lab
    assert results[name].verdict == HOLDS, results[name].checks


def test_run_all_writes_one_page_with_every_experiment(tiny_lab):
    out, results = tiny_lab
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == sum(len(r.figures) for r in results.values())
    for name, result in results.items():
        assert f'id="{name}"' in page and result.verdict in page


def test_an_existing_result_is_kept_unless_forced(tmp_path, lab_data):
    run_experiment("init-schemes", mode="tiny", out=tmp_path, data=lab_data, progress=False)
    stray = tmp_path / "init-schemes" / "old-note.txt"
    stray.write_text("from an earlier run")
    with pytest.raises(ConfigError, match="init-schemes.*--force"):
        run_experiments(["softmax-init", "init-schemes"], mode="tiny", out=tmp_path, data=lab_data, progress=False)
    assert not (tmp_path / "softmax-init").exists()  # refused before any work
    run_experiment("init-schemes", mode="tiny", out=tmp_path, data=lab_data, progress=False, force=True)
    assert not stray.exists() and (tmp_path / "init-schemes" / "result.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init-schemes"]  # no scratch folder left behind


@pytest.mark.parametrize(("names", "mode", "message"), [
    (["depth", "nope"], "tiny", "unknown experiment 'nope'"),
    (["depth"], "fast", "unknown lab mode 'fast'"),
])
def test_bad_names_and_modes_are_refused(tmp_path, lab_data, names, mode, message):
    with pytest.raises(ConfigError, match=message):
        run_experiments(names, mode=mode, out=tmp_path, data=lab_data, progress=False)


def test_a_bad_output_folder_or_words_file_is_refused_before_writing(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConfigError, match="is a file: give a folder"):
        run_experiments(["depth"], mode="tiny", out=tmp_path / "taken", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        run_experiments(["depth"], mode="tiny", out=tmp_path / "lab", data=tmp_path / "missing.txt", progress=False)
    assert not (tmp_path / "lab").exists()
