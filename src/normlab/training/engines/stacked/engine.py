"""The stacked engine: M models of one MLP architecture in lockstep, a hand-written backward, optionally compiled.

Each model follows the trajectory the reference engine would give it alone (same batches, same SGD/AdamW
arithmetic as torch.optim), within float rounding. What differs is the cost of a step: the M models share every
operation (`StackedMLP`), the optimizer updates every model with one operation per tensor
(`StackedOptimizer`), and runs with enough work compile `steps_per_call` steps into one call (fused kernels
called from C++, the batch gathered inside the call). Diagnostics are recorded on twins: on a recording step,
a reference model per stacked model takes that model's exact state and computes the step's gradients with
autograd under a `Monitor`; the stacked models take the step on trial (then return to their state before it, so
that the run is the one it would be unobserved), and update:data is measured from the weights before and after it.
Every statistic is the reference engine's (tested), and no torch.optim optimizer is built.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from normlab.config import ModelConfig, TrainConfig
from normlab.model import LanguageModel, build_model
from normlab.training.engines import Engine, Split
from normlab.training.engines.stacked.kernels import Kernel, build_kernel, kernel_key, load_kernel
from normlab.training.engines.stacked.model import StackedMLP
from normlab.training.engines.stacked.optim import StackedOptimizer
from normlab.training.engines.stacked.single import SingleModelSGD
from normlab.training.threads import work_per_step

STEPS_PER_CALL = 10  # steps per compiled call (measured best on 2 cores); divides the loop's sync interval
# Compile when a run's work (steps × models × batch × width) is at least this: about a minute of eager steps on
# 2 cores, enough to repay the ~20 s compilation (the lesson's recipe is 1.3e9; the `fast` preset, 2.6e8, is not).
COMPILE_MIN_WORK = 6e8
# Inductor's options for the kernels. No autotuning (max_autotune): its choice of matrix-product templates lost
# here, for one lesson model at batch 2,048 (0.34x the plain loop, 4.5x without) and for 32 lesson models (1,040
# against 1,120 lockstep steps/s), and it doubles the compilation.
COMPILE_OPTIONS: dict[str, object] = {}


def should_compile(config: TrainConfig, work: int) -> bool:
    """`config.compile`, or when None, whether the run's work (`work` per step, times the steps) repays the
    compilation."""
    if config.compile is not None:
        return config.compile
    return config.steps * work >= COMPILE_MIN_WORK


class StackedEngine(Engine):
    """Trains M stacked models; see the module notes."""

    def __init__(self, models: Sequence[ModelConfig], trains: Sequence[TrainConfig], vocab_size: int,
                 train_xy: Split, states: Sequence[Mapping[str, torch.Tensor]], *,
                 optimizer_states: Sequence[dict[str, Any]] | None = None, step: int = 0) -> None:
        self.model_configs, self.train_configs = list(models), list(trains)
        self.vocab_size = vocab_size
        self.num_models = len(models)
        self.stacked = StackedMLP.from_state_dicts(models, states, vocab_size)
        self.device = self.stacked.embedding.device
        self.optimizer = StackedOptimizer(self.stacked, trains)
        if optimizer_states is not None:
            self.optimizer.load_state_dicts(optimizer_states, step)
        self.x, self.y = train_xy[0].to(self.device), train_xy[1].to(self.device)
        self.limits = None
        if any(config.grad_clip is not None for config in trains):
            self.limits = torch.tensor([math.inf if c.grad_clip is None else c.grad_clip for c in trains],
                                       dtype=self.stacked.embedding.dtype, device=self.device)
        work = work_per_step(models, trains[0].batch_size)
        self._kernel: Kernel | None = None
        self._key = kernel_key(models, trains[0], self.stacked.embedding.dtype, self.x.shape[1], vocab_size,
                               STEPS_PER_CALL, COMPILE_OPTIONS)
        wanted = trains[0].compile
        if wanted is not False and self.device.type == "cpu":
            self._kernel = load_kernel(self._key)  # compiled earlier (`normlab compile`, or a long run): free
        self._build = self._kernel is None and wanted is not False and should_compile(trains[0], work)
        if self.compiled:
            self.steps_per_call = STEPS_PER_CALL
        self.stacked.fused_kernels = self.num_models == 1  # for the uncompiled calls
        # One model with plain SGD, eagerly: a dedicated step on 2-D views made once (`SingleModelSGD`)
        self._single: SingleModelSGD | None = None
        self._single_ok = (self.limits is None and self.optimizer.takes_factored_gradients
                           and SingleModelSGD.supports(self.stacked))
        self.monitors: list[Any] = []
        self._twins: list[LanguageModel] = []  # reference models the monitors observe (see record_step)

    @property
    def compiled(self) -> bool:
        """Whether calls of `steps_per_call` steps run compiled."""
        return self._kernel is not None or self._build

    @property
    def compiling(self) -> bool:
        """Whether the first compiled call will compile the kernel first (it is not in the cache yet)."""
        return self._kernel is None and self._build

    def compile(self) -> None:
        """Compile this engine's chunk of steps now, unless the cache has it (see `kernels`)."""
        if self._kernel is not None:
            return
        state = self._state()
        indices = torch.zeros((STEPS_PER_CALL, self.num_models, self.train_configs[0].batch_size),
                              dtype=torch.int64, device=self.device)
        rates = torch.zeros((STEPS_PER_CALL, self.num_models), dtype=self.stacked.embedding.dtype,
                            device=self.device)
        copies = [t.clone() for t in state]  # export runs the steps on fake tensors; keep the real ones safe
        dynamic = [None] * len(state) + [None, None]
        dynamic[len(state) - 2 - (self.limits is not None)] = 0  # x and y: any number of training examples
        dynamic[len(state) - 1 - (self.limits is not None)] = 0
        fused = self.stacked.fused_kernels
        self.stacked.fused_kernels = False  # compiled code fuses the written-out formulas itself
        try:
            self._kernel = build_kernel(self._key, self._pure_steps, copies + [indices, rates], dynamic,
                                        COMPILE_OPTIONS)
        finally:
            self.stacked.fused_kernels = fused
        self._build = False

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step reads or updates, in a fixed order: the kernel's inputs before the batch."""
        limits = [] if self.limits is None else [self.limits]
        return self._updated_state() + [self.x, self.y] + limits

    def _updated_state(self) -> list[torch.Tensor]:
        """Every tensor a step updates: the models' weights and buffers, the optimizer's state."""
        buffers = [buffer for per_param in self.optimizer.buffers for buffer in per_param]
        return self.stacked.tensors() + buffers + [self.optimizer.step_count]

    def _set_state(self, tensors: Sequence[torch.Tensor]) -> None:
        """Point the engine at `tensors` (in `_state`'s order) instead of its own."""
        values = iter(tensors)
        stacked = self.stacked
        stacked.embedding = next(values)
        for block in stacked.hidden:
            for name in ("weight", "bias", "gamma", "beta", "running_mean", "running_var", "num_batches_tracked"):
                if getattr(block, name) is not None:
                    setattr(block, name, next(values))
        stacked.output_weight = next(values)
        if stacked.output_bias is not None:
            stacked.output_bias = next(values)
        self.optimizer.params = stacked.parameters()
        for per_param in self.optimizer.buffers:
            per_param[:] = [next(values) for _ in per_param]
        self.optimizer.step_count, self.x, self.y = next(values), next(values), next(values)
        if self.limits is not None:
            self.limits = next(values)

    def _pure_steps(self, *tensors: torch.Tensor) -> torch.Tensor:
        """`_steps` on the given state tensors (what the kernel is exported from)."""
        *state, indices, rates = tensors
        own = self._state()
        self._set_state(state)
        try:
            return self._steps(indices, rates)
        finally:
            self._set_state(own)

    # ------------------------------------------------------------------------------------------------- steps
    def _one(self, index: torch.Tensor, rates: torch.Tensor | float) -> torch.Tensor:
        """One step on the training examples `index` (M, B) with learning rates (M,); the losses (M,) before the
        update. (The gather happens here, inside a compiled call, fused with the embedding lookup.)"""
        factored = self.limits is None and self.optimizer.takes_factored_gradients
        flat = index.reshape(-1)
        contexts = self.x.index_select(0, flat).view(*index.shape, -1)  # (M, B, T)
        targets = self.y.index_select(0, flat).view(index.shape)  # (M, B)
        loss, grads = self.stacked.loss_and_gradients(None, targets, rows=self.stacked.rows(contexts),
                                                      factored=factored)
        if self.limits is not None:
            _clip_per_model(grads, self.limits)
        self.optimizer.step(grads, rates)
        return loss

    def _steps(self, indices: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._one(indices[k], rates[k]) for k in range(indices.shape[0])])

    def run_steps(self, indices: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
        """K steps (indices (K, M, B), rates (K, M)); a call of `steps_per_call` steps runs compiled (compiled on
        first use; if compilation fails, training continues eagerly with a warning)."""
        if self.num_models == 1 and indices.shape[0] == 1:  # one step of one model, eagerly: a float rate
            if self._single_ok:
                single = self._single
                if single is None or not single.valid_for(self.stacked):
                    single = self._single = SingleModelSGD(self.stacked)
                index = indices.view(-1)
                return single.step(self.x.index_select(0, index), self.y.index_select(0, index),
                                   rates.item()).view(1, 1)
            return self._one(indices[0], float(rates[0, 0])).view(1, 1)
        rates = rates.to(self.device, self.stacked.embedding.dtype)
        if self.compiled and len(indices) == self.steps_per_call:
            try:
                if self._kernel is None:  # the first call compiles
                    self.compile()
                return self._kernel(self._state() + [indices.to(self.device), rates])[0]
            except Exception as error:  # no C++ compiler, an unsupported platform...: eager is always right
                warnings.warn(f"compiling the training steps failed ({type(error).__name__}: {str(error)[:200]}); "
                              "training continues uncompiled", RuntimeWarning, stacklevel=2)
                self._kernel, self._build, self.steps_per_call = None, False, 1
        return self._steps(indices, rates)

    # ------------------------------------------------------------------------------------------------- state
    def model_state(self, index: int) -> dict[str, torch.Tensor]:
        return self.stacked.state_dict(index)

    def optimizer_state(self, index: int) -> dict[str, Any]:
        return self.optimizer.state_dict(index)

    def modules(self) -> list[LanguageModel]:
        """New `LanguageModel`s holding copies of the current weights."""
        models = []
        for index, config in enumerate(self.model_configs):
            model = build_model(config, self.vocab_size, dtype=self.stacked.embedding.dtype).to(self.device)
            model.load_state_dict(self.stacked.state_dict(index))
            models.append(model)
        return models

    @torch.no_grad()
    def evaluate(self, splits: Sequence[Split], batch_size: int = 8192) -> list[float]:
        """Mean cross-entropy of each model i on its own split (x_i, y_i), in eval mode (NaN for an empty split)."""
        sizes = {len(x) for x, _ in splits}
        if sizes == {0}:
            return [float("nan")] * len(splits)
        if len(sizes) > 1:  # different sizes cannot share one stacked forward: one model at a time
            from normlab.training.evaluation import evaluate

            return [evaluate(model, *split) for model, split in zip(self.modules(), splits)]
        total = torch.zeros(len(splits), dtype=torch.float64, device=self.device)
        n = sizes.pop()
        for start in range(0, n, batch_size):
            contexts = torch.stack([x[start:start + batch_size] for x, _ in splits]).to(self.device)
            targets = torch.stack([y[start:start + batch_size] for _, y in splits]).to(self.device)
            logits, _ = self.stacked.forward(contexts, training=False)
            log_probs = torch.log_softmax(logits.double(), dim=2)
            total -= log_probs.gather(2, targets.unsqueeze(2)).sum((1, 2))
        return (total / n).tolist()

    # ------------------------------------------------------------------------------------------- diagnostics
    def attach_monitors(self, every: int, **options: Any) -> list[Any]:
        """A Monitor per model, on a reference twin of it (see the module notes)."""
        from normlab.diagnostics import Monitor

        self._twins = list(self.modules())
        self.monitors = [Monitor(model, every=every, **options) for model in self._twins]
        return self.monitors

    def record_step(self, step: int, indices: torch.Tensor, rates: torch.Tensor) -> None:
        """Observe step `step` of every model; the loop then trains it as it would unobserved (in a compiled call
        with its neighbours). Each twin takes its model's state and computes the step's gradients under its
        monitor; the stacked models take the step on trial, their new weights give each monitor the update, and
        they return to the state before it, exactly."""
        from normlab.training.engines.reference import gradients

        twin_losses = []
        for index, (model, monitor) in enumerate(zip(self._twins, self.monitors)):
            _copy_into(model, self.stacked.state_dict(index))
            monitor.begin_step(step)
            twin_losses.append(gradients(model, self.x[indices[index]], self.y[indices[index]],
                                         self.train_configs[index].grad_clip))
            monitor.before_update(float(rates[index]))
        before = [tensor.clone() for tensor in self._updated_state()]
        self.run_steps(indices.unsqueeze(0), rates.unsqueeze(0))
        for index, (model, monitor, loss) in enumerate(zip(self._twins, self.monitors, twin_losses)):
            _copy_into(model, self.stacked.state_dict(index), parameters_only=True)
            monitor.after_update()
            monitor.end_step(loss)
        for tensor, value in zip(self._updated_state(), before, strict=True):
            tensor.copy_(value)
        return None


def _copy_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], parameters_only: bool = False) -> None:
    """Copy a stacked model's state (`StackedMLP.state_dict(i)`) into `model` in place."""
    with torch.no_grad():
        entries = model.named_parameters() if parameters_only else model.state_dict().items()
        for name, value in entries:
            value.copy_(state[name])


def _clip_per_model(grads: list[torch.Tensor], limits: torch.Tensor) -> None:
    """torch.nn.utils.clip_grad_norm_ for each model separately: scale its gradients to at most its max norm."""
    squares = sum(g.square().sum(dim=tuple(range(1, g.dim()))) for g in grads)  # (M,)
    coef = (limits / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coef.view((-1,) + (1,) * (grad.dim() - 1)))
