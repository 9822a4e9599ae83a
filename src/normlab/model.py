"""The character-level MLP language model of the lesson, its variants, and the named presets.

Every model maps a batch of contexts (B, block_size) int64 to logits (B, vocab_size). The architecture is one
`Sequential` of normlab layers, so diagnostics, hooks and optimizers see ordinary modules:

    mlp:      Embedding → Flatten → [Linear → Norm → Act] × n_layers → Linear (→ Norm)
    wavenet:  Embedding → [FlattenConsecutive(2) → Linear → Norm → Act] × n_layers → Linear
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from normlab import nn
from normlab.errors import ConfigError

ARCHITECTURES = ("mlp", "wavenet")
NORMS = ("none", "batch", "layer", "group", "rms")
ACTIVATIONS = ("tanh", "relu")
INITS = ("torch", "naive", "fan_in", "kaiming", "xavier")


@dataclass
class ModelConfig:
    """Every knob of the model, with the lesson's values as defaults (the `lesson-original` preset)."""

    architecture: str = "mlp"  # mlp | wavenet
    block_size: int = 3  # characters of context
    n_embd: int = 10  # embedding size per character
    n_hidden: int = 200  # width of each hidden layer
    n_layers: int = 1  # hidden blocks; for wavenet the FlattenConsecutive(2) stages, block_size == 2**n_layers
    norm: str = "none"  # none | batch | layer | group | rms, after each hidden Linear
    norm_groups: int = 8  # groups of GroupNorm
    bn_momentum: float = 0.1  # momentum of the BatchNorm running statistics
    activation: str = "tanh"  # tanh | relu
    init: str = "naive"  # hidden weights: torch | naive N(0,1) | fan_in N(0,1/fan_in) | kaiming | xavier
    weight_scale: float = 1.0  # multiplies the hidden weights after init
    hidden_bias: bool | None = None  # None: a bias unless a norm follows (the norm's shift makes it redundant)
    bias_scale: float = 1.0  # hidden biases are N(0,1)·bias_scale (torch init: its uniform·bias_scale)
    output_init: str = "naive"  # output weights, same choices as init
    output_weight_scale: float = 1.0
    output_bias: bool = True
    output_bias_scale: float = 1.0
    output_norm: bool = False  # a BatchNorm1d after the output Linear (the lesson's deep net)
    output_norm_gain: float = 1.0  # initial weight of that output norm
    residual: bool = False  # x + block(x) around hidden blocks of equal width (mlp only)

    def validate(self) -> None:
        """Raise `ConfigError` naming the first inconsistent value and its fix."""
        for name, value, choices in (("architecture", self.architecture, ARCHITECTURES),
                                     ("norm", self.norm, NORMS), ("activation", self.activation, ACTIVATIONS),
                                     ("init", self.init, INITS), ("output_init", self.output_init, INITS)):
            if value not in choices:
                raise ConfigError(f"model.{name}={value!r} is not one of {', '.join(choices)}")
        for name in ("block_size", "n_embd", "n_hidden", "n_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.architecture == "wavenet" and self.block_size != 2 ** self.n_layers:
            raise ConfigError(f"wavenet merges pairs of positions n_layers={self.n_layers} times, so block_size "
                              f"must be 2**n_layers={2 ** self.n_layers}, got {self.block_size}: set both")
        if self.norm == "group" and self.n_hidden % self.norm_groups:
            raise ConfigError(f"GroupNorm needs n_hidden ({self.n_hidden}) divisible by norm_groups "
                              f"({self.norm_groups}): change one of them")
        if self.residual and self.architecture != "mlp":
            raise ConfigError("residual connections need hidden blocks of equal width: use architecture=mlp")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise ConfigError(f"model.bn_momentum must be in [0, 1], got {self.bn_momentum}")


class Residual(nn.Module):
    """x + block(x): the block's input and output have the same shape."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Positionwise(nn.Module):
    """Apply a norm over channels to every position of (B, T, C) input by folding T into the batch.

    For BatchNorm this is the lesson's wavenet BatchNorm (statistics over dims 0 and 1); for GroupNorm it keeps
    positions apart. 2-D input passes straight through.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.reshape(-1, x.shape[-1])).view(x.shape)  # (B*T, C) → (B, T, C)


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


def _gain(activation: str) -> float:
    return nn.init.calculate_gain(activation)


