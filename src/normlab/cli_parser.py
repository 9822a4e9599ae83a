"""The argument parser of the `normlab` command (`normlab.cli` runs what it parses).

Building it imports nothing heavy: each subcommand's arguments are added only when that subcommand is asked
for (`build_parser(command)`), the lab's from `normlab.lab.cli` only for `normlab lab`, and the presets and
keys that `normlab train --help` lists are looked up only when that help is printed. Every option's default is
in its help text; argparse errors are one line (`UsageError`), like every user error.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from normlab import __version__

COMMANDS = {
    "train": "train a preset on a words file into a run directory (or continue one with --resume)",
    "sweep": "train a grid of configurations at once, a run directory each, and a summary",
    "sample": "sample words from a run",
    "eval": "loss of a run on a split (or another words file)",
    "calibrate": "set the BatchNorm statistics of a finished run to the training split's",
    "export": "write a run's weights for inference (--fold: BatchNorm folded into the Linear before it)",
    "presets": "list the presets",
    "compile": "compile presets' training steps ahead of time (cached), so that runs of any length start compiled",
    "report": "rebuild report.html of a run, or write the comparison page of a sweep",
    "inspect": "one forward and backward pass of a preset at initialisation",
    "lab": "measure, check and draw the lesson's claims (`lab list`, `lab run`)",
}
DEFAULT_PRESET = "lesson-batchnorm"  # equal to normlab.config.DEFAULT_PRESET (a test checks), without importing it


class UsageError(Exception):
    """A command line argparse cannot parse; printed as one line like every user error."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help texts with the default of every option that has one; descriptions and epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`UsageError`), with defaults in its help texts and an
    epilog that may be computed only when the help is shown (`epilog_factory`)."""

    def __init__(self, *args: Any, epilog_factory: Callable[[], str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self.epilog_factory = epilog_factory

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()

    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def presets_and_keys() -> str:
    """The epilog of `normlab train --help`: every preset, and every key `--set` takes, by section."""
    import textwrap

    from normlab.config import PRESETS, config_keys

    lines = ["presets (`normlab presets -v` prints their full configs):"]
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        lines += textwrap.wrap(preset.description, 110, initial_indent=f"  {name:{width}}  ",
                               subsequent_indent=" " * (width + 4))
    lines += ["", "keys of --set KEY=VALUE (bare when only one section has it, else model., train. or data. first):"]
    for section in ("model", "train", "data"):
        names = [key.split(".", 1)[1] for key in config_keys() if key.startswith(f"{section}.")
                 and key != "data.sha256"]
        lines += textwrap.wrap(", ".join(names), 110, initial_indent=f"  {section}: ", subsequent_indent="    ")
    return "\n".join(lines)


def _config_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The arguments every command that builds a configuration shares: --set, --data, --split-seed."""
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help=f"override a config value{what}, e.g. --set n_hidden=300 --set train.lr=0.05 "
                             "(repeatable; `normlab train --help` lists the keys)")
    parser.add_argument("--data", help="UTF-8 file, one word per line (default: the bundled names)")
    parser.add_argument("--split-seed", type=int,
                        help="seed of the 80/10/10 split of the words (default: 42, the lesson's split)")


def _train(parser: Parser) -> None:
    parser.epilog_factory = presets_and_keys
    parser.add_argument("--preset", help=f"a preset listed below (default: {DEFAULT_PRESET})")
    _config_arguments(parser, "")
    parser.add_argument("--out", required=True, help="run directory to create (or continue with --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint; with --set steps=N, train it to N steps "
                             "in all (e.g. to extend a finished run)")
    parser.add_argument("--calibrate", action="store_true", help="recompute BatchNorm statistics at the end")
    parser.add_argument("--diagnose", action="store_true", help="record diagnostics and write report.html")
    parser.add_argument("--every", type=int,
                        help="steps between diagnostic recordings (default: steps/200, 200 recordings a run; "
                             "1,000 steps apart for the lesson's 200,000)")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="stream the losses (and with --diagnose, every recorded statistic) to TensorBoard event "
                             "files in DIR while training runs: tensorboard --logdir DIR (default: none)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: train.device, cpu)")
    parser.add_argument("--threads", type=int, help="torch threads (default: 1 for lesson-sized models, else torch's)")
    parser.add_argument("--nproc", type=int,
                        help="train on N local processes with DistributedDataParallel, launched by torch's elastic "
                             "launcher (as torchrun --nproc_per_node N); batch_size must be divisible by N "
                             "(default: one process)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_ray_argument(parser: argparse.ArgumentParser) -> None:
    """`--ray [ADDRESS]`, for every command that runs sweeps."""
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="train the lockstep groups as Ray tasks: on a local Ray instance, or on the cluster at "
                             "ADDRESS (e.g. auto, ray://host:10001); needs the extra normlab[ray] (default: local "
                             "processes)")


