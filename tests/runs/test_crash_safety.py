"""Crash safety of run directories: a process killed at any instant leaves a checkpoint that resumes bit-exact;
what it left half-written is cleaned up; one process writes a run at a time; no link leads out of it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_SETTINGS, tiny_command, user_error

import normlab.runs.rundir as rundir_module
from normlab.cli import main
from normlab.runs.rundir import RunDir

from .helpers import assert_same_checkpoint, checkpoint_file

# A run that checkpoints after every step; its evaluations every 5 steps are the metrics rows to keep exact. Long
# enough that every kill comes before the end, however fast the machine (a step and its save take milliseconds).
STEPS = 150
KILL_SETTINGS = [f"steps={STEPS}", "checkpoint_every=1", "eval_every=5"]
KILLS = 3  # per engine
SEED = 0 if os.environ.get("CI") else random.randrange(2**32)  # CI draws the same instants every time


def _settings(engine: str) -> list[str]:
    args = []
    for item in [*TINY_SETTINGS, *KILL_SETTINGS, f"engine={engine}"]:
        args += ["--set", item]
    return args


def _checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _start(out: Path, words_file: Path, engine: str) -> subprocess.Popen:
    if (out / "config.json").exists():
        args = ["train", "--resume", "--out", str(out), "--quiet"]
    else:
        args = ["train", "--preset", "lesson-batchnorm", "--data", str(words_file), "--out", str(out), "--quiet",
                *_settings(engine)]
    return subprocess.Popen([sys.executable, "-m", "normlab", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_a_new_checkpoint(out: Path, process: subprocess.Popen, before: int) -> None:
    deadline = time.monotonic() + 300
    while _checkpoint_step(out) <= before and process.poll() is None:
        assert time.monotonic() < deadline, "the training process made no progress"
        time.sleep(0.005)
    if process.poll() not in (None, 0):
        pytest.fail(f"the training process failed: {process.stderr.read()}")


@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_sigkill_at_random_instants_then_resume_ends_bit_exact(tmp_path, words_file, engine, capsys):
    reference = tmp_path / "uninterrupted"
    assert tiny_command("train", "lesson-batchnorm", reference, words_file, "--set", f"steps={STEPS}", "--set",
                        "eval_every=5", "--set", f"engine={engine}") == 0  # checkpoints change no weight
    rng = random.Random(SEED)
    out, killed = tmp_path / "killed", 0
    for _ in range(KILLS):
        if _checkpoint_step(out) >= STEPS:
            break
        process = _start(out, words_file, engine)
        _wait_for_a_new_checkpoint(out, process, _checkpoint_step(out))
        time.sleep(rng.uniform(0.0, 0.05))  # then a random instant: most of a step's time is its checkpoint's save
        process.send_signal(signal.SIGKILL)
        killed += process.wait() == -signal.SIGKILL
    assert killed >= 2, f"the run finished before it could be killed (seed {SEED})"
    if _checkpoint_step(out) < STEPS:
        assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0, f"seed {SEED}"
    assert_same_checkpoint(out, reference)
    steps = [row["step"] for row in RunDir.open(out).read_metrics() if "val_loss" in row]
    assert steps == list(range(5, STEPS + 1, 5)), f"seed {SEED}"  # no row lost or repeated
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("checkpoint-")]
    assert leftovers == [f"checkpoint-{STEPS}"], f"seed {SEED}"


class _Killed(BaseException):
    """Stands for the process dying at that instant."""


def test_a_save_cut_short_at_any_write_leaves_the_previous_checkpoint(tmp_path, words_file, monkeypatch, capsys):
    reference = tmp_path / "uninterrupted"
    assert tiny_command("train", "lesson-batchnorm", reference, words_file) == 0
    original = rundir_module.atomic_write
    for write in range(3):  # the model file, the optimizer file, checkpoint.json: the save of step 80 dies there
        out = tmp_path / f"cut-{write}"
        calls = []

        def dying_write(path, data, calls=calls, write=write):
            path = Path(path)
            if path.parent.name == "checkpoint-80" or (path.name == "checkpoint.json"
                                                       and (path.parent / "checkpoint-80").exists()):
                calls.append(path)
                if len(calls) == write + 1:
                    raise _Killed
            original(path, data)

        monkeypatch.setattr(rundir_module, "atomic_write", dying_write)
        with pytest.raises(_Killed):
            tiny_command("train", "lesson-batchnorm", out, words_file)
        monkeypatch.setattr(rundir_module, "atomic_write", original)
        run = RunDir.open(out, lock="test")
        state, step = run.load_state()
        assert step == 40 and run.load_optimizer_state(40)  # the previous checkpoint, whole
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-40"]
        run.release()
        assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
        assert_same_checkpoint(out, reference)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, words_file, capsys):
    reference = tmp_path / "uninterrupted"
    assert tiny_command("train", "lesson-batchnorm", reference, words_file) == 0
    out = tmp_path / "early"
    assert tiny_command("train", "lesson-batchnorm", out, words_file, "--set", "steps=40") == 0
    config = json.loads((out / "config.json").read_text())
    config["train"]["steps"] = 120
    (out / "config.json").write_text(json.dumps(config))  # as created for 120 steps...
    for path in [out / "checkpoint.json", *sorted(out.glob("checkpoint-*/*")), *out.glob("checkpoint-*")]:
        path.unlink() if path.is_file() else path.rmdir()  # ...and killed before its first checkpoint,
    (out / "checkpoint-40").mkdir()  # in the middle of writing it,
    (out / "checkpoint-40" / "model.safetensors").write_bytes(b"half")
    (out / ".metrics.jsonl.abcd1234.tmp").write_text("{}")
    with open(out / "metrics.jsonl", "a") as file:
        file.write('{"step": 45, "val_lo')  # and in the middle of a metrics line
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    assert_same_checkpoint(out, reference)
    assert [row["step"] for row in RunDir.open(out).read_metrics()] == [40, 80, 120, 120]  # the last: final
    assert not list(out.glob(".*.tmp")) and not (out / "checkpoint-40").exists()


def test_a_run_directory_in_the_old_layout_opens_and_resumes_into_the_new(tmp_path, words_file, capsys):
    reference = tmp_path / "uninterrupted"
    assert tiny_command("train", "lesson-batchnorm", reference, words_file) == 0
    out = tmp_path / "old"  # the first 40 steps of the 120 (its learning rate decays at step 60 too)
    assert tiny_command("train", "lesson-batchnorm", out, words_file, "--set", "steps=40", "--set",
                        "lr_decay_step=60") == 0
    for name in ("model.safetensors", "optimizer.safetensors"):  # model and optimizer beside config.json
        checkpoint_file(out, name).rename(out / name)
    (out / "checkpoint-40").rmdir()
    (out / "checkpoint.json").unlink()
    config = json.loads((out / "config.json").read_text())
    config["train"]["steps"] = 120
    (out / "config.json").write_text(json.dumps(config))
    assert main(["sample", str(out), "-n", "3"]) == 0 and main(["eval", str(out)]) == 0
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    assert_same_checkpoint(out, reference)
    assert not (out / "model.safetensors").exists() and not (out / "optimizer.safetensors").exists()


def test_one_process_writes_a_run_at_a_time(tmp_path, words_file, capsys):
    out = tmp_path / "run"
    assert tiny_command("train", "lesson-batchnorm", out, words_file, "--set", "steps=40") == 0
    rows = len(RunDir.open(out).read_metrics())
    holder = RunDir.open(out, lock="train")  # another process training it (flock: per open file, even here)
    for command in (["train", "--resume", "--set", "steps=80", "--out", str(out)], ["calibrate", str(out)]):
        assert main(command) == 2
        assert f"is in use by another normlab process (pid {os.getpid()}, train)" in user_error(capsys)
    assert len(RunDir.open(out).read_metrics()) == rows  # nothing written, nothing repeated
    assert main(["sample", str(out), "-n", "2"]) == 0  # reading needs no lock
    holder.release()
    assert main(["train", "--resume", "--set", "steps=80", "--out", str(out), "--quiet"]) == 0


def test_a_symbolic_link_out_of_the_run_directory_is_refused(tmp_path, words_file, capsys):
    out = tmp_path / "run"
    assert tiny_command("train", "lesson-batchnorm", out, words_file) == 0
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_bytes((out / "metrics.jsonl").read_bytes())
    before = outside.read_bytes()
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(outside)
    for command in (["calibrate", str(out)], ["train", "--resume", "--set", "steps=160", "--out", str(out)],
                    ["report", str(out)], ["eval", str(out)]):
        assert main(command) == 2
        assert "symbolic link" in user_error(capsys)
    assert outside.read_bytes() == before
