"""Training: the lesson's recipe and its options, evaluation, and BatchNorm calibration.

The loop knows nothing of the model's insides: it needs a module mapping contexts to logits. Batches come from
`batch_indices`, a pure function of (seed, step), so a resumed run draws exactly the batches an uninterrupted
one would; the learning rate is a pure function of the step too.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from normlab.errors import ConfigError, TrainingDiverged

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")
SYNC_EVERY = 100  # steps between host syncs: the progress bar, the NaN check and the batch-loss log


@dataclass
class TrainConfig:
    """Every knob of training, with the lesson's recipe as defaults."""

    steps: int = 200_000
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    schedule: str = "step"  # step: lr until lr_decay_step, then lr·lr_decay_factor | cosine | constant
    lr_decay_step: int | None = None  # None: half of steps
    lr_decay_factor: float = 0.1
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    min_lr_factor: float = 0.0  # cosine decays to lr·min_lr_factor
    momentum: float = 0.0  # SGD momentum
    weight_decay: float = 0.0
    beta1: float = 0.9  # AdamW
    beta2: float = 0.999
    grad_clip: float | None = None  # max global gradient norm
    seed: int = 2147483647  # initial weights and batches (the lesson's generator seed)
    eval_every: int = 10_000  # steps between train/val losses on fixed subsets
    eval_examples: int = 10_000  # size of those subsets
    checkpoint_every: int = 50_000
    device: str = "cpu"
    fast: bool = True  # the stacked path (hand-written backward) wherever the model allows it; see normlab.fast
    compile: bool | None = None  # torch.compile the stacked path's steps; None: when the run is long enough to pay

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad value and its fix."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        for name in ("steps", "batch_size", "eval_every", "eval_examples", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be positive (or null for none), got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be 0 or more, got {self.warmup_steps}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"train.device={self.device!r} but no CUDA GPU is available: use --device cpu")

    @property
    def decay_step(self) -> int:
        """The step at which the step schedule lowers the learning rate."""
        return self.steps // 2 if self.lr_decay_step is None else self.lr_decay_step


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of `step` (0-based) under the configured warm-up and schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "step":
        return config.lr if step < config.decay_step else config.lr * config.lr_decay_factor
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        floor = config.lr * config.min_lr_factor
        return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr


