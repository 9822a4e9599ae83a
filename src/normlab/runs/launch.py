"""`normlab train --nproc N ...`: the same command in N local worker processes, started by torch's elastic
launcher exactly as `torchrun --standalone --nproc_per_node N -m normlab train ...` starts them (a c10d
rendezvous on a free local port, no restarts). Each worker joins the group from the environment the launcher
sets (`normlab.runs.ranks.as_rank`), so both ways of launching run the same code; a multi-node run is plain
torchrun with its usual flags (`--nnodes`, `--node_rank`, `--rdzv_endpoint`...).

Ctrl-C reaches the launcher, which forwards SIGINT to every worker: they agree on a step at the next sync of the
loop, rank 0 saves one checkpoint there and prints where, and all exit. A worker that dies makes the launcher
stop the others (SIGTERM, then SIGKILL after `SHUTDOWN_TIMEOUT_S`) and print one line naming it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from normlab.config import RunConfig
from normlab.errors import ConfigError

SHUTDOWN_TIMEOUT_S = 30  # how long stopped workers may take to save and leave before SIGKILL
EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_FAILED = 2, 130, 1
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # the elastic agent's


def check_processes(nproc: int, batch_size: int, device: str) -> None:
    """`ConfigError` unless `nproc` processes can share batches of `batch_size` (and, on CUDA, have a GPU each)."""
    from normlab.training.engines.distributed import rank_slice

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    rank_slice(batch_size, 0, nproc)
    if device.startswith("cuda"):
        import torch

        if nproc > torch.cuda.device_count():
            raise ConfigError(f"--nproc {nproc} with --device cuda needs a GPU per process; this machine has "
                              f"{torch.cuda.device_count()}")


def launch_training(argv: Sequence[str], nproc: int, out: str, config: RunConfig | None = None) -> int:
    """Run `normlab ARGV` (a train command) in `nproc` worker processes through
    `torch.distributed.launcher.api.elastic_launch`; the exit code (0, 2 for a user error rank 0 printed, 130
    after Ctrl-C, 1 when a worker failed). `config`: the new run's, checked here first (None: resuming `out`,
    whose config is checked)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from normlab.runs.rundir import RunDir

    config = config or RunDir.open(out).config
    check_processes(nproc, config.train.batch_size, config.train.device)
    try:
        run_processes(sys.executable, ["-m", "normlab", *argv], nproc)
    except SignalException:
        return EXIT_INTERRUPTED  # the workers got the signal too; rank 0 said where it saved
    except ChildFailedError as failed:
        return _failure(failed, nproc, out)
    return 0


def run_processes(entrypoint: Callable[..., Any] | str, args: Sequence[Any], nproc: int) -> dict[int, Any]:
    """`entrypoint(*args)` (a module-level function, or a program and its arguments) in `nproc` local processes
    started by `elastic_launch` as `torchrun --standalone` starts them; each joins the group with
    `normlab.runs.ranks.joined`. Returns {rank: return value} (None for a program); raises elastic_launch's
    `ChildFailedError` if a process fails, `SignalException` on Ctrl-C."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="normlab-launch-") as logs, _worker_environment(), _quiet_launcher():
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"normlab-{uuid.uuid4()}",
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=logs),
                              shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        return elastic_launch(config, entrypoint)(*args)


def _failure(failed: object, nproc: int, out: str) -> int:
    """The exit code for failed workers, and (unless rank 0 already printed a user error) one line on stderr."""
    failures = failed.failures  # type: ignore[attr-defined]  # {rank: ProcessFailure}
    codes = {failure.exitcode for failure in failures.values()}
    if EXIT_USER_ERROR in codes:
        return EXIT_USER_ERROR
    rank, first = min(failures.items(), key=lambda item: (_consequence(item[1].exitcode), item[1].timestamp, item[0]))
    how = f"was killed by {first.signal_name()}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
    print(f"normlab: error: rank {rank} of {nproc} (pid {first.pid}) {how}; the other ranks were stopped. {out} "
          f"keeps its last checkpoint: continue with `normlab train --resume --out {out} --nproc {nproc}`",
          file=sys.stderr)
    return EXIT_FAILED


def _consequence(exitcode: int) -> bool:
    """Whether a worker's exit is what happens to the others when one fails: the line of a rank that lost the
    others (1) or the launcher's SIGTERM."""
    return exitcode in (EXIT_FAILED, -signal.SIGTERM)


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """One OpenMP thread per worker unless OMP_NUM_THREADS says otherwise, as torchrun does; the environment
    and the signal handlers that the elastic agent changes are given back afterwards."""
    environment = dict(os.environ)
    handlers = {number: signal.getsignal(number) for number in HANDLED_SIGNALS}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environment)
        for number, handler in handlers.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """None of the elastic agent's own log lines (rendezvous, signals forwarded, the failed worker, which
    `_failure` names in one line): each of its modules sets its logger's level itself, so each is set here."""
    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
               if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
