"""Every configuration of a run, in one place: the model, training and data dataclasses, the presets, `--set`.

A run is a `RunConfig` (model + train + data), saved as `config.json` in its run directory. Each dataclass holds
its defaults next to its fields (the lesson's values), validates itself, and is overridable from the command line
with `--set key=value` (`apply_override`). A preset is a named, typed `RunConfig` starting point.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from normlab.errors import ConfigError
from normlab.nn.init import INIT_SCHEMES

ARCHITECTURES = ("mlp", "wavenet")
NORMS = ("none", "batch", "batchrenorm", "ghostbatch", "syncbatch", "layer", "group", "rms")
BATCH_NORMS = ("batch", "batchrenorm", "ghostbatch", "syncbatch")  # norms over the examples of a batch
ACTIVATIONS = ("tanh", "relu")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")
ENGINES = ("auto", "reference", "stacked", "ddp")
DEVICE_PATTERN = r"cpu|cuda(:[0-9]+)?"
# Sizes beyond these are refused before anything is built: far past what a character-level MLP needs, and small
# enough that the model's shapes are found on torch's meta device in well under a second.
LIMITS = {"block_size": 1024, "n_embd": 4096, "n_hidden": 16384, "n_layers": 128, "norm_groups": 16384,
          "ghost_batch_size": 2**20, "batch_size": 2**20, "steps": 10**9, "eval_examples": 10**7}
EVALUATIONS_PER_RUN, CHECKPOINTS_PER_RUN = 20, 4  # eval_every and checkpoint_every when not set: steps / these


def _check_choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r} is not one of {', '.join(choices)}")


def _check_finite(section: str, config: Any) -> None:
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{item.name} must be a finite number, got {value}")


def _check_at_least_one(section: str, config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{section}.{name} must be at least 1, got {value}")
        if value is not None and value > LIMITS.get(name, value):
            raise ConfigError(f"{section}.{name}={value} is beyond normlab's limit of {LIMITS[name]:,}: choose a "
                              "smaller value")


@dataclass
class ModelConfig:
    """Every knob of the model, with the lesson's values as defaults (the `lesson-original` model)."""

    architecture: str = "mlp"  # mlp | wavenet
    block_size: int = 3  # characters of context
    n_embd: int = 10  # embedding size per character
    n_hidden: int = 200  # width of each hidden layer
    n_layers: int = 1  # hidden blocks; for wavenet the FlattenConsecutive(2) stages, block_size == 2**n_layers
    norm: str = "none"  # none | batch | batchrenorm | ghostbatch | syncbatch | layer | group | rms, after each
    # hidden Linear (batchrenorm: Ioffe 2017; ghostbatch: statistics over ghost batches; syncbatch: over every rank)
    norm_groups: int = 8  # groups of GroupNorm
    bn_momentum: float = 0.1  # momentum of the running statistics of every batch norm
    ghost_batch_size: int = 16  # examples per ghost batch of ghostbatch
    renorm_r_max: float = 3.0  # batchrenorm's final clip limits of r and d...
    renorm_d_max: float = 5.0
    renorm_hold_steps: int = 5000  # ...reached after holding r_max=1, d_max=0 this many steps (BatchNorm)...
    renorm_warmup_steps: int = 20000  # ...and relaxing them linearly over this many (see normlab.nn.BatchRenorm1d)
    activation: str = "tanh"  # tanh | relu
    init: str = "naive"  # hidden weights: one of normlab.nn.init.INIT_SCHEMES (see normlab.nn.Linear)
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
    dropout: float = 0.0  # inverted dropout with this probability after every hidden activation but the last
    # (between hidden layers, not before the output Linear), in training only; masks a function of seed and step

    @property
    def has_hidden_bias(self) -> bool:
        """Whether the hidden Linear layers have a bias: `hidden_bias`, or when None, only without a norm (its
        shift makes the bias redundant)."""
        return self.norm == "none" if self.hidden_bias is None else self.hidden_bias

    def validate(self) -> None:
        """Raise `ConfigError` naming the first inconsistent value and its fix."""
        for name, choices in (("architecture", ARCHITECTURES), ("norm", NORMS), ("activation", ACTIVATIONS),
                              ("init", INIT_SCHEMES), ("output_init", INIT_SCHEMES)):
            _check_choice("model", name, getattr(self, name), choices)
        _check_finite("model", self)
        _check_at_least_one("model", self, ("block_size", "n_embd", "n_hidden", "n_layers", "norm_groups",
                                            "ghost_batch_size"))
        if not (self.renorm_r_max >= 1.0 and self.renorm_d_max >= 0.0 and math.isfinite(self.renorm_r_max)
                and math.isfinite(self.renorm_d_max)):
            raise ConfigError(f"model.renorm_r_max must be at least 1 and model.renorm_d_max at least 0, got "
                              f"{self.renorm_r_max} and {self.renorm_d_max}")
        if self.renorm_hold_steps < 0 or self.renorm_warmup_steps < 0:
            raise ConfigError("model.renorm_hold_steps and model.renorm_warmup_steps must be 0 or more")
        if self.architecture == "wavenet" and self.block_size != 2 ** self.n_layers:
            raise ConfigError(f"wavenet merges pairs of positions n_layers={self.n_layers} times, so block_size "
                              f"must be 2**n_layers={2 ** self.n_layers}, got {self.block_size}: set both")
        if self.norm == "group" and self.n_hidden % self.norm_groups:
            raise ConfigError(f"GroupNorm needs n_hidden ({self.n_hidden}) divisible by norm_groups "
                              f"({self.norm_groups}): change one of them")
        if self.residual and self.architecture != "mlp":
            raise ConfigError("residual connections need hidden blocks of equal width: use architecture=mlp")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}: use e.g. --set model.dropout=0.1 "
                              "(0 for none)")
        if self.dropout > 0 and self.n_layers < 2:
            raise ConfigError(f"model.dropout={self.dropout} acts between hidden layers, so it needs n_layers of 2 or "
                              f"more, got {self.n_layers}: raise model.n_layers or set model.dropout=0")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise ConfigError(f"model.bn_momentum must be in [0, 1], got {self.bn_momentum}")


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
    eval_every: int | None = None  # steps between train/val losses on fixed subsets; None: steps / 20
    eval_examples: int = 10_000  # size of those subsets
    checkpoint_every: int | None = None  # None: steps / 4 (the lesson's 10,000 and 50,000 at 200,000 steps)
    device: str = "cpu"
    engine: str = "auto"  # auto | reference | stacked | ddp: how steps are computed (normlab.training.engines)
    compile: bool | None = None  # torch.compile the stacked engine's steps; None: when the run is long enough

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad value and its fix."""
        _check_choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train", "schedule", self.schedule, SCHEDULES)
        _check_choice("train", "engine", self.engine, ENGINES)
        _check_finite("train", self)
        _check_at_least_one("train", self, ("steps", "batch_size", "eval_every", "eval_examples", "checkpoint_every"))
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be positive (or null for none), got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be 0 or more, got {self.warmup_steps}")
        for name, low, high in (("momentum", 0, 1), ("min_lr_factor", 0, 1), ("lr_decay_factor", 0, math.inf),
                                ("weight_decay", 0, math.inf), ("seed", 0, 2**63 - 1)):
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"train.{name} must be between {low} and {high}, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"train.beta1 and train.beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.lr_decay_step is not None and self.lr_decay_step < 0:
            raise ConfigError(f"train.lr_decay_step must be 0 or more (or null for half of steps), got "
                              f"{self.lr_decay_step}")
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ConfigError(f"train.device={self.device!r} is not a device normlab trains on: use cpu, cuda or "
                              "cuda:N")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"train.device={self.device!r} but no CUDA GPU is available: use --device cpu")

    @property
    def decay_step(self) -> int:
        """The step at which the step schedule lowers the learning rate."""
        return self.steps // 2 if self.lr_decay_step is None else self.lr_decay_step

    def resolved(self) -> TrainConfig:
        """A copy whose intervals left unset (None) are filled in from `steps`: `eval_every` = steps / 20 and
        `checkpoint_every` = steps / 4, at least 1 (10,000 and 50,000 for the lesson's 200,000 steps). The
        training loop takes resolved configs; `config.json` keeps what the user set."""
        return dataclasses.replace(
            self,
            eval_every=max(1, self.steps // EVALUATIONS_PER_RUN) if self.eval_every is None else self.eval_every,
            checkpoint_every=(max(1, self.steps // CHECKPOINTS_PER_RUN) if self.checkpoint_every is None
                              else self.checkpoint_every))


@dataclass
class DataConfig:
    """Where the words come from and how they are split."""

    path: str | None = None  # None: the bundled names list
    split_seed: int = 42  # random.Random(split_seed) shuffles the words before the 80/10/10 cut
    sha256: str | None = None  # of the words file, recorded when the run is created and checked on resume


@dataclass
class RunConfig:
    """Everything that defines a run; saved as `config.json` in the run directory.

    `RunConfig()` is the lesson's starting point, the `lesson-original` preset; `config_for_preset(name)` gives
    any other.
    """

    preset: str = "lesson-original"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The text of `config.json`."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: Any) -> RunConfig:
        """Inverse of `to_dict`, checking every key and type; `ConfigError` names the first bad one.

        Run directories written before `train.engine` replaced `train.fast` load too: fast=false becomes
        engine=reference, fast=true engine=auto.
        """
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"config.json has unknown key(s) {sorted(unknown)}")
        config = cls(preset=str(raw.get("preset", "lesson-original")))
        for section in ("model", "train", "data"):
            values = raw.get(section, {})
            if not isinstance(values, dict):
                raise ConfigError(f"config.json: {section!r} must be a JSON object")
            if section == "train" and "fast" in values and "engine" not in values:
                values = {**values, "engine": "auto" if values["fast"] else "reference"}
                del values["fast"]
            for key, value in values.items():
                _assign(getattr(config, section), section, key, value)
        config.validate()
        return config

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Parse `config.json` text."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config.json is not valid JSON ({error})") from None
        return cls.from_dict(raw)

    def validate(self) -> None:
        """Check the model and training settings."""
        self.model.validate()
        self.train.validate()


# ------------------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Preset:
    """A named configuration: what it is, its model and its training settings."""

    description: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


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
        TrainConfig(lr_decay_step=150_000)),
    "fast": Preset(
        "the lesson's val loss in seconds: wider context and layer, BatchNorm, batch 256, AdamW with cosine decay",
        ModelConfig(block_size=5, n_embd=24, n_hidden=400, norm="batch", init="kaiming", output_weight_scale=0.1,
                    output_bias_scale=0.0),
        TrainConfig(steps=2500, batch_size=256, optimizer="adamw", lr=0.006, schedule="cosine", warmup_steps=100,
                    eval_every=250, checkpoint_every=2500)),
    "best": Preset(
        "the lesson's WaveNet wider (n_embd 48, n_hidden 384) at batch 256, AdamW (lr 0.001, weight decay 0.2) with "
        "cosine decay, 20,000 steps: val 1.9504 on the lesson's file (the lesson's 1.993; the issue asks ≤ 1.95)",
        ModelConfig(architecture="wavenet", block_size=8, n_embd=48, n_hidden=384, n_layers=3, norm="batch",
                    init="fan_in", output_init="fan_in", output_weight_scale=0.1, output_bias_scale=0.0),
        TrainConfig(steps=20_000, batch_size=256, optimizer="adamw", lr=0.001, weight_decay=0.2, schedule="cosine",
                    warmup_steps=500)),
}
DEFAULT_PRESET = "lesson-batchnorm"


def get_preset(name: str) -> Preset:
    """The preset called `name`; `ConfigError` listing the valid names otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} (see `normlab presets`)")
    return PRESETS[name]


