"""Training on the stacked path: one model fast, or M configurations in lockstep.

The loop mirrors `train.train` step for step (the same batches from `batch_block`, the same learning-rate
schedule, the same SGD/AdamW arithmetic as torch.optim, the same evaluation subsets), so a stacked run ends
where the reference runs would, within float rounding. What differs is the cost of a step: the batch indices of a
whole block of steps are drawn ahead of time and each step gathers its examples inside the (compiled) step, the
backward is written out (`StackedMLP`), the optimizer updates every model with one operation per tensor, and
nothing waits on the host between syncs.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from normlab.errors import ConfigError
from normlab.stacked import StackedMLP
from normlab.stacked_optim import StackedOptimizer
from normlab.train import (
    SYNC_EVERY,
    Interrupted,
    LossWindow,
    TrainConfig,
    _eval_subsets,
    _InterruptFlag,
    _progress_bar,
    batch_block,
    batch_block_length,
    evaluate,
    learning_rate,
    show_progress,
    torch_threads,
)

CHUNK = 10  # steps per compiled call (measured best on 2 cores); divides SYNC_EVERY, so chunks never straddle a sync
# Compile when a run's work (steps × models × batch × width) is at least this: about a minute of eager steps on
# 2 cores, enough to repay the ~20 s compilation (the lesson's recipe is 1.3e9; the `fast` preset, 2.6e8, is not).
COMPILE_MIN_WORK = 6e8
# Up to this many hidden activations per step (models × batch × width), e.g. 20 lesson models at batch 32, one
# thread is as fast as two on 2 cores, and much faster when the other core is busy: small operations spend their
# time synchronising threads. Above it (32 lesson models: 1.6x) the second thread pays.
ONE_THREAD_MAX_WORK = 2**17
COMPILE_OPTIONS = {"cpp_wrapper": True}  # kernels called from C++, not Python: less overhead per step
# For large stacks, let inductor time its own C++ matrix-product templates against ATen's and keep the faster:
# measured here, +7% steps/s for 32 lesson models at the price of ~20 s more compilation; none for one model.
AUTOTUNE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                    "max_autotune_report_choices_stats": False}
SHARED_FIELDS = ("steps", "batch_size", "optimizer", "eval_every", "checkpoint_every", "device")
SCHEDULE_FIELDS = ("lr", "schedule", "lr_decay_step", "lr_decay_factor", "warmup_steps", "min_lr_factor", "steps")


def check_lockstep(configs: Sequence[TrainConfig]) -> None:
    """Raise `ConfigError` unless the configs agree on what a lockstep run must share."""
    for name in SHARED_FIELDS:
        values = {getattr(c, name) for c in configs}
        if len(values) > 1:
            raise ConfigError(f"configurations trained at once must share train.{name}; got {sorted(values)}")


class Stepper:
    """Runs training steps of a stacked model and its optimizer: one at a time eagerly, or `chunk_size` at a
    time through one `torch.compile`d function (fused kernels, a C++ wrapper: far less overhead per step;
    `autotune` also lets inductor pick its own matrix-product kernels)."""

    def __init__(self, stacked: StackedMLP, optimizer: StackedOptimizer, train_xy: tuple[torch.Tensor, torch.Tensor],
                 max_norms: list[float | None], compile: bool, chunk_size: int = CHUNK,
                 autotune: bool = False) -> None:
        if SYNC_EVERY % chunk_size:
            raise ValueError(f"chunk_size must divide {SYNC_EVERY}, got {chunk_size}")
        self.stacked, self.optimizer, self.chunk_size = stacked, optimizer, chunk_size
        self.x_train, self.y_train = train_xy  # on the device
        self.limits = None
        if any(m is not None for m in max_norms):
            self.limits = torch.tensor([math.inf if m is None else m for m in max_norms],
                                       dtype=stacked.embedding.dtype, device=stacked.embedding.device)
        self._compiled = None
        if compile:
            self._compiled = torch.compile(self._chunk, fullgraph=True, dynamic=False,
                                           options=COMPILE_OPTIONS | (AUTOTUNE_OPTIONS if autotune else {}))

    @property
    def compiled(self) -> bool:
        """Whether chunks of steps run compiled."""
        return self._compiled is not None

    def one(self, index: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        """One step on the training examples `index` (M, B); returns the losses (M,) before the update. (The
        gather happens here, inside the compiled chunk, fused with the embedding lookup.)"""
        factored = self.limits is None and self.optimizer.takes_factored_gradients
        rows = self.stacked.rows(self.x_train[index])  # (M, B, T)
        loss, grads = self.stacked.loss_and_gradients(None, self.y_train[index], rows=rows, factored=factored)
        if self.limits is not None:
            _clip_per_model(grads, self.limits)
        self.optimizer.step(grads, lr)
        return loss

    def _chunk(self, index: torch.Tensor, lrs: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.one(index[:, k], lrs[k]) for k in range(self.chunk_size)])

    def chunk(self, index: torch.Tensor, lrs: torch.Tensor) -> torch.Tensor:
        """`chunk_size` (C) steps on the training examples `index` (M, C, B) with learning rates (C, M); returns
        the losses (C, M). Compiles on first use; falls back to eager steps if compilation fails."""
        if self._compiled is not None:
            try:
                with _quiet_autotuning():
                    return self._compiled(index, lrs)
            except Exception as error:  # no C++ compiler, an unsupported platform...: eager is always right
                warnings.warn(f"torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
                              "training continues uncompiled", RuntimeWarning, stacklevel=2)
                self._compiled = None
        return self._chunk(index, lrs)


@contextlib.contextmanager
def _quiet_autotuning() -> Iterator[None]:
    """Keep inductor from printing its autotuning tables to stderr while it compiles (restored afterwards)."""
    from torch._inductor import select_algorithm

    previous = select_algorithm.PRINT_AUTOTUNE
    select_algorithm.PRINT_AUTOTUNE = False
    try:
        yield
    finally:
        select_algorithm.PRINT_AUTOTUNE = previous


def should_compile(config: TrainConfig, work_per_step: int) -> bool:
    """Whether `train_stacked` compiles its steps: `config.compile`, or when None, for runs with enough work
    (`work_per_step` = models × batch × width, times the steps) to repay the compilation."""
    if config.compile is not None:
        return config.compile
    return config.steps * work_per_step >= COMPILE_MIN_WORK


def train_stacked(stacked: StackedMLP, train_xy: tuple[torch.Tensor, torch.Tensor],
                  val_xy: tuple[torch.Tensor, torch.Tensor], configs: Sequence[TrainConfig], *,
                  optimizer: StackedOptimizer | None = None, start_step: int = 0,
                  log: Callable[[int, dict[str, Any]], None] | None = None,
                  checkpoint: Callable[[int], None] | None = None, on_divergence: str = "raise",
                  progress: bool = True, chunk_size: int = CHUNK) -> dict[int, int]:
    """Train the M stacked models from `start_step` to `configs[0].steps`, each as `train.train` would.

    `log(i, row)` receives model i's metrics rows, `checkpoint(step)` is called as in `train.train`. With
    `on_divergence="raise"` a NaN/Inf loss raises `TrainingDiverged`; with "record" the other models go on and
    the return value maps each diverged model to the step where its loss first became NaN/Inf. Compiled runs
    (`should_compile`) take steps in chunks of `chunk_size` and stop for Ctrl-C at the end of a chunk. Small
    work runs on one torch thread (`ONE_THREAD_MAX_WORK`); the setting is restored afterwards.
    """
    for config in configs:
        config.validate()
    check_lockstep(configs)
    work = stacked.num_models * configs[0].batch_size * max(block.weight.shape[2] for block in stacked.hidden)
    with torch_threads(None if work > ONE_THREAD_MAX_WORK else 1):
        return _train_stacked(stacked, train_xy, val_xy, configs, optimizer, start_step, log, checkpoint,
                              on_divergence, progress, chunk_size, work)


def _train_stacked(stacked: StackedMLP, train_xy: tuple[torch.Tensor, torch.Tensor],
                   val_xy: tuple[torch.Tensor, torch.Tensor], configs: Sequence[TrainConfig],
                   optimizer: StackedOptimizer | None, start_step: int,
                   log: Callable[[int, dict[str, Any]], None] | None, checkpoint: Callable[[int], None] | None,
                   on_divergence: str, progress: bool, chunk_size: int, work: int) -> dict[int, int]:
    first = configs[0]
    device = torch.device(first.device)
    count = stacked.num_models
    dtype = stacked.embedding.dtype
    optimizer = optimizer or StackedOptimizer(stacked, configs)
    x_train = train_xy[0].to(device)
    stepper = Stepper(stacked, optimizer, (x_train, train_xy[1].to(device)), [c.grad_clip for c in configs],
                      should_compile(first, work), chunk_size, autotune=work > ONE_THREAD_MAX_WORK)
    subsets = [_eval_subsets(train_xy, val_xy, c) for c in configs]
    same_schedule = len({tuple(getattr(c, f) for f in SCHEDULE_FIELDS) for c in configs}) == 1
    same_batches = len({c.seed for c in configs}) == 1
    recent = LossWindow(count, device)
    diverged: dict[int, int] = {}
    block_length = batch_block_length(first.batch_size)
    bar = _progress_bar(first.steps, start_step, progress)
    started = time.perf_counter()

    def due(done: int, every: int) -> bool:
        return done % every == 0 or done == first.steps

    def rates(step: int, n: int) -> torch.Tensor:  # (n, M) learning rates of steps step..step+n-1
        if same_schedule:
            rates = torch.tensor([learning_rate(first, s) for s in range(step, step + n)], dtype=dtype)
            return rates.view(n, 1).expand(n, count).to(device)
        return torch.tensor([[learning_rate(c, s) for c in configs] for s in range(step, step + n)],
                            dtype=dtype, device=device)

    block_index, index, step = -1, None, start_step
    with _InterruptFlag() as interrupt:
        while step < first.steps:
            if step // block_length != block_index:  # draw the batches of a whole block of steps at once
                block_index = step // block_length
                seeds = [first.seed] if same_batches else [c.seed for c in configs]
                index = torch.stack([batch_block(s, block_index, len(x_train), first.batch_size) for s in seeds])
                index = index.to(device).expand(count, -1, -1)  # (M, L, B)
            k = step % block_length
            size = stepper.chunk_size
            chunk = (stepper.compiled and step % size == 0 and k + size <= block_length
                     and step + size <= first.steps
                     and not any(due(d, first.eval_every) or due(d, first.checkpoint_every)
                                 for d in range(step + 1, step + size)))
            if chunk:
                losses = stepper.chunk(index[:, k:k + size], rates(step, size))
                recent.record(step, losses)
                step += size
            else:
                lr = learning_rate(first, step) if same_schedule and not stepper.compiled else rates(step, 1)[0]
                recent.record(step, stepper.one(index[:, k], lr))
                step += 1
            done, last = step, step - 1
            eval_due, checkpoint_due = due(done, first.eval_every), due(done, first.checkpoint_every)
            checkpoint_due = checkpoint_due or interrupt.raised
            if done % SYNC_EVERY == 0 or eval_due or checkpoint_due:
                mean = recent.check(last, configs, None if on_divergence == "raise" else diverged)
                show_progress(bar, done, mean)
            if eval_due and log is not None:
                elapsed = round(time.perf_counter() - started, 3)
                losses = [evaluate_stacked(stacked, [s[split] for s in subsets]) for split in (0, 1)]
                for i in range(count):
                    log(i, {"step": done, "train_loss": losses[0][i], "val_loss": losses[1][i],
                            "lr": learning_rate(configs[i], last), "elapsed_s": elapsed})
            if checkpoint_due and checkpoint is not None:
                checkpoint(done)
            if interrupt.raised:
                if bar is not None:
                    bar.close()
                raise Interrupted(done)
    if bar is not None:
        bar.close()
    return diverged


def _clip_per_model(grads: list[torch.Tensor], limits: torch.Tensor) -> None:
    """torch.nn.utils.clip_grad_norm_ for each model separately: scale its gradients to at most its max norm."""
    squares = sum(g.square().sum(dim=tuple(range(1, g.dim()))) for g in grads)  # (M,)
    coef = (limits / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coef.view((-1,) + (1,) * (grad.dim() - 1)))


@torch.no_grad()
def evaluate_stacked(stacked: StackedMLP, splits: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     batch_size: int = 8192) -> list[float]:
    """Mean cross-entropy of each model i on its own split (x_i, y_i), in eval mode (NaN for an empty split)."""
    device = stacked.embedding.device
    sizes = {len(x) for x, _ in splits}
    if sizes == {0}:
        return [float("nan")] * len(splits)
    if len(sizes) > 1:  # different sizes cannot share one stacked forward: one model at a time
        models = stacked.to_models()
        return [evaluate(models[i], x, y) for i, (x, y) in enumerate(splits)]
    total = torch.zeros(len(splits), dtype=torch.float64, device=device)
    n = sizes.pop()
    for start in range(0, n, batch_size):
        contexts = torch.stack([x[start:start + batch_size] for x, _ in splits]).to(device)
        targets = torch.stack([y[start:start + batch_size] for _, y in splits]).to(device)
        logits, _ = stacked.forward(contexts, training=False)
        log_probs = torch.log_softmax(logits.double(), dim=2)
        total -= log_probs.gather(2, targets.unsqueeze(2)).sum((1, 2))
    return (total / n).tolist()
