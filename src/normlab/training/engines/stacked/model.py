"""M models of one MLP architecture (the mlp or the wavenet) as stacked tensors, forward and backward written out.

This is the stacked engine's model. A model of the lesson is tiny, so a step of a plain PyTorch loop spends its
time on the overhead of some sixty small operations and autograd's bookkeeping, not on arithmetic. Here the M
models of a sweep (or the single model of one run, M = 1) share every operation: batched matrix products over a
leading model axis, the closed-form norm backwards, the softmax–cross-entropy gradient p − onehot. Shapes:
contexts (M, B, T), hidden activations (M, R, H), logits (M, B, V). A hidden layer's rows R are the examples
(the mlp: R = B, its input the T·E embeddings of an example), or for the wavenet the examples' groups of
positions: its layer i takes pairs of consecutive rows of layer i − 1 (a view, R halves) as one input row, so
that every norm over the batch computes its statistics over examples and positions, as `Positionwise` does.

`StackedMLP.from_state_dicts` stacks M state dicts in the reference key format (`layout.state_layout`), and
`state_dict(i)` gives model i's back as views, so a stacked run starts, checkpoints and ends exactly where M
separate runs of the reference engine would, without building a module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from normlab.config import ModelConfig
from normlab.training.engines.stacked.layout import (
    RUNNING_NORMS,
    SHAPE_FIELDS,
    per_model_view,
    shape_key,
    stack_as,
    stacking_problem,
    state_layout,
    unstack_as,
)


@dataclass(frozen=True)
class MatmulGrad:
    """A stacked weight's gradient kept as two batched factors, left @ right, so that plain SGD can fold its
    update into one batched matrix product (`param.baddbmm_`) instead of writing the gradient out first."""

    left: torch.Tensor
    right: torch.Tensor

    def materialize(self) -> torch.Tensor:
        """The gradient itself."""
        return torch.bmm(self.left, self.right)


@dataclass(frozen=True)
class IndexGrad:
    """The embedding table's gradient kept as the rows it adds `values` to (table row i += values[i]), so that
    plain SGD can add −lr·values into the table in place (`index_add_`) instead of writing the gradient out."""

    rows: torch.Tensor  # (N,) rows of the (M·V, E) table of all embeddings
    values: torch.Tensor  # (N, E)

    def materialize(self, table: torch.Tensor) -> torch.Tensor:
        """The gradient, shaped like `table` (M, V, E)."""
        flat = torch.zeros_like(table).view(-1, table.shape[-1])
        return flat.index_add_(0, self.rows, self.values).view_as(table)


@dataclass
class HiddenLayer:
    """One hidden block of the M models: weight (M, in, out), optional bias and norm state."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    gamma: torch.Tensor | None = None  # (M, 1, H)
    beta: torch.Tensor | None = None  # (M, 1, H); None for RMSNorm
    running_mean: torch.Tensor | None = None  # (M, 1, H), BatchNorm only
    running_var: torch.Tensor | None = None
    num_batches_tracked: torch.Tensor | None = None  # (M,) int64


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) as 2·sigmoid(2x) − 1, the same function: torch 2.13's CPU tanh is 4–5x slower than its sigmoid
    here, eager and compiled (measured on 2 cores, 204,800 values: 215 against 50 µs eager, ~100 against ~25 µs
    compiled). Within 2e-7 of tanh in float32 (within 3 units in the last place of 1), within 1e-16 in float64."""
    return torch.sigmoid(x * 2).mul_(2).sub_(1)


class StackedMLP:
    """M MLP language models of one architecture, trained in lockstep with a hand-written backward."""

    def __init__(self, configs: Sequence[ModelConfig], embedding: torch.Tensor, hidden: list[HiddenLayer],
                 output_weight: torch.Tensor, output_bias: torch.Tensor | None, vocab_size: int) -> None:
        self.configs = list(configs)
        self.num_models = len(configs)
        first = configs[0]
        self.norm, self.activation, self.block_size = first.norm, first.activation, first.block_size
        self.groups = first.norm_groups if first.norm == "group" else 1
        self.embedding = embedding  # (M, V, E)
        self.hidden = hidden
        self.output_weight = output_weight  # (M, V, H): torch's layout, so the logits come out as (M, V, B)
        self.output_bias = output_bias  # (M, V, 1)
        self.vocab_size = vocab_size
        device = embedding.device
        self.bn_momentum = per_model_view([c.bn_momentum for c in configs], embedding)
        self.renorm = [per_model_view([getattr(c, f"renorm_{name}") for c in configs], embedding)
                       for name in ("r_max", "d_max", "hold_steps", "warmup_steps")]
        self.eps = 1e-5
        self._offsets = torch.arange(self.num_models, device=device) * vocab_size
        self.layout = state_layout(first)  # where each stacked tensor sits in a model's state dict
        self.parameter_layouts = [entry.layout for entry in self.layout if entry.parameter]
        # One model, uncompiled: torch's own fused kernels for tanh and batch norm (one call each way instead of
        # a dozen small ones; the written-out formulas below stay the specification, and compiled code fuses them)
        self.fused_kernels = False
        # Training batches seen by the batch norms but not yet added to their num_batches_tracked (`SingleModelSGD`
        # counts in Python, not with a tensor operation per step): added whenever the tensors are read
        self.uncounted_batches = 0

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_state_dicts(cls, configs: Sequence[ModelConfig], states: Sequence[Mapping[str, torch.Tensor]],
                         vocab_size: int) -> StackedMLP:
        """Stack copies of M state dicts (of `build_model(configs[i], vocab_size)`'s key format), on the device and
        in the dtype of the given tensors."""
        problems = {stacking_problem(c) for c in configs} - {None}
        if problems:
            raise ValueError(f"these models cannot be stacked: {', '.join(sorted(problems))}")
        if len({shape_key(c) for c in configs}) != 1:
            raise ValueError(f"stacked models must share their architecture ({', '.join(SHAPE_FIELDS)})")
        layout = state_layout(configs[0])
        tensors = [stack_as(entry.layout, [state[entry.key] for state in states]) for entry in layout]
        params = [t for t, entry in zip(tensors, layout) if entry.parameter]
        buffers = [t for t, entry in zip(tensors, layout) if not entry.parameter]
        first = configs[0]
        embedding = params.pop(0)
        hidden = []
        for _ in range(first.n_layers):
            block = HiddenLayer(weight=params.pop(0), bias=params.pop(0) if first.has_hidden_bias else None)
            if first.norm != "none":
                block.gamma = params.pop(0)
                block.beta = params.pop(0) if first.norm != "rms" else None
            if first.norm in RUNNING_NORMS:
                block.running_mean, block.running_var, block.num_batches_tracked = buffers[:3]
                buffers = buffers[3:]
            hidden.append(block)
        output_weight = params.pop(0)
        output_bias = params.pop(0) if first.output_bias else None
        return cls(configs, embedding, hidden, output_weight, output_bias, vocab_size)

    def count_batches(self) -> None:
        """Add the training batches counted in Python (`uncounted_batches`) to every num_batches_tracked."""
        if self.uncounted_batches:
            for block in self.hidden:
                if block.num_batches_tracked is not None:
                    block.num_batches_tracked.add_(self.uncounted_batches)
            self.uncounted_batches = 0

    def tensors(self) -> list[torch.Tensor]:
        """Every stacked tensor, in the order of a model's `state_dict()` (see `layout.state_layout`), up to date."""
        self.count_batches()
        out = [self.embedding]
        for block in self.hidden:
            out += [t for t in (block.weight, block.bias, block.gamma, block.beta, block.running_mean,
                                block.running_var, block.num_batches_tracked) if t is not None]
        return out + [t for t in (self.output_weight, self.output_bias) if t is not None]

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Model `index`'s state dict in the reference key format, as views of the stacked tensors."""
        return {entry.key: unstack_as(entry.layout, tensor, index)
                for entry, tensor in zip(self.layout, self.tensors())}

    def parameters(self) -> list[torch.Tensor]:
        """Every trainable tensor, in the order of a model's `parameters()`."""
        return [t for t, entry in zip(self.tensors(), self.layout) if entry.parameter]

    # ----------------------------------------------------------------------------------------------- forward
    def rows(self, contexts: torch.Tensor) -> torch.Tensor:
        """Contexts (M, B, ...) as rows of the (M·V, E) table of all embeddings: model i's token t is row i·V + t."""
        if self.num_models == 1:
            return contexts
        return contexts + self._offsets.view((-1,) + (1,) * (contexts.dim() - 1))

    def _embed(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (M, B, T) of the stacked table → embeddings (M, B, T·E): one gather."""
        m, b, _ = rows.shape
        table = self.embedding.view(-1, self.embedding.shape[-1])
        return table.index_select(0, rows.reshape(-1)).view(m, b, -1)

    def _normalize(self, h: torch.Tensor, block: HiddenLayer, training: bool) -> tuple[torch.Tensor, tuple]:
        """The norm of one block; returns the output and what the backward needs."""
        if self.norm == "rms":
            inv = torch.rsqrt(h.square().mean(2, keepdim=True) + torch.finfo(h.dtype).eps)  # eps=None: machine eps
            return h * inv * block.gamma, (h, inv)
        if self.norm in RUNNING_NORMS and not training:
            inv = torch.rsqrt(block.running_var + self.eps)
            return torch.addcmul(block.beta, (h - block.running_mean) * inv, block.gamma), (None, inv)
        if self.norm not in RUNNING_NORMS:  # per example: over the features of each group (LayerNorm: one group)
            grouped = h.view(*h.shape[:2], self.groups, -1)  # (M, B, G, H/G)
            mean = grouped.mean(3, keepdim=True)
            centered = grouped - mean
            inv = torch.rsqrt(centered.square().mean(3, keepdim=True) + self.eps)
            return torch.addcmul(block.beta, (centered * inv).view_as(h), block.gamma), ((centered * inv), inv)
        if self.fused_kernels and self.norm == "batch":
            return self._fused_batch_norm(h, block)
        mean = h.mean(1, keepdim=True)  # per feature: over the examples of the batch
        centered = h - mean
        var = centered.square().mean(1, keepdim=True)
        inv = torch.rsqrt(var + self.eps)
        x_hat = centered * inv
        renorm = self._renorm_factors(block, mean, var) if self.norm == "batchrenorm" else None
        with torch.no_grad():
            n = h.shape[1]
            block.running_mean.lerp_(mean, self.bn_momentum)
            block.running_var.lerp_(var * (n / max(n - 1, 1)), self.bn_momentum)  # torch tracks the unbiased one
            block.num_batches_tracked += 1
        if renorm is None:
            return torch.addcmul(block.beta, x_hat, block.gamma), (x_hat, inv)
        r, d = renorm
        normalized = torch.addcmul(d, x_hat, r)  # x̂·r + d
        return torch.addcmul(block.beta, normalized, block.gamma), (x_hat, inv, r, normalized)

    def _fused_batch_norm(self, h: torch.Tensor, block: HiddenLayer) -> tuple[torch.Tensor, tuple]:
        """torch's batch-norm kernel on the one model's (R, H) rows: the same statistics and running updates."""
        rows = h.view(-1, h.shape[-1])
        out, mean, invstd = torch.native_batch_norm(
            rows, block.gamma.view(-1), block.beta.view(-1), block.running_mean.view(-1), block.running_var.view(-1),
            True, self.configs[0].bn_momentum, self.eps)
        with torch.no_grad():
            block.num_batches_tracked += 1
        return out.view_as(h), ("fused", rows, mean, invstd)

    def _renorm_factors(self, block: HiddenLayer, mean: torch.Tensor, var: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch renormalisation's r = clip(σ_B/σ, 1/r_max(t), r_max(t)) and d = clip((μ_B − μ)/σ, ±d_max(t)),
        from the running statistics before this batch, with the limits relaxed by `normlab.nn.BatchRenorm1d`'s
        schedule over t = num_batches_tracked; constants for the backward (no gradient through them)."""
        r_max, d_max, hold, warmup = self.renorm
        steps = block.num_batches_tracked.view(-1, 1, 1).to(mean.dtype)  # (M, 1, 1)
        ramp = torch.where(warmup > 0, (steps - hold) / warmup.clamp(min=1), torch.ones_like(steps)).clamp(max=1.0)
        ramp = torch.where(steps < hold, torch.zeros_like(ramp), ramp)
        r_limit, d_limit = 1.0 + (r_max - 1.0) * ramp, d_max * ramp
        running_inv = torch.rsqrt(block.running_var + self.eps)
        r = torch.minimum(torch.maximum(torch.sqrt(var + self.eps) * running_inv, 1.0 / r_limit), r_limit)
        d = torch.minimum(torch.maximum((mean - block.running_mean) * running_inv, -d_limit), d_limit)
        return r, d

    def forward(self, contexts: torch.Tensor, training: bool = False, *, rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list]:
        """Logits (M, B, V) of contexts (M, B, T) (or of their `rows`), and the activations the backward needs.
        (The logits are a transposed view of the (M, V, B) product: the faster way round for small V.)"""
        logits_t, saved = self._forward(contexts, training, rows)
        return logits_t.transpose(1, 2), saved

    def _forward(self, contexts: torch.Tensor | None, training: bool, rows: torch.Tensor | None
                 ) -> tuple[torch.Tensor, list]:
        rows = self.rows(contexts) if rows is None else rows
        if self.uncounted_batches:
            self.count_batches()
        x = self._embed(rows)
        saved = [(None, x)]  # (what the norm's backward needs, the block's output) per block, the embedding first
        for block in self.hidden:
            x = x.view(x.shape[0], -1, block.weight.shape[1])  # (M, R, in): the wavenet merges pairs of rows
            h = torch.bmm(x, block.weight) if block.bias is None else torch.baddbmm(block.bias, x, block.weight)
            norm_saved = None
            if self.norm != "none":
                h, norm_saved = self._normalize(h, block, training)
            if self.activation == "tanh":
                x = torch.tanh(h) if self.fused_kernels else _tanh(h)
            else:
                x = torch.relu(h)
            saved.append((norm_saved, x))
        if self.output_bias is None:
            return torch.bmm(self.output_weight, x.transpose(1, 2)), saved  # (M, V, B)
        return torch.baddbmm(self.output_bias, self.output_weight, x.transpose(1, 2)), saved

    # ----------------------------------------------------------------------------------------------- backward
    def loss_and_gradients(self, contexts: torch.Tensor | None, targets: torch.Tensor, *,
                           rows: torch.Tensor | None = None, factored: bool = False) -> tuple[torch.Tensor, list]:
        """Training-mode forward and hand-written backward: per-model mean cross-entropy (M,) and gradients
        in the order of `parameters()`. Updates BatchNorm running statistics, as a training forward does.
        Give `rows` (from `self.rows(contexts)`, e.g. computed for many steps at once) instead of contexts.
        With `factored`, the weight matrices' gradients come as `MatmulGrad`s and the embedding table's as an
        `IndexGrad`."""

        def product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor | MatmulGrad:
            return MatmulGrad(left, right) if factored else torch.bmm(left, right)

        rows = self.rows(contexts) if rows is None else rows
        logits_t, saved = self._forward(None, True, rows)  # (M, V, B)
        b = logits_t.shape[2]
        log_probs = torch.log_softmax(logits_t, dim=1)
        index = targets.unsqueeze(1)  # (M, 1, B)
        loss = -log_probs.gather(1, index).squeeze(1).mean(1)  # (M,)
        # d(mean cross-entropy)/d logits = (softmax − onehot) / B
        d_logits = log_probs.exp_().scatter_add_(1, index, self._minus_ones(index, logits_t.dtype))
        d_logits.mul_(1.0 / b)  # (M, V, B)
        x = saved[-1][1]
        grads_out = [product(d_logits, x)]  # (M, V, H)
        if self.output_bias is not None:
            grads_out.append(d_logits.sum(2, keepdim=True))
        d_x = torch.bmm(d_logits.transpose(1, 2), self.output_weight)  # (M, B, H)
        grads_hidden: list[list[torch.Tensor]] = []
        for depth in range(len(self.hidden) - 1, -1, -1):
            block = self.hidden[depth]
            norm_saved, out = saved[depth + 1]
            x_in = saved[depth][1].view(out.shape[0], -1, block.weight.shape[1])  # the layer's input rows
            if self.activation == "tanh" and self.fused_kernels:
                d_h = torch.ops.aten.tanh_backward(d_x, out)
            elif self.activation == "tanh":
                d_h = torch.addcmul(d_x, d_x, out.square(), value=-1.0)  # dx · (1 − tanh²)
            else:
                d_h = d_x * (out > 0)
            block_grads: list[torch.Tensor] = []
            if self.norm != "none":
                d_h, norm_grads = self._normalize_backward(d_h, block, norm_saved)
                block_grads = norm_grads
            d_weight = product(x_in.transpose(1, 2), d_h)
            linear_grads = [d_weight] + ([d_h.sum(1, keepdim=True)] if block.bias is not None else [])
            grads_hidden.append(linear_grads + block_grads)
            if depth or self.fused_kernels:
                d_x = torch.bmm(d_h, block.weight.transpose(1, 2)).view_as(saved[depth][1])
            else:  # (M, T·E, B), then transposed: the faster way round for the narrow embedding input
                d_x = torch.bmm(block.weight, d_h.transpose(1, 2)).transpose(1, 2)
        d_table = IndexGrad(rows.reshape(-1), d_x.reshape(-1, self.embedding.shape[-1]))
        grads = [d_table if factored else d_table.materialize(self.embedding)]
        for block_grads in reversed(grads_hidden):
            grads += block_grads
        return loss, grads + grads_out

    def _minus_ones(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of −1 shaped like `index` (M, 1, B), kept between steps of one shape."""
        cached = getattr(self, "_minus_ones_cache", None)
        if cached is None or cached.shape != index.shape or cached.dtype != dtype or torch.compiler.is_compiling():
            cached = torch.full_like(index, -1, dtype=dtype)
            if not torch.compiler.is_compiling():
                self._minus_ones_cache = cached
        return cached

    def _normalize_backward(self, d_y: torch.Tensor, block: HiddenLayer, saved: tuple) -> tuple[torch.Tensor, list]:
        if isinstance(saved[0], str):  # "fused": torch's batch-norm backward, for `_fused_batch_norm`
            _, rows, mean, invstd = saved
            d_h, d_gamma, d_beta = torch.ops.aten.native_batch_norm_backward(
                d_y.reshape(rows.shape), rows, block.gamma.view(-1), block.running_mean.view(-1),
                block.running_var.view(-1), mean, invstd, True, self.eps, [True, True, True])
            return d_h.view_as(d_y), [d_gamma.view_as(block.gamma), d_beta.view_as(block.beta)]
        if self.norm == "rms":
            h, inv = saved
            g_dy = d_y * block.gamma
            d_gamma = (d_y * h * inv).sum(1, keepdim=True)
            n = h.shape[2]
            d_h = inv * g_dy - h * inv.pow(3) * (g_dy * h).sum(2, keepdim=True) / n
            return d_h, [d_gamma]
        # dx = invstd/n · (n·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂)), the sums over the normalised values
        x_hat, inv = saved[:2]
        d_beta = d_y.sum(1, keepdim=True)
        if self.norm in RUNNING_NORMS:
            n = x_hat.shape[1]
            if self.norm == "batch":
                d_gamma = (d_y * x_hat).sum(1, keepdim=True)
                d_xhat = d_y * block.gamma
                sum_dxhat, sum_dxhat_xhat = block.gamma * d_beta, block.gamma * d_gamma
            else:  # y = γ·(x̂·r + d) + β with r, d constants: dL/dx̂ = dy·γ·r
                r, normalized = saved[2:]
                d_gamma = (d_y * normalized).sum(1, keepdim=True)
                d_xhat = d_y * (block.gamma * r)
                sum_dxhat, sum_dxhat_xhat = d_xhat.sum(1, keepdim=True), (d_xhat * x_hat).sum(1, keepdim=True)
            d_h = (inv / n) * (n * d_xhat - sum_dxhat - x_hat * sum_dxhat_xhat)
            return d_h, [d_gamma, d_beta]
        d_gamma = (d_y * x_hat.view_as(d_y)).sum(1, keepdim=True)
        d_xhat = (d_y * block.gamma).view_as(x_hat)  # (M, B, G, H/G)
        n = x_hat.shape[3]
        sum_dxhat, sum_dxhat_xhat = d_xhat.sum(3, keepdim=True), (d_xhat * x_hat).sum(3, keepdim=True)
        d_h = (inv / n) * (n * d_xhat - sum_dxhat - x_hat * sum_dxhat_xhat)
        return d_h.view_as(d_y), [d_gamma, d_beta]