def batch_block_length(batch_size: int) -> int:
    """Steps per block of pre-drawn batch indices (65,536 indices a block)."""
    return max(1, 2**16 // batch_size)


def batch_block(seed: int, block: int, num_examples: int, batch_size: int) -> torch.Tensor:
    """The batch indices (block_length, batch_size) of block number `block`: a pure function of its arguments."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + block) % 2**63)
    shape = (batch_block_length(batch_size), batch_size)
    return torch.randint(0, num_examples, shape, generator=generator)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (the lesson's) or AdamW over all of `model`'s parameters."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                             weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32_768) -> float:
    """Mean cross-entropy of `model` on (x, y) in eval mode (NaN for an empty split); restores the mode."""
    if len(x) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            total += F.cross_entropy(model(xb), yb, reduction="sum").double()
        return total.item() / len(x)
    finally:
        model.train(was_training)


def batchnorm_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) of every batch-norm layer that tracks running statistics (normlab's or torch's)."""
    return [(name, module) for name, module in model.named_modules()
            if "BatchNorm" in type(module).__name__ and getattr(module, "running_mean", None) is not None]


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Set every BatchNorm's running statistics to the population mean and variance of the inputs it sees on x.

    As the lesson does after training: one forward pass over the whole of `x` in train mode, each layer
    normalising with (and recording) the statistics of all of `x`. Returns the number of layers calibrated.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [(module.momentum, module.num_batches_tracked.clone()) for _, module in layers]
    was_training = model.training
    try:
        for _, module in layers:
            module.reset_running_stats()
            module.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
        model.train()
        model(x.to(next(model.parameters()).device))
    finally:
        for (_, module), (momentum, tracked) in zip(layers, saved):
            module.momentum = momentum
            module.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    return len(layers)


@dataclass
class TrainEvents:
    """Callbacks of the loop; each optional. `log` gets metrics rows, `checkpoint` the step to save after."""

    log: Callable[[dict[str, Any]], None] | None = None
    checkpoint: Callable[[int], None] | None = None
    begin_step: Callable[[int], None] | None = None
    end_step: Callable[[torch.Tensor], None] | None = None


class _InterruptFlag:
    """Turns the first Ctrl-C into a flag read between steps; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Interrupted(Exception):
    """Training stopped at a step boundary on Ctrl-C, after the checkpoint callback saved that step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step = step


def _divergence_message(step: int, value: float, config: TrainConfig) -> str:
    kind = "NaN" if math.isnan(value) else "Inf"
    return (f"the loss became {kind} at step {step} (learning rate {learning_rate(config, step):g}). Likely cause: "
            "the learning rate is too high for this initialisation, so activations or gradients exploded. Try a "
            "lower train.lr, train.grad_clip, a norm layer (model.norm=batch) or a smaller model.weight_scale")


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads (None: leave the setting alone), then restore it."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class LossWindow:
    """The batch losses (one column per model) of the steps since the last multiple of SYNC_EVERY, kept on the
    device and read back (one host sync) only when checked."""

    def __init__(self, models: int, device: torch.device) -> None:
        self.values = torch.zeros((SYNC_EVERY, models), device=device)

    def record(self, step: int, losses: torch.Tensor) -> None:
        """Store the losses (M,) of `step`, or (K, M) of the K steps from `step` (within one window)."""
        start = step % SYNC_EVERY
        self.values[start:start + (losses.shape[0] if losses.dim() == 2 else 1)].copy_(losses)

    def check(self, last: int, configs: Sequence[TrainConfig], diverged: dict[int, int] | None = None) -> float:
        """Check every loss up to step `last`: a NaN/Inf raises `TrainingDiverged` naming its step, or, with a
        `diverged` dict, is recorded there (model index → first bad step). Returns the mean of the finite losses."""
        window = self.values[: last % SYNC_EVERY + 1]
        for position, model in (~torch.isfinite(window)).nonzero().tolist():
            bad_step = last - last % SYNC_EVERY + position
            if diverged is None:
                raise TrainingDiverged(_divergence_message(bad_step, float(window[position, model]), configs[model]),
                                       bad_step)
            diverged.setdefault(model, bad_step)
        finite = window[torch.isfinite(window)]
        return finite.mean().item() if len(finite) else float("nan")


def show_progress(bar: Any, done: int, loss: float) -> None:
    """Move the progress bar to `done` steps, showing the recent mean loss."""
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(done - bar.n)


def train(model: torch.nn.Module, train_xy: tuple[torch.Tensor, torch.Tensor],
          val_xy: tuple[torch.Tensor, torch.Tensor], config: TrainConfig, *,
          optimizer: torch.optim.Optimizer | None = None, start_step: int = 0,
          events: TrainEvents | None = None, progress: bool = True) -> torch.optim.Optimizer:
    """Train `model` from `start_step` to `config.steps` with minibatch cross-entropy; returns the optimizer.

    Every `eval_every` steps (and at the end) the loss on fixed subsets of the train and val splits goes to
    `events.log`; every `checkpoint_every` steps (and at the end) `events.checkpoint(step)` is called with the
    number of steps done. A NaN/Inf loss raises `TrainingDiverged` before any checkpoint of the bad state; Ctrl-C
    saves a checkpoint at the next step boundary and raises `Interrupted`.
    """
    config.validate()
    events = events or TrainEvents()
    device = torch.device(config.device)
    model.to(device).train()
    optimizer = optimizer or make_optimizer(model, config)
    x_train, y_train = train_xy[0].to(device), train_xy[1].to(device)
    subsets = _eval_subsets(train_xy, val_xy, config)
    recent = LossWindow(1, device)
    block_length = batch_block_length(config.batch_size)
    bar = _progress_bar(config.steps, start_step, progress)
    started = time.perf_counter()
    block_index, block = -1, None
    with _InterruptFlag() as interrupt:
        for step in range(start_step, config.steps):
            if step // block_length != block_index:
                block_index = step // block_length
                block = batch_block(config.seed, block_index, len(x_train), config.batch_size).to(device)
            ix = block[step % block_length]
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if events.begin_step:
                events.begin_step(step)
            loss = F.cross_entropy(model(x_train[ix]), y_train[ix])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if events.end_step:
                events.end_step(loss)
            recent.record(step, loss.detach().view(1))
            done = step + 1
            eval_due = done % config.eval_every == 0 or done == config.steps
            checkpoint_due = done % config.checkpoint_every == 0 or done == config.steps or interrupt.raised
            if done % SYNC_EVERY == 0 or eval_due or checkpoint_due:
                show_progress(bar, done, recent.check(step, [config]))
            if eval_due and events.log:
                events.log({"step": done, "train_loss": evaluate(model, *subsets[0]),
                            "val_loss": evaluate(model, *subsets[1]), "lr": lr,
                            "elapsed_s": round(time.perf_counter() - started, 3)})
            if checkpoint_due and events.checkpoint:
                events.checkpoint(done)
            if interrupt.raised:
                if bar is not None:
                    bar.close()
                raise Interrupted(done)
    if bar is not None:
        bar.close()
    return optimizer


def _eval_subsets(train_xy: tuple[torch.Tensor, torch.Tensor], val_xy: tuple[torch.Tensor, torch.Tensor],
                  config: TrainConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed random subsets of at most `eval_examples` examples of each split, the same at every evaluation."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    subsets = []
    for x, y in (train_xy, val_xy):
        keep = torch.randperm(len(x), generator=generator)[: config.eval_examples]
        subsets.append((x[keep], y[keep]))
    return subsets


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1)
