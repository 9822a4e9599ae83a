"""Run experiments and write what they found: per experiment `result.json`, PNG figures and `summary.md` in one
folder (`OUT/NAME/`), and `OUT/index.html` with every experiment of a run.

An existing non-empty experiment folder (or index page) is never replaced unless `force=True`; with it, the new
folder is written in full beside the old one and swapped in by renames, so an interrupted run leaves either the
old result or the new one, never a mixture. Every file is written with `normlab.files.atomic_write`.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.errors import ConfigError
from normlab.files import atomic_write, usual_permissions
from normlab.lab.common import MODES, Check, Experiment, LabData
from normlab.lab.registry import EXPERIMENTS, get_experiment
from normlab.sweeps.runner import use_backend
from normlab.training.threads import torch_threads

RESULT, SUMMARY, INDEX = "result.json", "summary.md", "index.html"


@dataclass
class LabResult:
    """What one experiment found, and where its files are."""

    name: str
    title: str
    claim: str
    verdict: str
    checks: list[Check]
    directory: Path
    figures: list[Path]
    seconds: float


def run_experiment(name: str, *, mode: str = "full", out: str | Path = "lab", data: LabData | str | Path | None = None,
                   progress: bool = True, force: bool = False, log: Callable[[str], None] | None = None,
                   backend: Any = None) -> LabResult:
    """Run the experiment `name` in `mode` (tiny, quick or full) and write its folder `out/name`."""
    return run_experiments([name], mode=mode, out=out, data=data, progress=progress, force=force, log=log,
                           backend=backend)[0]


def run_experiments(names: Sequence[str], *, mode: str = "full", out: str | Path = "lab",
                    data: LabData | str | Path | None = None, progress: bool = True, force: bool = False,
                    index: bool = False, log: Callable[[str], None] | None = None,
                    backend: Any = None) -> list[LabResult]:
    """Run the named experiments one after the other (`["all"]`: every one, and the index page); returns their
    results in order.

    Everything is checked before any work starts: the names, the mode, and that no folder (nor the index page)
    would be replaced without `force`. `data` is loaded once: a `LabData`, a words file, or None (the bundled
    names). `progress` shows the sweeps' progress bars; `log`, if given, gets a line as each experiment starts and
    ends. `backend`: where the experiments' sweeps train (`normlab.sweeps.backends`, e.g. a `RayBackend`; None:
    local processes).
    """
    if mode not in MODES:
        raise ConfigError(f"unknown lab mode {mode!r}: choose one of {', '.join(MODES)}")
    if list(names) == ["all"]:
        names, index = list(EXPERIMENTS), True
    experiments = [get_experiment(name) for name in names]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file: give a folder (it is created if missing)")
    targets = [out / experiment.name for experiment in experiments] + ([out / INDEX] if index else [])
    if not force:
        taken = [str(path) for path in targets if _occupied(path)]
        if taken:
            raise ConfigError(f"{', '.join(taken)} already exist(s) and would be replaced: pass --force to replace "
                              "them, or choose another --out")
    if not isinstance(data, LabData):
        data = LabData.load(data)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create --out {str(out)!r} ({error.strerror or error}): choose another folder"
                          ) from None
    with torch_threads(1), use_backend(backend):  # lesson-sized work: a second thread costs much on a busy machine
        results = [_run_one(experiment, mode, out, data, progress, log) for experiment in experiments]
    if index:
        from normlab.lab.page import index_page

        atomic_write(out / INDEX, index_page(results, mode))
    return results


def _occupied(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _run_one(experiment: Experiment, mode: str, out: Path, data: LabData, progress: bool,
             log: Callable[[str], None] | None) -> LabResult:
    settings = experiment.settings[mode]
    if log is not None:
        log(f"{experiment.name} ({mode}: {experiment.budget(settings)})")
    started = time.perf_counter()
    measurements = experiment.measure(settings, data, progress)
    verdict = experiment.check(measurements)
    figures = experiment.draw(measurements)
    seconds = time.perf_counter() - started
    target = out / experiment.name
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=f".{experiment.name}.new-"))
    try:
        usual_permissions(scratch)  # mkdtemp's 0700 would stay with the folder once it is swapped in
        for stem, figure in figures.items():
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png")
            atomic_write(scratch / f"{stem}.png", buffer.getvalue())
        names = [f"{stem}.png" for stem in figures]
        result = {"name": experiment.name, "title": experiment.title, "claim": experiment.claim,
                  "verdict": verdict.text, "checks": [asdict(check) for check in verdict.checks],
                  "config": {"mode": mode, "settings": asdict(settings), "budget": experiment.budget(settings),
                             "data": data.path or "bundled names", "vocab_size": len(data.vocab),
                             "torch": torch.__version__, "seconds": round(seconds, 2)},
                  "measurements": measurements, "figures": names}
        atomic_write(scratch / RESULT, json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
        atomic_write(scratch / SUMMARY, _summary(experiment, verdict.text, list(verdict.checks), measurements, names,
                                                 mode, settings, seconds))
        _swap_in(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if log is not None:  # the verdict is the caller's to print, once
        log(f"{experiment.name} done ({seconds:.1f} s)")
    return LabResult(experiment.name, experiment.title, experiment.claim, verdict.text, list(verdict.checks), target,
                     [target / name for name in names], seconds)


def _swap_in(scratch: Path, target: Path) -> None:
    """Put the finished folder `scratch` in place of `target` by renames (the old folder is removed after)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
    os.replace(scratch, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def json_safe(value: Any) -> Any:
    """`value` with NaN and Inf floats as None (strict JSON), tuples as lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def _summary(experiment: Experiment, verdict: str, checks: list[Check], measurements: dict[str, Any],
             figures: list[str], mode: str, settings: Any, seconds: float) -> str:
    lines = [f"# {experiment.name}: {experiment.title}", "", f"**Claim.** {experiment.claim}", "",
             f"**Verdict: {verdict}**", "", "| check | measured | passed |", "|---|---|---|"]
    lines += [f"| {check.name} | {check.measured} | {'yes' if check.passed else 'NO'} |" for check in checks]
    lines += ["", *experiment.table(measurements), ""]
    lines += [f"![{name}]({name})" for name in figures]
    lines += ["", f"Mode {mode}: {experiment.budget(settings)}; {seconds:.1f} s."]
    return "\n".join(lines) + "\n"
