"""`normlab train --nproc 2`: two local processes launched by torch's elastic launcher reproduce the one-process
SyncBatchNorm run; Ctrl-C on the launcher leaves one loadable checkpoint, which resumes in one process where an
uninterrupted run ends; a killed rank stops the others within a bounded time with one line naming it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_SETTINGS

from normlab.cli import main
from normlab.runs.metrics import read_metrics
from normlab.runs.rundir import RunDir

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

SYNC = ["--set", "model.norm=syncbatch", "--quiet"]
LONG = ["--set", "steps=2000", "--set", "checkpoint_every=100", "--set", "eval_every=2000"]
BOUND_S = 120  # a stop or a failure must end every process within this (generous for a loaded 2-core machine)


def _args(words: Path, out: Path, *extra: str) -> list[str]:
    args = ["train", "--preset", "lesson-batchnorm", "--data", str(words), "--out", str(out)]
    for item in TINY_SETTINGS:
        args += ["--set", item]
    return args + SYNC + list(extra)


def _launch(words: Path, out: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The launcher in its own process, as a user starts it; (process, its stderr file)."""
    err = tmp_path / f"{out.name}.err"
    command = [sys.executable, "-m", "normlab", *_args(words, out, *LONG, "--nproc", "2")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(err, "w"),  # noqa: SIM115
                               env={**os.environ, "NORMLAB_DIST_TIMEOUT": "30"})
    return process, err


def _wait_for_checkpoint(out: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + BOUND_S
    while not (out / "checkpoint.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the workers never reached a checkpoint"
        time.sleep(0.2)


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the launcher's worker whose RANK is `rank`."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else 0
            if parent == launcher and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return RunDir.open(path).load_state()[0]


def test_two_processes_reproduce_the_one_process_syncbatchnorm_run(words_file, tmp_path, capfd):
    assert main(_args(words_file, tmp_path / "one")) == 0
    assert main(_args(words_file, tmp_path / "two", "--nproc", "2")) == 0
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
    rows = [read_metrics(tmp_path / name) for name in ("one", "two")]
    assert [row["step"] for row in rows[0]] == [row["step"] for row in rows[1]] == [40, 80, 120, 120]
    assert rows[1][-1]["val"] == pytest.approx(rows[0][-1]["val"], abs=1e-4)
    printed = capfd.readouterr().out
    assert printed.count("final loss") == 2  # the launcher's workers: rank 0 alone reports


def test_ctrl_c_saves_one_checkpoint_that_resumes_in_one_process_to_the_uninterrupted_run(words_file, tmp_path):
    process, err = _launch(words_file, tmp_path / "stopped", tmp_path)
    _wait_for_checkpoint(tmp_path / "stopped", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(BOUND_S) == 130
    lines = err.read_text().splitlines()
    stops = [line for line in lines if line.startswith("interrupted: checkpoint saved at step")]
    assert len(stops) == 1 and "Traceback" not in err.read_text(), lines
    run = RunDir.open(tmp_path / "stopped")
    step = run.model_step()
    assert f"step {step} in" in stops[0] and step % 100 == 0 and 0 < step < 2000
    run.load_optimizer_state(step)  # the pair is complete: it resumes exactly
    assert main(["train", "--resume", "--out", str(tmp_path / "stopped"), "--quiet"]) == 0
    assert main(_args(words_file, tmp_path / "whole", *LONG)) == 0
    whole = _weights(tmp_path / "whole")
    for key, value in _weights(tmp_path / "stopped").items():
        torch.testing.assert_close(value, whole[key], rtol=1e-3, atol=1e-4, msg=key)


def test_a_killed_rank_stops_the_others_with_one_line_and_keeps_the_checkpoint(words_file, tmp_path):
    process, err = _launch(words_file, tmp_path / "killed", tmp_path)
    _wait_for_checkpoint(tmp_path / "killed", process)
    os.kill(_rank_pid(process.pid, 1), signal.SIGKILL)
    assert process.wait(BOUND_S) == 1
    text = err.read_text()
    assert "Traceback" not in text, text
    assert "normlab: error: rank 1 of 2" in text and "was killed by SIGKILL" in text, text
    model, step = RunDir.open(tmp_path / "killed").load_model()
    assert step % 100 == 0 and sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="needs two CUDA GPUs and NCCL (one GPU a rank)")
def test_two_gpus_over_nccl_reproduce_the_one_gpu_syncbatchnorm_run(words_file, tmp_path):
    assert main(_args(words_file, tmp_path / "one", "--device", "cuda")) == 0
    assert main(_args(words_file, tmp_path / "two", "--device", "cuda", "--nproc", "2")) == 0
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
