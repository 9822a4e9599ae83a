"""SGD and AdamW over stacked parameters (M models along the first axis), with per-model hyperparameters.

The arithmetic is torch.optim's single-tensor SGD and AdamW, so each model follows the trajectory that
`torch.optim.SGD`/`AdamW` would give it alone. All state is tensors, allocated up front, so a step can be
compiled (`torch.compile`) without recompiling as training goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from normlab.config import TrainConfig
from normlab.training.engines.stacked.layout import per_model_view, stack_as, unstack_as
from normlab.training.engines.stacked.model import IndexGrad, MatmulGrad, StackedMLP
from normlab.training.optimizers import param_group_defaults


class StackedOptimizer:
    """SGD (momentum, weight decay) or AdamW for M stacked models; `state_dict(i)` speaks torch's format."""

    def __init__(self, stacked: StackedMLP, configs: Sequence[TrainConfig]) -> None:
        self.params = params = stacked.parameters()
        self.layouts = stacked.parameter_layouts  # how each parameter is stacked (`layout.stack_as`)
        self.configs = list(configs)
        self.kind = configs[0].optimizer
        like = params[0]
        self.momentum = per_model_view([c.momentum for c in configs], like)
        self.weight_decay = per_model_view([c.weight_decay for c in configs], like)
        self.beta1 = per_model_view([c.beta1 for c in configs], like)
        self.beta2 = per_model_view([c.beta2 for c in configs], like)
        self.uses_momentum = any(c.momentum for c in configs)
        self.uses_weight_decay = any(c.weight_decay for c in configs)
        self.eps = 1e-8
        self.step_count = torch.zeros((), dtype=like.dtype, device=like.device)  # updates done so far
        # SGD: [momentum buffer] (zeros: μ·0 + g = g is torch's first step exactly); AdamW: [exp_avg, exp_avg_sq]
        count = {"sgd": 1 if self.uses_momentum else 0, "adamw": 2}[self.kind]
        self.buffers = [[torch.zeros_like(p) for _ in range(count)] for p in params]

    @property
    def takes_factored_gradients(self) -> bool:
        """Whether `step` folds `MatmulGrad`s into its update (plain SGD) rather than multiplying them out."""
        return self.kind == "sgd" and not self.uses_momentum and not self.uses_weight_decay

    def step(self, grads: list[torch.Tensor | MatmulGrad], lr: float | torch.Tensor) -> None:
        """One update of every parameter from its gradient; `lr` is a float or a (M,) tensor."""
        with torch.no_grad():
            if any(self.buffers):  # the count AdamW's corrections and a saved state need
                self.step_count.add_(1)
            plain = self.takes_factored_gradients and isinstance(lr, float)
            rest_params, rest_grads = [], []
            for param, grad, buffers in zip(self.params, grads, self.buffers):
                view = (-1,) + (1,) * (param.dim() - 1)
                rate = lr if isinstance(lr, float) else lr.view(view)
                if isinstance(grad, MatmulGrad):
                    if self.takes_factored_gradients:  # p − lr·(L @ R) as one product: p += (−lr·L) @ R
                        param.baddbmm_(grad.left * rate, grad.right, alpha=-1.0)
                        continue
                    grad = grad.materialize()
                if isinstance(grad, IndexGrad):
                    if plain:  # the table's rows take −lr·values in place
                        param.view(-1, param.shape[-1]).index_add_(0, grad.rows, grad.values, alpha=-lr)
                        continue
                    grad = grad.materialize(param)
                if plain:  # plain SGD with one rate: the other tensors in one foreach call
                    rest_params.append(param)
                    rest_grads.append(grad)
                elif self.kind == "sgd":
                    self._sgd(param, grad, buffers, rate, view)
                else:
                    self._adamw(param, grad, buffers, rate, view)
            if rest_params:
                torch._foreach_add_(rest_params, rest_grads, alpha=-lr)

    def _sgd(self, param: torch.Tensor, grad: torch.Tensor, buffers: list[torch.Tensor],
             lr: float | torch.Tensor, view: tuple[int, ...]) -> None:
        if self.uses_weight_decay:
            grad = grad.addcmul(param, self.weight_decay.view(view))
        if self.uses_momentum:
            grad = buffers[0].mul_(self.momentum.view(view)).add_(grad)
        if isinstance(lr, float):
            param.add_(grad, alpha=-lr)
        else:
            param.addcmul_(grad, lr, value=-1.0)

    def _adamw(self, param: torch.Tensor, grad: torch.Tensor, buffers: list[torch.Tensor],
               lr: float | torch.Tensor, view: tuple[int, ...]) -> None:
        exp_avg, exp_avg_sq = buffers
        beta1, beta2 = self.beta1.view(view), self.beta2.view(view)
        correction1 = 1 - beta1**self.step_count
        correction2_sqrt = torch.sqrt(1 - beta2**self.step_count)
        param.mul_(1 - lr * self.weight_decay.view(view))
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad * (1 - beta2))
        denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(self.eps)
        param.addcdiv_(exp_avg * (lr / correction1), denom, value=-1.0)

    def state_dict(self, index: int) -> dict[str, Any]:
        """Model `index`'s state as `torch.optim.SGD/AdamW(model.parameters()).state_dict()` would give it (the
        tensors as views of the stacked buffers)."""
        steps = int(self.step_count)
        state: dict[int, dict[str, Any]] = {}
        if steps and any(self.buffers):
            for key, (layout, buffers) in enumerate(zip(self.layouts, self.buffers)):
                parts = [unstack_as(layout, b, index) for b in buffers]
                if self.kind == "sgd":
                    state[key] = {"momentum_buffer": parts[0]}
                else:
                    state[key] = {"step": torch.tensor(float(steps)), "exp_avg": parts[0], "exp_avg_sq": parts[1]}
        group = {**param_group_defaults(self.configs[index]), "params": list(range(len(self.params)))}
        return {"state": state, "param_groups": [group]}

    def load_state_dicts(self, states: Sequence[dict[str, Any]], steps: int) -> None:
        """Stack the torch-format states of the M models (the inverse of `state_dict`) after `steps` updates."""
        self.step_count.fill_(steps)
        names = ["momentum_buffer"] if self.kind == "sgd" else ["exp_avg", "exp_avg_sq"]
        per_model = [[s["state"].get(key, {}) for key in s["param_groups"][0]["params"]] for s in states]
        for position, (layout, buffers) in enumerate(zip(self.layouts, self.buffers)):
            for buffer, name in zip(buffers, names):
                values = [model[position].get(name) for model in per_model]
                if any(v is None for v in values):
                    continue  # no state yet for this tensor (a run that has not stepped): keep the zeros
                buffer.copy_(stack_as(layout, values))