def config_for_preset(name: str, overrides: list[str] = ()) -> RunConfig:
    """The preset's configuration with `key=value` overrides applied (see `apply_override`)."""
    preset = get_preset(name)
    config = RunConfig(preset=name, model=dataclasses.replace(preset.model), train=dataclasses.replace(preset.train))
    for item in overrides:
        apply_override(config, item)
    config.validate()
    return config


# ------------------------------------------------------------------------------------------------------ --set
def _sections(config: RunConfig) -> dict[str, Any]:
    return {"model": config.model, "train": config.train, "data": config.data}


def apply_override(config: RunConfig, item: str) -> None:
    """Apply one `key=value` (or `section.key=value`) to `config`, converting `value` to the field's type.

    A bare key is looked up in the model, train and data sections; it must name exactly one field.
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set n_hidden=300")
    key, value = item.split("=", 1)
    key = key.strip()
    sections = _sections(config)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"--set {item!r}: unknown section {section!r}; use model, train or data")
        owners = [section] if name in _field_types(sections[section]) else []
    else:
        name = key
        owners = [s for s, obj in sections.items() if name in _field_types(obj)]
    if not owners:
        raise ConfigError(f"--set {item!r}: unknown key {key!r}; valid keys: {', '.join(config_keys(config))}")
    if len(owners) > 1:
        raise ConfigError(f"--set {item!r}: {name!r} is ambiguous; write {' or '.join(o + '.' + name for o in owners)}")
    _assign(sections[owners[0]], owners[0], name, _parse_text(value))


def config_keys(config: RunConfig | None = None) -> list[str]:
    """Every `section.key` that `--set` accepts, sorted."""
    sections = _sections(config or RunConfig())
    return sorted(f"{s}.{n}" for s, obj in sections.items() for n in _field_types(obj))


def _field_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _parse_text(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false/null), else the plain string."""
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text.lower() if text.lower() in ("true", "false") else text)
    except json.JSONDecodeError:
        return text


def _assign(obj: Any, section: str, name: str, value: Any) -> None:
    types_ = _field_types(obj)
    if name not in types_:
        raise ConfigError(f"unknown key {section}.{name}; valid keys: {', '.join(sorted(types_))}")
    setattr(obj, name, _coerce(value, types_[name], f"{section}.{name}"))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert `value` to `annotation` (int, float, bool, str or an Optional of those), or raise ConfigError."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where} cannot be empty (null)")
    for kind in options:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    expected = " or ".join(getattr(kind, "__name__", str(kind)) for kind in options)
    raise ConfigError(f"{where}={value!r} has the wrong type: expected {expected}")