def _sweep(parser: Parser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="a preset from `normlab presets`")
    _config_arguments(parser, " for all runs")
    parser.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...",
                        help="values to try, e.g. --vary lr=0.05,0.1 --vary seed=1,2,3 (every combination)")
    parser.add_argument("--out", required=True, help="folder to create, one run directory per configuration")
    parser.add_argument("--diagnose", action="store_true", help="record diagnostics and write each run's report")
    parser.add_argument("--every", type=int, help="steps between diagnostic recordings (default: ten a run)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_argument(parser)


def _sample(parser: Parser) -> None:
    parser.add_argument("run", help="a run directory")
    parser.add_argument("-n", type=int, help="number of words (default: 20)")
    parser.add_argument("--temperature", type=float, help="> 0; below 1 sharpens, above 1 flattens (default: 1.0)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely characters (default: all)")
    parser.add_argument("--seed", type=int, help="seed of the draws (default: 0)")
    parser.add_argument("--greedy", action="store_true", help="the most likely character every time: one word")


def _eval(parser: Parser) -> None:
    parser.add_argument("run", help="a run directory")
    parser.add_argument("--split", choices=("train", "val", "test"), help="a split of the run's words (default: val)")
    parser.add_argument("--data", help="evaluate on every word of this file instead of a split")


def _run_only(parser: Parser) -> None:
    parser.add_argument("run", help="a run directory")


def _export(parser: Parser) -> None:
    parser.add_argument("run", help="a run directory")
    parser.add_argument("--out", required=True, help="the file to write, ending in .safetensors")
    parser.add_argument("--fold", action="store_true",
                        help="fold every eval-mode BatchNorm that follows a Linear into it (inference only)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def _compile(parser: Parser) -> None:
    parser.add_argument("--preset", action="append",
                        help="a preset to compile (repeatable; default: every preset the stacked engine trains)")
    _config_arguments(parser, " for every preset")
    parser.add_argument("--threads", type=int, help="torch threads (default: as `normlab train` chooses)")


def _presets(parser: Parser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="print each preset's full config")


def _report(parser: Parser) -> None:
    parser.add_argument("run", help="a run directory, or the --out of a `normlab sweep`")
    parser.add_argument("--tensorboard", action="store_true", help="also export a run to RUN/tensorboard/")


def _inspect(parser: Parser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="a preset from `normlab presets`")
    _config_arguments(parser, "")
    parser.add_argument("--batch", type=int, default=256, help="examples in the batch")


def _lab(parser: Parser) -> None:
    from normlab.lab.cli import add_lab_arguments

    add_lab_arguments(parser)


BUILDERS = {"train": _train, "sweep": _sweep, "sample": _sample, "eval": _eval, "calibrate": _run_only,
            "export": _export, "presets": _presets, "compile": _compile, "report": _report, "inspect": _inspect,
            "lab": _lab}


def command_of(argv: list[str]) -> str | None:
    """The subcommand an argument list asks for (its first argument that is not an option), if it is one."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(command: str | None = None, *, every: bool = False) -> Parser:
    """The parser of the `normlab` command with the arguments of `command` (all of them with `every`); the
    other subcommands are listed with their one-line help only."""
    parser = Parser(prog="normlab", description="Activations, gradients and BatchNorm: a lab.")
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        subparser = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        if every or name == command:
            BUILDERS[name](subparser)
    return parser
