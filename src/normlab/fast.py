"""Training on the stacked path: one model fast, or M configurations in lockstep.

The loop mirrors `train.train` step for step (the same batches from `batch_block`, the same learning-rate
schedule, the same SGD/AdamW arithmetic as torch.optim, the same evaluation subsets), so a stacked run ends
where the reference runs would, within float rounding. What differs is the cost of a step: the contexts of a
whole block of steps are gathered ahead of time, the backward is written out (`StackedMLP`), the optimizer
updates every model with one operation per tensor, and nothing waits on the host between syncs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from normlab.errors import ConfigError, TrainingDiverged
from normlab.stacked import StackedMLP, per_model_view, unstack_like
from normlab.train import (
    SYNC_EVERY,
    Interrupted,
    TrainConfig,
    _divergence_message,
    _eval_subsets,
    _InterruptFlag,
    _progress_bar,
    batch_block,
    batch_block_length,
    learning_rate,
)

SHARED_FIELDS = ("steps", "batch_size", "optimizer", "eval_every", "checkpoint_every", "device")
SCHEDULE_FIELDS = ("lr", "schedule", "lr_decay_step", "lr_decay_factor", "warmup_steps", "min_lr_factor", "steps")


class StackedOptimizer:
    """SGD (momentum, weight decay) or AdamW over stacked parameters, with per-model hyperparameters.

    The arithmetic is torch.optim's (single-tensor implementations), so each model follows the trajectory that
    `torch.optim.SGD`/`AdamW` would give it. `state_dict_for(i, model)` exports model i's state in torch's format.
    """

    def __init__(self, params: list[torch.Tensor], configs: Sequence[TrainConfig]) -> None:
        self.params = params
        self.kind = configs[0].optimizer
        like = params[0]
        self.configs = list(configs)
        self.momentum = per_model_view([c.momentum for c in configs], like)
        self.weight_decay = per_model_view([c.weight_decay for c in configs], like)
        self.beta1 = per_model_view([c.beta1 for c in configs], like)
        self.beta2 = per_model_view([c.beta2 for c in configs], like)
        self.uses_momentum = any(c.momentum for c in configs)
        self.uses_weight_decay = any(c.weight_decay for c in configs)
        self.steps_taken = 0  # AdamW's step count (the same for every model and tensor)
        self.buffers: list[list[torch.Tensor]] = []  # SGD: [momentum]; AdamW: [exp_avg, exp_avg_sq] per tensor
        self.eps = 1e-8

    def step(self, grads: list[torch.Tensor], lr: float | torch.Tensor) -> None:
        """One update of every parameter from its gradient; `lr` is a float or a (M,) tensor."""
        lr_view = lr if isinstance(lr, float) else lr.view(-1, 1, 1)
        with torch.no_grad():
            if self.kind == "sgd":
                self._sgd(grads, lr_view)
            else:
                self._adamw(grads, lr_view)

    def _sgd(self, grads: list[torch.Tensor], lr: float | torch.Tensor) -> None:
        first = not self.buffers
        for index, (param, grad) in enumerate(zip(self.params, grads)):
            view = self._view(param)
            if self.uses_weight_decay:
                grad = grad.addcmul(param, self.weight_decay.view(view))
            if self.uses_momentum:
                if first:
                    self.buffers.append([grad.clone()])
                else:
                    self.buffers[index][0].mul_(self.momentum.view(view)).add_(grad)
                grad = self.buffers[index][0]
            if isinstance(lr, float):
                param.add_(grad, alpha=-lr)
            else:
                param.addcmul_(grad, lr.view(view), value=-1.0)

    def _adamw(self, grads: list[torch.Tensor], lr: float | torch.Tensor) -> None:
        if not self.buffers:
            self.buffers = [[torch.zeros_like(p), torch.zeros_like(p)] for p in self.params]
        self.steps_taken += 1
        t = self.steps_taken
        correction1 = 1 - self.beta1**t  # (M, 1, 1)
        correction2_sqrt = torch.sqrt(1 - self.beta2**t)
        for param, grad, (exp_avg, exp_avg_sq) in zip(self.params, grads, self.buffers):
            view = self._view(param)
            lr_v = lr if isinstance(lr, float) else lr.view(view)
            param.mul_(1 - lr_v * self.weight_decay.view(view))
            exp_avg.lerp_(grad, 1 - self.beta1.view(view))
            exp_avg_sq.mul_(self.beta2.view(view)).addcmul_(grad, grad * (1 - self.beta2.view(view)))
            denom = (exp_avg_sq.sqrt() / correction2_sqrt.view(view)).add_(self.eps)
            param.addcdiv_(exp_avg * (lr_v / correction1.view(view)), denom, value=-1.0)

    @staticmethod
    def _view(param: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (param.dim() - 1)

    def state_dict_for(self, index: int, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Model `index`'s state in the format of `optimizer` (a torch optimizer over that model's parameters)."""
        state = optimizer.state_dict()
        group_params = state["param_groups"][0]["params"]
        model_params = optimizer.param_groups[0]["params"]
        new_state: dict[int, dict[str, Any]] = {}
        for key, like, buffers, stacked in zip(group_params, model_params, self.buffers or [[]] * len(model_params),
                                               self.params):
            parts = [b[index].clone() if stacked is self.params[0] else unstack_like(b, index, like).clone()
                     for b in buffers]
            if self.kind == "sgd" and parts:
                new_state[key] = {"momentum_buffer": parts[0]}
            elif self.kind == "adamw" and parts:
                new_state[key] = {"step": torch.tensor(float(self.steps_taken)), "exp_avg": parts[0],
                                  "exp_avg_sq": parts[1]}
        state["state"] = new_state
        return state

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        """Stack the torch-format states of the M models (the inverse of `state_dict_for`)."""
        per_model = [[s["state"].get(key, {}) for key in s["param_groups"][0]["params"]] for s in states]
        names = ["momentum_buffer"] if self.kind == "sgd" else ["exp_avg", "exp_avg_sq"]
        if not per_model[0] or not per_model[0][0]:
            return  # no state yet (plain SGD, or a run that has not stepped)
        self.buffers = []
        for position, param in enumerate(self.params):
            tensors = []
            for name in names:
                values = [model[position][name] for model in per_model]
                if position == 0:
                    tensors.append(torch.stack(values).to(param))
                else:
                    tensors.append(torch.stack([v.T if v.dim() == 2 else v for v in values]).view_as(param).to(param))
            self.buffers.append(tensors)
        if self.kind == "adamw":
            self.steps_taken = int(per_model[0][0]["step"])


