"""The eager training step of one model (M = 1) with plain SGD: what a run of one lesson model does uncompiled."""

from __future__ import annotations

import torch

from normlab.training.engines.stacked.model import StackedMLP


class SingleModelSGD:
    """A training step of one model (M = 1) with plain SGD and a float learning rate, eagerly, in few operations.

    The same arithmetic as `StackedMLP.loss_and_gradients(factored=True)` followed by `StackedOptimizer.step`,
    within float rounding, but on 2-D views of the stacked tensors made once here (no per-step views, shapes or
    branches), with torch's fused kernels (batch norm, tanh and their backwards, nll loss), and with every update
    written straight into the parameters: W −= lr·xᵀ·dh is one `addmm_`, the output bias's update is one `addmm_`
    of the gradient's sums over the batch (dᵀ·1), the embedding's one `index_add_`. The backward is linear in
    the softmax gradient (p − onehot)/B, so it starts from −lr·(p − onehot)/B: every "gradient" below is
    already −lr times the gradient, the update itself, and no update takes a factor (an `alpha`, which costs
    index_add_ an extra pass).

    The views stay valid while the model's tensors are the ones it was built from (`valid_for`: they are only
    ever replaced all together, by the engine's `_set_state`); the engine rebuilds it otherwise. Supports the mlp
    and the wavenet with no norm or BatchNorm, tanh or relu (`supports`); other norms take the general path.
    """

    def __init__(self, model: StackedMLP) -> None:
        self.sources = (model.embedding, model.output_weight)  # what the views below look into (see valid_for)
        self.table = model.embedding[0]  # (V, E)
        self.embed = model.embedding.shape[-1]
        self.layers = []
        width = self.embed  # of the rows the layer's input rows are made of
        for block in model.hidden:
            weight = block.weight[0]  # (in, out)
            # the input's gradient comes as (R, in); the wavenet's previous layer wants it as (2R, in / 2)
            unmerge = None if weight.shape[0] == width else width
            width = weight.shape[1]
            norm = None
            if block.running_mean is not None:  # BatchNorm: weight, bias, running mean and var (H,)
                norm = (block.gamma.view(-1), block.beta.view(-1), block.running_mean.view(-1),
                        block.running_var.view(-1))
            bias = None if block.bias is None else (block.bias.view(-1), block.bias[0])  # (H,) and (1, H)
            self.layers.append((weight, weight.t(), weight.shape[0], unmerge, bias, norm))
        self.tanh = model.activation == "tanh"
        self.momentum, self.eps = float(model.configs[0].bn_momentum), model.eps
        self.output_weight = model.output_weight[0]  # (V, H)
        self.output_weight_t = self.output_weight.t()
        self.output_bias = None
        if model.output_bias is not None:
            self.output_bias = (model.output_bias.view(-1), model.output_bias[0])  # (V,) and (V, 1)
        self._constants: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.model, self.counts = model, model.norm == "batch"  # each step adds 1 to every num_batches_tracked

    @staticmethod
    def supports(model: StackedMLP) -> bool:
        """Whether `model` can take this step (one model; no norm or BatchNorm; tanh or relu)."""
        return model.num_models == 1 and model.norm in ("none", "batch") and model.activation in ("tanh", "relu")

    def valid_for(self, model: StackedMLP) -> bool:
        """Whether the views were made of `model`'s current tensors."""
        return self.sources[0] is model.embedding and self.sources[1] is model.output_weight

    def _ones_and_minus_ones(self, rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, 1) tensors of 1 and −1, kept between steps."""
        key = (rows, dtype)
        cached = self._constants.get(key)
        if cached is None:
            device = self.table.device
            cached = self._constants[key] = (torch.ones((rows, 1), dtype=dtype, device=device),
                                             torch.full((rows, 1), -1.0, dtype=dtype, device=device))
        return cached

    def step(self, contexts: torch.Tensor, targets: torch.Tensor, lr: float) -> torch.Tensor:
        """Train one step on contexts (B, T) and targets (B,); the mean cross-entropy (a 0-dim tensor) before it.
        Runs in inference mode (no autograd bookkeeping at all: ~10% of the step's time); the model's tensors stay
        normal tensors, updated in place, and the loss is an inference tensor (to read or copy, not to update)."""
        with torch._C._InferenceMode(True):  # torch.inference_mode() without its Python wrapper
            return self._step(contexts, targets, lr)

    def _step(self, contexts: torch.Tensor, targets: torch.Tensor, lr: float) -> torch.Tensor:
        rows = contexts.view(-1)
        x = self.table.index_select(0, rows)  # (B·T, E)
        saved = []
        if self.counts:  # added to the tensors when they are next read (`StackedMLP.count_batches`)
            self.model.uncounted_batches += 1
        for weight, _, fan_in, _, bias, norm in self.layers:
            x = x.view(-1, fan_in)  # (R, in): the wavenet merges pairs of rows
            h = torch.mm(x, weight) if bias is None else torch.addmm(bias[0], x, weight)
            if norm is None:
                y, stats = h, None
            else:
                gamma, beta, running_mean, running_var = norm
                y, mean, invstd = torch.native_batch_norm(h, gamma, beta, running_mean, running_var, True,
                                                          self.momentum, self.eps)
                stats = (h, mean, invstd)
            out = torch.tanh(y) if self.tanh else torch.relu(y)
            saved.append((x, stats, out))
            x = out
        if self.output_bias is None:
            logits = torch.mm(x, self.output_weight_t)  # (B, V)
        else:
            logits = torch.addmm(self.output_bias[0], x, self.output_weight_t)
        log_probs = torch.log_softmax(logits, 1)
        loss = torch._C._nn.nll_loss(log_probs, targets, None, 1, -100)  # the mean over the batch
        batch = logits.shape[0]
        ones, minus_ones = self._ones_and_minus_ones(batch, logits.dtype)
        # −lr × d(mean cross-entropy)/d logits = −lr/B · (softmax − onehot)
        d_logits = log_probs.exp_().scatter_add_(1, targets.view(-1, 1), minus_ones).mul_(-lr / batch)
        d_x = torch.mm(d_logits, self.output_weight)  # (B, H), before the weight's update
        self.output_weight.addmm_(d_logits.t(), x)
        if self.output_bias is not None:
            self.output_bias[1].addmm_(d_logits.t(), ones)  # the sums over the batch, as a product
        for (weight, weight_t, _, unmerge, bias, norm), (x_in, stats, out) in zip(reversed(self.layers),
                                                                                reversed(saved)):
            if self.tanh:
                d_h = torch.ops.aten.tanh_backward.default(d_x, out)
            else:
                d_h = torch.ops.aten.threshold_backward.default(d_x, out, 0)
            if norm is not None:
                gamma, beta, running_mean, running_var = norm
                h, mean, invstd = stats
                d_h, d_gamma, d_beta = torch.ops.aten.native_batch_norm_backward.default(
                    d_h, h, gamma, running_mean, running_var, mean, invstd, True, self.eps, [True, True, True])
                torch._foreach_add_((gamma, beta), (d_gamma, d_beta))
            if bias is not None:
                rows_in = d_h.shape[0]
                bias[1].addmm_(self._ones_and_minus_ones(rows_in, d_h.dtype)[0].t(), d_h)
            d_x = torch.mm(d_h, weight_t)  # (R, in), before the weight's update
            weight.addmm_(x_in.t(), d_h)
            if unmerge is not None:
                d_x = d_x.view(-1, unmerge)
        self.table.index_add_(0, rows, d_x)
        return loss
