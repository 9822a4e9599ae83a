"""Hostile but fair input, drawn at random: damaged run directories and odd argument lists thrown at every command.
Whatever comes, the answer is exit 0, or exit 2 with one `normlab: error: ...` line; never a traceback.

Hypothesis draws the cases (a fixed set in CI, see conftest.py); a failure prints the command and the damage.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import TINY_SETTINGS, TINY_WORDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normlab.cli import main

ODD_VALUES = [None, -1, 0, 1, 2.5, 10**12, math.nan, "x", "", "../outside", [], {}, True, "\u00e9"]
SETTINGS = [f"{key}={value}" for item in TINY_SETTINGS for key, value in [item.split("=")]]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A folder with a words file and a good, finished run directory."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "words.txt").write_text("\n".join(TINY_WORDS) + "\n")
    args = ["train", "--data", str(folder / "words.txt"), "--out", str(folder / "good"), "--quiet"]
    for item in TINY_SETTINGS:
        args += ["--set", item]
    assert main(args) == 0
    return folder


def _files(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*") if p.is_file() and not p.is_symlink())


def _json_files(run: Path) -> list[Path]:
    return [p for p in _files(run) if p.suffix in (".json", ".jsonl")]


def _set_odd_value(data: st.DataObject, path: Path) -> str:
    """Put an odd value somewhere in a JSON file (a document, or one line of a .jsonl)."""
    documents = path.read_text(errors="replace").splitlines() if path.suffix == ".jsonl" else [path.read_text()]
    number = data.draw(st.integers(0, max(0, len(documents) - 1)))
    try:
        value = json.loads(documents[number])
    except (ValueError, IndexError):
        return f"left {path.name} as it was (not JSON)"
    holder, keys = value, []
    while isinstance(holder, (dict, list)) and holder:
        key = data.draw(st.sampled_from(sorted(holder) if isinstance(holder, dict) else range(len(holder))))
        keys.append(key)
        if not isinstance(holder[key], (dict, list)) or data.draw(st.booleans()):
            holder[key] = data.draw(st.sampled_from(ODD_VALUES))
            break
        holder = holder[key]
    documents[number] = json.dumps(value)
    path.write_text("\n".join(documents) + "\n")
    return f"set {path.name} document {number} {keys} to an odd value"


def _damage(data: st.DataObject, run: Path, outside: Path) -> str:
    kind = data.draw(st.sampled_from(["delete", "truncate", "flip", "json", "garbage line", "folder", "link out",
                                      "empty"]))
    if kind == "json":
        return _set_odd_value(data, data.draw(st.sampled_from(_json_files(run))))
    path = data.draw(st.sampled_from(_files(run)))
    size = path.stat().st_size
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(path.read_bytes()[: data.draw(st.integers(0, max(0, size - 1)))])
    elif kind == "flip":
        content = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, max(0, len(content) - 1)))
            if content:
                content[position] ^= 1 << data.draw(st.integers(0, 7))
        path.write_bytes(bytes(content))
    elif kind == "garbage line":
        with open(path, "ab") as file:
            file.write(data.draw(st.sampled_from([b"{oops\n", b"[1]\n", b'{"step": -5}\n', b"\xff\xfe\n"])))
    elif kind == "folder":
        path.unlink()
        path.mkdir()
    elif kind == "link out":
        path.unlink()
        path.symlink_to(outside)
    else:
        path.write_bytes(b"")
    return f"{kind} {path.relative_to(run)}"


def _run_commands(run: Path, place: Path) -> list[list[str]]:
    out = str(place / "out.safetensors")
    return [["sample", str(run), "-n", "3"], ["sample", str(run), "--greedy"], ["eval", str(run)],
            ["eval", str(run), "--data", str(place / "words.txt")], ["calibrate", str(run)], ["report", str(run)],
            ["export", str(run), "--fold", "--force", "--out", out],
            ["train", "--resume", "--out", str(run), "--quiet"],
            ["train", "--resume", "--set", "steps=140", "--out", str(run), "--quiet"]]


def _check(argv: list[str], what: str) -> None:
    """Run `normlab ARGV`: exit 0, or exit 2 with one error line; never a traceback."""
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
    except SystemExit as exit_:  # --help and --version
        code = exit_.code
    except BaseException as error:
        pytest.fail(f"normlab {' '.join(argv)} ({what}) raised {type(error).__name__}: {error}")
    lines = stderr.getvalue().splitlines()
    errors = [line for line in lines if line.startswith("normlab: error: ")]
    assert "Traceback" not in stderr.getvalue(), (argv, what)
    assert code in (0, 2), (argv, what, code, lines)
    assert len(errors) == (1 if code == 2 else 0), (argv, what, lines)
    assert all(line.startswith("normlab: ") for line in lines), (argv, what, lines)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_run_directories_give_exit_0_or_one_line(place, data):
    run = place / "case"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(place / "good", run, symlinks=True)
    outside = place / "outside.txt"
    outside.write_text("{}")
    damage = [_damage(data, run, outside) for _ in range(data.draw(st.integers(1, 2)))]
    _check(data.draw(st.sampled_from(_run_commands(run, place))), "; ".join(damage))


TOKENS = ["--set", "n_hidden=0", "n_hidden=8", "lr=-1", "steps=5", "device=xyz", "norm=bogus", "norm=group",
          "batch_size=1", "data.path=/nonexistent", "=", "", "--every", "0", "3", "-1", "x", "--diagnose",
          "--calibrate", "--preset", "nope", "lesson-kaiming", "--data", "WORDS", "MISSING", "FOLDER",
          "--split-seed", "--threads", "--temperature", "nan", "1e999", "--top-k", "-n", "--seed", "--greedy",
          "--split", "val", "--fold", "--force", "--out", "NEW", "RUN", "--resume", "--tensorboard", "--batch",
          "--vary", "lr=0.1,0.2", "seed=1", "-v", "--device", "cuda", "--help", "--version", "--quiet"]
COMMANDS = ["train", "sweep", "sample", "eval", "calibrate", "export", "report", "inspect", "presets", "lab", "nope"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(COMMANDS), tokens=st.lists(st.sampled_from(TOKENS), max_size=7),
       run_first=st.booleans())
def test_odd_argument_lists_give_exit_0_or_one_line(place, command, tokens, run_first):
    names = {"WORDS": str(place / "words.txt"), "MISSING": str(place / "missing.txt"), "FOLDER": str(place),
             "RUN": str(place / "copy"), "NEW": str(place / "new")}
    shutil.rmtree(place / "copy", ignore_errors=True)
    shutil.rmtree(place / "new", ignore_errors=True)
    shutil.copytree(place / "good", place / "copy")
    args = [names.get(token, token) for token in tokens]
    if command == "lab":  # only what is quick: listing, or an experiment that does not exist
        args = [token for token in args if token in ("-v", "--help", "x", "nope")]
        args = ["list" if run_first else "run", *args]
    elif run_first and command in ("sample", "eval", "calibrate", "export", "report"):
        args = [names["RUN"], *args]
    if command in ("train", "sweep"):  # whatever the tokens say, tiny and quiet
        args += [item for setting in SETTINGS for item in ("--set", setting)] + ["--quiet"]
    _check([command, *args], "argument list")
