"""Every experiment of the lab run once in tiny mode (shared by the tests of this folder), on the bundled names."""

from __future__ import annotations

import pytest
import torch

from normlab.lab import LabData, run_experiments


@pytest.fixture(scope="session")
def lab_data() -> LabData:
    """The bundled names, split as the lab splits them."""
    return LabData.load()


@pytest.fixture(scope="session")
def tiny_lab(tmp_path_factory, lab_data):
    """(output folder, results) of `lab run all` in tiny mode."""
    out = tmp_path_factory.mktemp("lab")
    threads = torch.get_num_threads()
    results = run_experiments(["all"], mode="tiny", out=out, data=lab_data, progress=False)
    assert torch.get_num_threads() == threads  # the runner gives back the thread setting it changed
    return out, {result.name: result for result in results}
