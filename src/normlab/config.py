"""A run's whole configuration (model, training, data) as dataclasses, `--set key=value` overrides, and JSON."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from normlab.errors import ConfigError
from normlab.model import DEFAULT_PRESET, ModelConfig, get_preset
from normlab.train import TrainConfig


@dataclass
class DataConfig:
    """Where the words come from and how they are split."""

    path: str | None = None  # None: the bundled names list
    split_seed: int = 42  # random.Random(split_seed) shuffles the words before the 80/10/10 cut
    sha256: str | None = None  # of the words file, recorded when the run is created and checked on resume


@dataclass
class RunConfig:
    """Everything that defines a run; saved as `config.json` in the run directory."""

    preset: str = DEFAULT_PRESET
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
        """Inverse of `to_dict`, checking every key and type; `ConfigError` names the first bad one."""
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"config.json has unknown key(s) {sorted(unknown)}")
        config = cls(preset=str(raw.get("preset", DEFAULT_PRESET)))
        for section in ("model", "train", "data"):
            values = raw.get(section, {})
            if not isinstance(values, dict):
                raise ConfigError(f"config.json: {section!r} must be a JSON object")
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


def config_for_preset(name: str, overrides: list[str] = ()) -> RunConfig:
    """The preset's configuration with `key=value` overrides applied (see `apply_override`)."""
    preset = get_preset(name)
    config = RunConfig(preset=name, model=dataclasses.replace(preset.model))
    for key, value in preset.train.items():
        setattr(config.train, key, value)
    for item in overrides:
        apply_override(config, item)
    config.validate()
    return config


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
        known = sorted(f"{s}.{n}" for s, obj in sections.items() for n in _field_types(obj))
        raise ConfigError(f"--set {item!r}: unknown key {key!r}; valid keys: {', '.join(known)}")
    if len(owners) > 1:
        raise ConfigError(f"--set {item!r}: {name!r} is ambiguous; write {' or '.join(o + '.' + name for o in owners)}")
    _assign(sections[owners[0]], owners[0], name, _parse_text(value))


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
