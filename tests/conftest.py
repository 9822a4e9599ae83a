"""Shared fixtures: a tiny word list and tiny run configurations, so end-to-end tests take seconds."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# CI (`.ci/run` sets CI=1) draws the same hypothesis examples on every run, so that a red CI means a change broke
# something, not that a new example turned up there; local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Compiled training steps go to a cache of this test session (subprocesses inherit it), not the user's.
os.environ["NORMLAB_CACHE"] = tempfile.mkdtemp(prefix="normlab-test-cache-")

TINY_WORDS = """
emma olivia ava isabella sophia charlotte mia amelia harper evelyn abigail emily elizabeth mila ella avery
sofia camila aria scarlett victoria madison luna grace chloe penelope layla riley zoey nora lily eleanor
hannah lillian addison aubrey ellie stella natalie zoe leah hazel violet aurora savannah audrey brooklyn
bella claire skylar liam noah william james oliver benjamin elijah lucas mason logan alexander ethan jacob
michael daniel henry jackson sebastian aiden matthew samuel david joseph carter owen wyatt john jack luke
jayden dylan grayson levi isaac gabriel julian mateo anthony jaxon lincoln joshua christopher andrew
theodore caleb ryan
""".split()

TINY_SETTINGS = ["n_hidden=16", "n_embd=4", "steps=120", "batch_size=8", "eval_every=40", "checkpoint_every=40",
                 "eval_examples=200"]


@pytest.fixture
def words_file(tmp_path: Path) -> Path:
    """A UTF-8 file of about a hundred names, one per line."""
    path = tmp_path / "words.txt"
    path.write_text("\n".join(TINY_WORDS) + "\n", encoding="utf-8")
    return path


def tiny_command(command: str, preset: str, out: Path, words: Path | str, *extra: str) -> int:
    """Run `normlab COMMAND --preset PRESET --data WORDS --out OUT` with the tiny settings; its exit code."""
    from normlab.cli import main

    args = [command, "--preset", preset, "--data", str(words), "--out", str(out), "--quiet"]
    for item in TINY_SETTINGS:
        args += ["--set", item]
    return main(args + list(extra))


def user_error(capsys) -> str:
    """The one line a user error printed (after checking there is no traceback)."""
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: ") and "Traceback" not in err
    return err
