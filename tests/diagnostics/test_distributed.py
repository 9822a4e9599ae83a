"""The Monitor under DDP: two gloo processes, each with half of the batch, record the global batch's statistics,
equal to one process on the whole batch (histograms bin for bin); only rank 0 writes; a mismatch is an error on
every process, not a hang."""

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from normlab.diagnostics import load_diagnostics

from . import distributed_worker as worker

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo backend"
)


def _spawn(tmp_path, mismatch=False):
    mp.spawn(worker.run, args=(2, str(tmp_path / "init"), str(tmp_path), mismatch), nprocs=2, join=True)


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ddp")
    _spawn(directory)
    return directory


def test_two_processes_record_what_one_records_on_the_whole_batch(distributed_run):
    model = worker.make_model()
    reference = worker.train(model, model, slice(None), {"process_group": None})
    reference.close()
    expected = reference.diagnostics
    actual = load_diagnostics(distributed_run / "rank0")
    assert actual.settings["processes"] == 2
    assert [row[:3] for row in actual.rows()] == [row[:3] for row in expected.rows()]
    np.testing.assert_allclose(
        [row[3] for row in actual.rows()], [row[3] for row in expected.rows()], rtol=1e-9, atol=1e-15
    )
    assert actual.histograms.keys() == expected.histograms.keys() and expected.histogram_steps_all() == [0, 2]
    for key, by_step in expected.histograms.items():
        for step, histogram in by_step.items():
            np.testing.assert_array_equal(actual.histograms[key][step].counts, histogram.counts, err_msg=str(key))
            assert (actual.histograms[key][step].lo, actual.histograms[key][step].hi) == pytest.approx(
                (histogram.lo, histogram.hi), rel=1e-12
            )


def test_only_rank_zero_writes(distributed_run):
    assert (distributed_run / "rank0" / "diagnostics" / "scalars.csv").is_file()
    assert not (distributed_run / "rank1").exists()
    assert json.loads((distributed_run / "done0.json").read_text()) == {"main": True}
    assert json.loads((distributed_run / "done1.json").read_text()) == {"main": False}


def test_processes_recording_different_modules_all_raise_instead_of_hanging(tmp_path):
    _spawn(tmp_path, mismatch=True)
    errors = [(tmp_path / f"error{rank}.txt").read_text() for rank in range(2)]
    assert all("same modules the same number of times" in error for error in errors)
