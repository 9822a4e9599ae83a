"""`normlab lab list` and `normlab lab run NAME|all [--quick] [--out DIR] [--data FILE] [--force]`.

`add_lab_commands(subparsers)` adds the `lab` command to the project's parser; each handler returns an exit code
and lets `NormlabError` through, for the main CLI to print as one line.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any


def _list(args: argparse.Namespace) -> int:
    from normlab.lab.registry import EXPERIMENTS

    width = max(map(len, EXPERIMENTS))
    for name, experiment in EXPERIMENTS.items():
        budgets = experiment.budgets()
        print(f"{name.ljust(width)}  {experiment.title}")
        print(f"{''.ljust(width)}  quick: {budgets['quick']}")
        print(f"{''.ljust(width)}  full:  {budgets['full']}")
        if args.verbose:
            claim = textwrap.fill(f"claim: {experiment.claim}", 100, break_on_hyphens=False)  # keep "one-hidden-layer"
            print(textwrap.indent(claim, " " * (width + 2)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from normlab.cli import ray_backend
    from normlab.lab.runner import run_experiments

    results = run_experiments([args.name], mode="quick" if args.quick else "full", out=args.out, data=args.data,
                              progress=not args.quiet, force=args.force, backend=ray_backend(args.ray),
                              log=None if args.quiet else lambda line: print(f"lab: {line}", file=sys.stderr))
    for result in results:
        print(f"{result.name}: {result.verdict}  ({result.seconds:.1f} s)  {result.directory}")
    if args.name == "all":
        print(f"{sum(r.verdict == 'HOLDS' for r in results)} of {len(results)} claims hold; page: "
              f"{results[0].directory.parent / 'index.html'}")
    return 0


LAB_HELP = "measure, check and draw the lesson's claims (`lab list`, `lab run`)"


def add_lab_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `lab list` and `lab run` to `subparsers` (from `ArgumentParser.add_subparsers`); returns the `lab`
    parser. Handlers are set as the `handler` default, each taking the parsed namespace and returning an exit code."""
    lab = subparsers.add_parser("lab", help=LAB_HELP)
    add_lab_arguments(lab)
    return lab


def add_lab_arguments(lab: argparse.ArgumentParser) -> None:
    """Add the `list` and `run` subcommands to the `lab` parser (the main CLI adds them only when `lab` is the
    command, so that `normlab --help` imports nothing of the lab)."""
    commands = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    listing = commands.add_parser("list", help="the experiments, their budgets (and with -v their claims)")
    listing.add_argument("-v", "--verbose", action="store_true", help="also print each claim")
    listing.set_defaults(handler=_list)

    run = commands.add_parser("run", help="run one experiment (or all) and write its result, figures and summary")
    run.add_argument("name", help="an experiment from `normlab lab list`, or all (also writes index.html)")
    run.add_argument("--quick", action="store_true", help="small budgets: under a minute per experiment")
    run.add_argument("--out", default="lab", help="output folder, one subfolder per experiment")
    run.add_argument("--data", help="UTF-8 file, one word per line (default: the bundled names)")
    run.add_argument("--force", action="store_true", help="replace existing results in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    from normlab.cli_parser import add_ray_argument

    add_ray_argument(run)
    run.set_defaults(handler=_run)
