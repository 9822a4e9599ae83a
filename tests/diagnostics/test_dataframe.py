"""Data out: long-format DataFrames, Parquet files, and the notebook display."""

import base64
import re

import numpy as np
import pytest

from normlab.diagnostics import Diagnostics, Monitor, load_diagnostics
from normlab.diagnostics import metrics as m


def test_to_pandas_is_one_row_per_scalar_in_long_format(run_dir):
    pytest.importorskip("pandas", reason="the pandas extra is not installed")
    diagnostics = load_diagnostics(run_dir)
    frame = diagnostics.to_pandas()
    assert list(frame.columns) == ["step", "layer", "metric", "value"]
    assert len(frame) == len(diagnostics.rows())
    tanh_std = frame[(frame.layer == "4") & (frame.metric == m.ACT_STD)]
    steps, values = diagnostics.series("4", m.ACT_STD)
    assert tanh_std.step.tolist() == steps.tolist()
    np.testing.assert_array_equal(tanh_std.value.to_numpy(), values)
    wide = frame[frame.metric == m.UPDATE_TO_DATA].pivot(index="step", columns="layer", values="value")
    assert wide.loc[3, "2.weight"] == diagnostics.value("2.weight", m.UPDATE_TO_DATA, 3)


def test_histograms_to_pandas_keeps_every_bin(run_dir):
    pytest.importorskip("pandas", reason="the pandas extra is not installed")
    diagnostics = load_diagnostics(run_dir)
    frame = diagnostics.histograms_to_pandas()
    rows = frame[(frame.layer == "4") & (frame.metric == m.HIST_ACT) & (frame.step == 3)]
    histogram = diagnostics.histogram("4", m.HIST_ACT, 3)
    assert rows["count"].tolist() == histogram.counts.tolist()
    np.testing.assert_allclose(rows.lo.to_numpy(), histogram.edges[:-1])
    np.testing.assert_allclose(rows.hi.to_numpy(), histogram.edges[1:])


def test_parquet_round_trip(run_dir, tmp_path):
    pandas = pytest.importorskip("pandas", reason="the pandas extra is not installed")
    pytest.importorskip("pyarrow", reason="the pandas extra (pyarrow) is not installed")
    diagnostics = load_diagnostics(run_dir)
    path = diagnostics.to_parquet(tmp_path / "scalars.parquet", tmp_path / "histograms.parquet")
    back = pandas.read_parquet(path)
    assert back.equals(diagnostics.to_pandas())
    assert len(pandas.read_parquet(tmp_path / "histograms.parquet")) == sum(
        len(h.counts) for by_step in diagnostics.histograms.values() for h in by_step.values()
    )


def test_a_missing_pandas_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_pandas)
    with pytest.raises(ImportError, match=r"normlab\[pandas\]"):
        Diagnostics().to_pandas()


def test_notebook_display_shows_findings_and_the_main_plots(run_dir):
    diagnostics = load_diagnostics(run_dir)
    page = diagnostics._repr_html_()
    assert "normlab diagnostics" in page and "recorded steps" in page
    assert "No rule fired" in page or "<li><b>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4  # loss, activations, update:data, saturation
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert "nothing recorded" in Diagnostics()._repr_html_()
    assert Monitor.__dict__["_repr_html_"]  # a monitor displays its diagnostics too
