"""The character-level MLP language model of the lesson and its variants, built from a `ModelConfig`.

Every model maps a batch of contexts (B, block_size) int64 to logits (B, vocab_size). The architecture is one
`Sequential` of normlab layers, so diagnostics, hooks and optimizers see ordinary modules:

    mlp:      Embedding → Flatten → [Linear → Norm → Act] × n_layers → Linear (→ Norm)
    wavenet:  Embedding → [FlattenConsecutive(2) → Linear → Norm → Act] × n_layers → Linear

With `dropout` > 0 a `Dropout` follows the activation of every hidden block that feeds another hidden block
(so it needs n_layers ≥ 2): `[Linear → Norm → Act → Dropout] × (n_layers − 1) → Linear → Norm → Act → Linear`.
Not before the output Linear: on the lesson's file that placement raised the `best` preset's val loss (README,
the `best` preset). Each Dropout draws from its own generator, which the engines reseed every training step with
`seed_dropout`.
"""

from __future__ import annotations

import hashlib

import torch

from normlab import nn
from normlab.config import ModelConfig

DEFAULT_SEED = 2147483647  # the lesson's generator seed


class Residual(nn.Module):
    """x + block(x): the block's input and output have the same shape."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class LanguageModel(nn.Module):
    """Contexts (B, block_size) int64 → logits (B, vocab_size), through `self.layers`."""

    def __init__(self, layers: nn.Sequential, block_size: int, vocab_size: int) -> None:
        super().__init__()
        self.layers = layers
        self.block_size = block_size
        self.vocab_size = vocab_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.shape[1] != self.block_size:
            raise ValueError(f"expected contexts of shape (batch, {self.block_size}), got {tuple(idx.shape)}")
        return self.layers(idx)


def state_shapes(config: ModelConfig, vocab_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The key, shape and dtype of every tensor of `build_model(config, vocab_size).state_dict()`, found on torch's
    meta device: nothing is allocated, whatever the sizes."""
    with torch.device("meta"):
        model = build_model(config, vocab_size)
    return {key: (tuple(value.shape), value.dtype) for key, value in model.state_dict().items()}


def _norm(config: ModelConfig, width: int, positionwise: bool, **factory: object) -> nn.Module:
    momentum = {"momentum": config.bn_momentum}
    if config.norm == "batch":
        norm: nn.Module = nn.BatchNorm1d(width, **momentum, **factory)
    elif config.norm == "batchrenorm":
        norm = nn.BatchRenorm1d(width, **momentum, r_max=config.renorm_r_max, d_max=config.renorm_d_max,
                                warmup_steps=config.renorm_warmup_steps, hold_steps=config.renorm_hold_steps,
                                **factory)
    elif config.norm == "ghostbatch":
        norm = nn.GhostBatchNorm1d(width, config.ghost_batch_size, **momentum, **factory)
    elif config.norm == "syncbatch":
        norm = nn.SyncBatchNorm(width, **momentum, **factory)
    elif config.norm == "group":
        norm = nn.GroupNorm(config.norm_groups, width, **factory)
    elif config.norm == "layer":
        return nn.LayerNorm(width, **factory)
    else:
        return nn.RMSNorm(width, **factory)
    return nn.Positionwise(norm) if positionwise else norm


def build_model(config: ModelConfig, vocab_size: int, seed: int = DEFAULT_SEED, *,
                generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> LanguageModel:
    """Build the model of `config`, drawing every initial value from `generator` (default: a new generator
    seeded with `seed`); torch's global random state is never touched.

    Draw order: the embedding, then each hidden Linear (weight, bias), then the output Linear, as the lesson
    does. Hidden biases are drawn from N(0, 1) (torch's own uniform with `init="torch"`) and scaled by
    `bias_scale`, as the lesson scales its `randn` draws.
    """
    config.validate()
    generator = generator or torch.Generator().manual_seed(seed)
    factory = {"dtype": dtype}
    use_norm = config.norm != "none"
    activation = nn.Tanh if config.activation == "tanh" else nn.ReLU
    wavenet = config.architecture == "wavenet"

    def linear(fan_in: int, fan_out: int, bias: bool, init: str, weight_scale: float, bias_scale: float
               ) -> nn.Linear:
        return nn.Linear(fan_in, fan_out, bias=bias, init=init, nonlinearity=config.activation,
                         bias_init="uniform" if init == "torch" else "normal", weight_scale=weight_scale,
                         bias_scale=bias_scale, generator=generator, **factory)

    layers: list[nn.Module] = [nn.Embedding(vocab_size, config.n_embd, generator=generator, **factory)]
    if not wavenet:
        layers.append(nn.Flatten())
    width = config.n_embd * (2 if wavenet else config.block_size)
    for index in range(config.n_layers):
        block = [linear(width, config.n_hidden, config.has_hidden_bias, config.init, config.weight_scale,
                        config.bias_scale)]
        if use_norm:
            block.append(_norm(config, config.n_hidden, wavenet, **factory))
        block.append(activation())
        if config.dropout > 0 and index + 1 < config.n_layers:
            block.append(nn.Dropout(config.dropout, generator=torch.Generator()))
        if wavenet:
            layers.append(nn.FlattenConsecutive(2))
        if config.residual and index > 0:
            layers.append(Residual(nn.Sequential(*block)))
        else:
            layers.extend(block)
        width = config.n_hidden * (2 if wavenet and index + 1 < config.n_layers else 1)
    layers.append(linear(config.n_hidden, vocab_size, config.output_bias, config.output_init,
                         config.output_weight_scale, config.output_bias_scale))
    if config.output_norm:
        output_norm = nn.BatchNorm1d(vocab_size, momentum=config.bn_momentum, **factory)
        with torch.no_grad():
            output_norm.weight.fill_(config.output_norm_gain)
        layers.append(output_norm)
    return LanguageModel(nn.Sequential(*layers), config.block_size, vocab_size)


def dropout_layers(model: torch.nn.Module) -> list[nn.Dropout]:
    """The `normlab.nn.Dropout` layers of `model`, in the order of `modules()`."""
    return [module for module in model.modules() if isinstance(module, nn.Dropout)]


def dropout_seed(seed: int, step: int, rank: int, layer: int) -> int:
    """The generator seed of Dropout number `layer` at training step `step` (0-based) of a run seeded `seed`, on
    process `rank`: a hash of the four, so that no two of them share a stream of masks."""
    digest = hashlib.blake2b(f"dropout {seed} {step} {rank} {layer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def seed_dropout(layers: list[nn.Dropout], seed: int, step: int, *, rank: int = 0,
                 device: torch.device | str = "cpu") -> None:
    """Reseed every Dropout of `layers` (see `dropout_layers`) for training step `step` of the run seeded `seed`.

    The masks of a step are then a pure function of (seed, step, rank), as its batch is of (seed, step): a
    resumed run draws the masks an uninterrupted one would, with no generator state in the checkpoint. The
    generators are made anew on `device` (the model's) when they are elsewhere.
    """
    device = torch.device(device)
    for index, layer in enumerate(layers):
        if layer.generator is None or layer.generator.device != device:
            layer.generator = torch.Generator(device)
        layer.generator.manual_seed(dropout_seed(seed, step, rank, index))