def _init_linear(layer: nn.Linear, init: str, activation: str, weight_scale: float, bias_scale: float,
                 generator: torch.Generator) -> None:
    """Draw the layer's weight and bias with `generator` following the named scheme, then scale them."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        if init == "torch":
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                layer.bias.uniform_(-bound, bound, generator=generator)
        else:
            std = {"naive": 1.0, "fan_in": 1.0 / math.sqrt(fan_in),
                   "kaiming": _gain(activation) / math.sqrt(fan_in),
                   "xavier": _gain(activation) * math.sqrt(2.0 / (fan_in + fan_out))}[init]
            layer.weight.normal_(0.0, std, generator=generator)
            if layer.bias is not None:
                layer.bias.normal_(0.0, 1.0, generator=generator)
        layer.weight.mul_(weight_scale)
        if layer.bias is not None and bias_scale:
            layer.bias.mul_(bias_scale)
        elif layer.bias is not None:
            layer.bias.zero_()  # drawn all the same, as the lesson's `randn(...) * 0`, but +0.0 everywhere


def _norm(config: ModelConfig, width: int, positionwise: bool) -> nn.Module:
    if config.norm == "batch":
        norm: nn.Module = nn.BatchNorm1d(width, momentum=config.bn_momentum)
    elif config.norm == "group":
        norm = nn.GroupNorm(config.norm_groups, width)
    elif config.norm == "layer":
        return nn.LayerNorm(width)
    else:
        return nn.RMSNorm(width)
    return Positionwise(norm) if positionwise else norm


def build_model(config: ModelConfig, vocab_size: int, seed: int = 2147483647) -> LanguageModel:
    """Build the model of `config`, drawing every initial value from a generator seeded with `seed`.

    Draw order: embedding, then each hidden Linear (weight, bias), then the output Linear, as the lesson does.
    """
    config.validate()
    generator = torch.Generator().manual_seed(seed)
    use_norm = config.norm != "none"
    hidden_bias = (not use_norm) if config.hidden_bias is None else config.hidden_bias
    activation = nn.Tanh if config.activation == "tanh" else nn.ReLU
    wavenet = config.architecture == "wavenet"

    embedding = nn.Embedding(vocab_size, config.n_embd)
    with torch.no_grad():
        embedding.weight.normal_(0.0, 1.0, generator=generator)
    layers: list[nn.Module] = [embedding]
    if not wavenet:
        layers.append(nn.Flatten())
    width = config.n_embd * (2 if wavenet else config.block_size)
    for index in range(config.n_layers):
        linear = nn.Linear(width, config.n_hidden, bias=hidden_bias)
        _init_linear(linear, config.init, config.activation, config.weight_scale, config.bias_scale, generator)
        block = [linear] + ([_norm(config, config.n_hidden, wavenet)] if use_norm else []) + [activation()]
        if wavenet:
            layers.append(nn.FlattenConsecutive(2))
        if config.residual and index > 0:
            layers.append(Residual(nn.Sequential(*block)))
        else:
            layers.extend(block)
        width = config.n_hidden * (2 if wavenet and index + 1 < config.n_layers else 1)
    output = nn.Linear(config.n_hidden, vocab_size, bias=config.output_bias)
    _init_linear(output, config.output_init, config.activation, config.output_weight_scale, config.output_bias_scale,
                 generator)
    layers.append(output)
    if config.output_norm:
        output_norm = nn.BatchNorm1d(vocab_size, momentum=config.bn_momentum)
        with torch.no_grad():
            output_norm.weight.fill_(config.output_norm_gain)
        layers.append(output_norm)
    return LanguageModel(nn.Sequential(*layers), config.block_size, vocab_size)


@dataclass(frozen=True)
class Preset:
    """A named configuration: the model, and the training settings that differ from `TrainConfig`'s."""

    description: str
    model: ModelConfig
    train: dict = field(default_factory=dict)


_SOFTMAX_FIX = dict(output_weight_scale=0.01, output_bias_scale=0.0)
_KAIMING = dict(init="kaiming", bias_scale=0.01, **_SOFTMAX_FIX)

PRESETS: dict[str, Preset] = {
    "lesson-original": Preset(
        "the lesson's starting point: unscaled N(0,1) init everywhere (confidently wrong, saturated tanh)",
        ModelConfig()),
    "lesson-softmax-fix": Preset(
        "output layer weights ×0.01 and bias 0, so the initial loss is -log(1/27)",
        ModelConfig(**_SOFTMAX_FIX)),
    "lesson-tanh-fix": Preset(
        "also hidden weights ×0.2 and bias ×0.01, so the tanh layer is not saturated at init",
        ModelConfig(weight_scale=0.2, bias_scale=0.01, **_SOFTMAX_FIX)),
    "lesson-kaiming": Preset(
        "hidden weights N(0,1)·(5/3)/√fan_in (Kaiming init for tanh) instead of the hand-tuned 0.2",
        ModelConfig(**_KAIMING)),
    "lesson-batchnorm": Preset(
        "BatchNorm1d after a bias-free hidden Linear, running statistics with momentum 0.001",
        ModelConfig(norm="batch", bn_momentum=0.001, **_KAIMING)),
    "lesson-deep": Preset(
        "six layers: [Linear(100, no bias) → BatchNorm1d → Tanh] × 5, then Linear → BatchNorm1d with gain 0.1; "
        "every Linear N(0,1)·(5/3)/√fan_in",
        ModelConfig(n_hidden=100, n_layers=5, norm="batch", init="kaiming", output_init="kaiming",
                    output_bias=False, output_norm=True, output_norm_gain=0.1)),
    "wavenet": Preset(
        "block_size 8, three FlattenConsecutive(2) → Linear → BatchNorm1d → Tanh stages (the lesson's WaveNet)",
        ModelConfig(architecture="wavenet", block_size=8, n_embd=24, n_hidden=128, n_layers=3, norm="batch",
                    init="fan_in", output_init="fan_in", output_weight_scale=0.1, output_bias_scale=0.0),
        train={"lr_decay_step": 150_000}),
    "fast": Preset(
        "the lesson's val loss in seconds: wider context and layer, BatchNorm, batch 256, AdamW with cosine decay",
        ModelConfig(block_size=5, n_embd=24, n_hidden=400, norm="batch", init="kaiming", output_weight_scale=0.1,
                    output_bias_scale=0.0),
        train={"steps": 2500, "batch_size": 256, "optimizer": "adamw", "lr": 0.006, "schedule": "cosine",
               "warmup_steps": 100, "eval_every": 250, "checkpoint_every": 2500, "compile": False}),
}
DEFAULT_PRESET = "lesson-batchnorm"


def get_preset(name: str) -> Preset:
    """The preset called `name`; `ConfigError` listing the valid names otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} (see `normlab presets`)")
    return PRESETS[name]