def check_lockstep(configs: Sequence[TrainConfig]) -> None:
    """Raise `ConfigError` unless the configs agree on what a lockstep run must share."""
    for name in SHARED_FIELDS:
        values = {getattr(c, name) for c in configs}
        if len(values) > 1:
            raise ConfigError(f"configurations trained at once must share train.{name}; got {sorted(values)}")


def train_stacked(stacked: StackedMLP, train_xy: tuple[torch.Tensor, torch.Tensor],
                  val_xy: tuple[torch.Tensor, torch.Tensor], configs: Sequence[TrainConfig], *,
                  optimizer: StackedOptimizer | None = None, start_step: int = 0,
                  log: Callable[[int, dict[str, Any]], None] | None = None,
                  checkpoint: Callable[[int], None] | None = None, on_divergence: str = "raise",
                  progress: bool = True) -> dict[int, int]:
    """Train the M stacked models from `start_step` to `configs[0].steps`, each as `train.train` would.

    `log(i, row)` receives model i's metrics rows, `checkpoint(step)` is called as in `train.train`. With
    `on_divergence="raise"` a NaN/Inf loss raises `TrainingDiverged`; with "record" the other models go on and
    the return value maps each diverged model to the step where its loss first became NaN/Inf.
    """
    for config in configs:
        config.validate()
    check_lockstep(configs)
    first = configs[0]
    device = torch.device(first.device)
    count = stacked.num_models
    dtype = stacked.embedding.dtype
    optimizer = optimizer or StackedOptimizer(stacked.parameters(), configs)
    x_train, y_train = train_xy[0].to(device), train_xy[1].to(device)
    subsets = [_eval_subsets(train_xy, val_xy, c) for c in configs]
    same_schedule = len({tuple(getattr(c, f) for f in SCHEDULE_FIELDS) for c in configs}) == 1
    same_batches = len({c.seed for c in configs}) == 1
    clip = [c.grad_clip for c in configs]
    recent = torch.zeros((SYNC_EVERY, count), device=device)
    diverged: dict[int, int] = {}
    block_length = batch_block_length(first.batch_size)
    bar = _progress_bar(first.steps, start_step, progress)
    started = time.perf_counter()
    block_index, rows, targets = -1, None, None
    with _InterruptFlag() as interrupt:
        for step in range(start_step, first.steps):
            if step // block_length != block_index:  # gather the contexts of a whole block of steps at once
                block_index = step // block_length
                seeds = [first.seed] if same_batches else [c.seed for c in configs]
                index = torch.stack([batch_block(s, block_index, len(x_train), first.batch_size) for s in seeds])
                index = index.to(device).expand(count, -1, -1)  # (M, L, B)
                rows, targets = stacked.rows(x_train[index]), y_train[index]  # (M, L, B, T), (M, L, B)
            k = step % block_length
            if same_schedule:
                lr: float | torch.Tensor = learning_rate(first, step)
            else:
                lr = torch.tensor([learning_rate(c, step) for c in configs], dtype=dtype, device=device)
            loss, grads = stacked.loss_and_gradients(None, targets[:, k], rows=rows[:, k])
            if any(c is not None for c in clip):
                _clip_per_model(grads, clip)
            optimizer.step(grads, lr)
            recent[step % SYNC_EVERY].copy_(loss)
            done = step + 1
            eval_due = done % first.eval_every == 0 or done == first.steps
            checkpoint_due = done % first.checkpoint_every == 0 or done == first.steps or interrupt.raised
            if done % SYNC_EVERY == 0 or eval_due or checkpoint_due:
                window = recent[: (step % SYNC_EVERY) + 1]
                for position, model in (~torch.isfinite(window)).nonzero().tolist():
                    bad_step = step - step % SYNC_EVERY + position
                    if on_divergence == "raise":
                        raise TrainingDiverged(_divergence_message(bad_step, float(window[position, model]),
                                                                   configs[model]))
                    diverged.setdefault(model, bad_step)
                if bar is not None:
                    finite = window[torch.isfinite(window)]
                    shown = f"{finite.mean().item():.4f}" if len(finite) else "nan"
                    bar.set_postfix(loss=shown, refresh=False)
                    bar.update(done - bar.n)
            if eval_due and log is not None:
                elapsed = round(time.perf_counter() - started, 3)
                losses = [evaluate_stacked(stacked, [s[split] for s in subsets]) for split in (0, 1)]
                for i in range(count):
                    lr_i = learning_rate(configs[i], step)
                    log(i, {"step": done, "train_loss": losses[0][i], "val_loss": losses[1][i], "lr": lr_i,
                            "elapsed_s": elapsed})
            if checkpoint_due and checkpoint is not None:
                checkpoint(done)
            if interrupt.raised:
                if bar is not None:
                    bar.close()
                raise Interrupted(done)
    if bar is not None:
        bar.close()
    return diverged


