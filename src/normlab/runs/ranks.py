"""The processes of a distributed run, seen from inside one of them: joining torch.distributed's default group
from the environment that torch's elastic launcher sets (`torchrun`, or `normlab train --nproc N`), which rank
writes, and how a rank leaves when something goes wrong.

    rank 0        creates and writes the run directory (config, checkpoints, metrics, final losses, report) and
                  prints; its user errors and its Ctrl-C line are the run's
    other ranks   train, read what they need, write and print nothing; a user error that every rank meets (a
                  bad config, a missing file) or rank 0's (`on_main`) leaves them silently with exit code 2
    any rank      losing the others (a rank died, a collective timed out, the launcher's SIGTERM) leaves with one
                  line on stderr and exit code 1; the last checkpoint stays as rank 0 last wrote it (atomically)

A collective waits at most `NORMLAB_DIST_TIMEOUT` seconds (default 300) for a rank that does not arrive.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import signal
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from normlab.errors import ConfigError, NormlabError

TIMEOUT_ENV = "NORMLAB_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
EXIT_USER_ERROR = 2  # the CLI's exit code, for ranks that leave silently

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is a worker started by torch's elastic launcher (RANK and WORLD_SIZE are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main() -> bool:
    """True in a single process and on rank 0 of an initialised torch.distributed group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors where torch has both."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks (`NORMLAB_DIST_TIMEOUT` seconds, default 300)."""
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def on_main(action: Callable[[], T], elsewhere: Callable[[], T]) -> T:
    """`action()` on rank 0 (or in a single process), `elsewhere()` on the other ranks; a `NormlabError` that
    `action` raises is raised on every rank (rank 0 sends its message), so that no rank waits for one that left."""
    if not (dist.is_available() and dist.is_initialized()):
        return action()
    failure: list[Any] = [None]
    result: Any = None
    if dist.get_rank() == 0:
        try:
            result = action()
        except NormlabError as error:
            failure = [(type(error), str(error))]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        kind, message = failure[0]
        raise kind(message)
    return result if dist.get_rank() == 0 else elsewhere()


@contextlib.contextmanager
def as_rank(nproc: int | None = None) -> Iterator[bool]:
    """Run a command as one rank of a launched run (a no-op outside a launcher); yields whether this process is
    the main one (rank 0, or the only process). `nproc` (the `--nproc` a worker was started with, if any) must be
    the launcher's number of processes on this node.

    Joins the default group from the launcher's environment (and takes GPU LOCAL_RANK when CUDA is available),
    and leaves it at the end; on ranks other than 0, stdout and stderr go nowhere inside the block and user
    errors leave silently with exit code 2. On every rank, a failed collective or the launcher's SIGTERM becomes
    one line on stderr (exit code 1).
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield is_main()
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if nproc is not None and nproc != local:
        raise ConfigError(f"--nproc {nproc} inside a launcher that started {local} processes on this node: drop "
                          "--nproc under torchrun (its --nproc_per_node says how many)")
    with joined():
        rank, world = dist.get_rank(), dist.get_world_size()
        previous = signal.signal(signal.SIGTERM, _stopped(rank, world))
        try:
            with _silenced(rank > 0):
                yield rank == 0
        except NormlabError:
            if rank == 0:
                raise
            raise SystemExit(EXIT_USER_ERROR) from None
        except (dist.DistError, RuntimeError) as error:
            if not _is_communication_error(error):
                raise
            raise SystemExit(f"normlab: error: rank {rank} of {world} lost the other processes "
                             f"({_first_line(error)}): the run stops; its last checkpoint stays loadable") from None
        finally:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def joined() -> Iterator[None]:
    """Within the block, this process is a member of torch.distributed's default group, joined from the launcher's
    environment (RANK, WORLD_SIZE, MASTER_ADDR...) and left at the end; with CUDA, on GPU LOCAL_RANK. A group
    that is already initialised is used as it is."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend(), timeout=timeout())
    try:
        yield
    finally:
        gc.collect()  # DDP models in reference cycles go first: a reducer outliving its group can abort at exit
        dist.destroy_process_group()


@contextlib.contextmanager
def _silenced(silent: bool) -> Iterator[None]:
    """stdout and stderr to nowhere within the block, if `silent`."""
    with contextlib.ExitStack() as stack:
        if silent:
            nowhere = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(nowhere))
            stack.enter_context(contextlib.redirect_stderr(nowhere))
        yield


def _stopped(rank: int, world: int) -> Callable[[int, Any], None]:
    def handle(signum: int, frame: Any) -> None:
        raise SystemExit(f"normlab: error: rank {rank} of {world} stopped by the launcher (SIGTERM): another rank "
                         "failed or the run was cancelled; the last checkpoint stays loadable")
    return handle


def _is_communication_error(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def _first_line(error: BaseException) -> str:
    """The first sentence of a collective's error, without the C++ source location gloo puts in front."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(error).__name__
    return text.split(". ")[0][:200]

