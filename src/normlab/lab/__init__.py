"""The lab: every claim of the lesson as an experiment that measures it, checks it by a stated rule, and draws it.

`EXPERIMENTS` maps names to experiments; `run_experiment` / `run_experiments` run them and write `result.json`,
PNG figures and `summary.md` per experiment (and `index.html` for a whole run); `add_lab_commands` adds
`normlab lab list | run` to an argparse parser.
"""

from normlab.lab.cli import add_lab_commands
from normlab.lab.common import DOES_NOT_HOLD, HOLDS, Check, Experiment, LabData, Verdict
from normlab.lab.registry import EXPERIMENTS, get_experiment
from normlab.lab.runner import LabResult, run_experiment, run_experiments

__all__ = [
    "DOES_NOT_HOLD",
    "EXPERIMENTS",
    "HOLDS",
    "Check",
    "Experiment",
    "LabData",
    "LabResult",
    "Verdict",
    "add_lab_commands",
    "get_experiment",
    "run_experiment",
    "run_experiments",
]