def _clip_per_model(grads: list[torch.Tensor], max_norms: list[float | None]) -> None:
    """torch.nn.utils.clip_grad_norm_ for each model separately: scale its gradients to at most its max norm."""
    squares = sum(g.square().sum(dim=tuple(range(1, g.dim()))) for g in grads)  # (M,)
    limits = torch.tensor([math.inf if m is None else m for m in max_norms], dtype=squares.dtype)
    coef = (limits.to(squares.device) / (squares.sqrt() + 1e-6)).clamp(max=1.0)
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
        return [evaluate_stacked_one(stacked, i, x, y) for i, (x, y) in enumerate(splits)]
    total = torch.zeros(len(splits), dtype=torch.float64, device=device)
    n = sizes.pop()
    for start in range(0, n, batch_size):
        contexts = torch.stack([x[start:start + batch_size] for x, _ in splits]).to(device)
        targets = torch.stack([y[start:start + batch_size] for _, y in splits]).to(device)
        logits, _ = stacked.forward(contexts, training=False)
        log_probs = torch.log_softmax(logits.double(), dim=2)
        total -= log_probs.gather(2, targets.unsqueeze(2)).sum((1, 2))
    return (total / n).tolist()


def evaluate_stacked_one(stacked: StackedMLP, index: int, x: torch.Tensor, y: torch.Tensor) -> float:
    """Loss of model `index` alone on (x, y)."""
    from normlab.train import evaluate

    return evaluate(stacked.to_models()[index], x, y)
