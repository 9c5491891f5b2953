"""Typed, frozen configuration for every component, mapped strictly from YAML.

Each component gets only its own section (``MemoryConfig`` never sees the training section). Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` naming the dotted path of the culprit, e.g.
``model.memory.slots: must be >= 1, got 0``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message starts with the dotted path of the culprit."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class MemoryConfig:
    """LRUA external memory (paper section 3.2)."""

    slots: int = 128
    width: int = 40
    read_heads: int = 4
    gamma: float = 0.95
    # Paper Eq. 8 writes the key k_t; "add" emits a separate add vector (a common port variant).
    write_content: Literal["key", "add"] = "key"
    # Paper: at step t the write (Eq. 7-8) happens first and the read (Eq. 2-4) uses M_t. False reads M_{t-1}.
    read_after_write: bool = True
    # Paper: "prior to writing to memory, the least used memory location is computed from w_u_{t-1} and is set
    # to zero". False keeps the row and only adds to it.
    zero_least_used: bool = True
    # Paper Eq. 3 has no key strength (softmax of raw cosines); "learned" adds an NTM-style softplus strength.
    key_strength: Literal["none", "learned"] = "none"
    init_value: float = 1e-6

    def __post_init__(self) -> None:
        _check(self.slots >= 1, f"slots: must be >= 1, got {self.slots}")
        _check(self.width >= 1, f"width: must be >= 1, got {self.width}")
        _check(self.read_heads >= 1, f"read_heads: must be >= 1, got {self.read_heads}")
        _check(
            self.read_heads <= self.slots,
            f"read_heads: must be <= slots ({self.slots}), got {self.read_heads}",
        )
        _check(0.0 < self.gamma <= 1.0, f"gamma: must be in (0, 1], got {self.gamma}")
        _check(self.init_value >= 0.0, f"init_value: must be >= 0, got {self.init_value}")


@dataclass(frozen=True)
class ControllerConfig:
    kind: Literal["lstm", "feedforward"] = "lstm"
    hidden: int = 200

    def __post_init__(self) -> None:
        _check(self.hidden >= 1, f"hidden: must be >= 1, got {self.hidden}")


@dataclass(frozen=True)
class ModelConfig:
    """``kind: mann`` is controller + LRUA memory; ``lstm`` and ``feedforward`` are the paper's baselines
    (the controller alone, no memory)."""

    kind: Literal["mann", "lstm", "feedforward"] = "mann"
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # Use the fused memory step (same math, hand-written backward) where it applies; false: the readable path.
    fused_memory: bool = True

    def __post_init__(self) -> None:
        if self.kind in ("lstm", "feedforward"):
            _check(
                self.controller.kind == self.kind,
                f"controller.kind: the '{self.kind}' baseline needs controller.kind '{self.kind}', "
                f"got '{self.controller.kind}'",
            )


@dataclass(frozen=True)
class DataConfig:
    """Where Omniglot lives and how it is preprocessed and split."""

    # None: the MANN_DATA_DIR environment variable.
    data_dir: str | None = None
    # None: MANN_CACHE_DIR, else ~/.cache/mann-search.
    cache_dir: str | None = None
    image_size: int = 20
    # Paper: 1200 training and 423 test characters out of all 1623 (both zips pooled).
    train_characters: int = 1200
    # Carved out of the training characters, for model selection; the test characters stay untouched.
    val_characters: int = 100
    split_seed: int = 0
    # 90/180/270-degree rotations of training characters as extra classes.
    rotations: bool = True
    # Random translation of training images by up to this many pixels (after resizing).
    max_shift: int = 1
    # Check the standard counts (964 + 659 characters x 20 drawers); off only for test fixtures.
    verify_counts: bool = True

    def __post_init__(self) -> None:
        _check(4 <= self.image_size <= 105, f"image_size: must be in [4, 105], got {self.image_size}")
        _check(self.train_characters >= 1, f"train_characters: must be >= 1, got {self.train_characters}")
        _check(self.val_characters >= 0, f"val_characters: must be >= 0, got {self.val_characters}")
        _check(
            self.val_characters < self.train_characters,
            f"val_characters: must be < train_characters ({self.train_characters}), got {self.val_characters}",
        )
        _check(
            0 <= self.max_shift < self.image_size // 2,
            f"max_shift: must be in [0, {self.image_size // 2}), got {self.max_shift}",
        )

    def resolved_data_dir(self) -> Path:
        raw = self.data_dir or os.environ.get("MANN_DATA_DIR")
        if not raw:
            raise ConfigError(
                "data.data_dir: not set; set it in the config, with --set data.data_dir=DIR, "
                "or with the MANN_DATA_DIR environment variable"
            )
        return Path(raw).expanduser()

    def resolved_cache_dir(self) -> Path:
        raw = self.cache_dir or os.environ.get("MANN_CACHE_DIR")
        return Path(raw).expanduser() if raw else Path.home() / ".cache" / "mann-search"


@dataclass(frozen=True)
class TaskConfig:
    """One episode: ``classes`` classes x ``instances`` instances each, shuffled."""

    classes: int = 5
    instances: int = 10
    # "onehot": classes-way one-hot labels; "string": the paper's five 5-way characters (25 dims, 3125 labels).
    labels: Literal["onehot", "string"] = "onehot"

    def __post_init__(self) -> None:
        _check(self.classes >= 2, f"classes: must be >= 2, got {self.classes}")
        _check(self.instances >= 1, f"instances: must be >= 1, got {self.instances}")
        _check(
            self.instances <= 20,
            f"instances: Omniglot has 20 drawers per character, so at most 20, got {self.instances}",
        )
        if self.labels == "string":
            _check(self.classes <= 3125, f"classes: string labels allow at most 3125, got {self.classes}")

    @property
    def steps(self) -> int:
        return self.classes * self.instances


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 16
    # Training budget in episodes (one batch holds batch_size episodes).
    episodes: int = 100_000
    optimizer: Literal["adam", "rmsprop"] = "adam"
    lr: float = 1e-3
    # Step schedule: the learning rate is multiplied by lr_decay at each of these episode counts (ascending),
    # e.g. [800000] with 0.1 trains at lr until 800k episodes and at lr/10 after. Empty: a constant lr.
    lr_milestones: list[int] = field(default_factory=list)
    lr_decay: float = 0.1
    # Paper's RMSprop momentum 0.9, decay 0.95 ("alpha" in torch).
    momentum: float = 0.9
    rmsprop_decay: float = 0.95
    grad_clip: float | None = 10.0
    # Evaluate on fixed validation episodes every this many training episodes.
    eval_every: int = 2000
    eval_episodes: int = 320
    eval_seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads; None leaves torch's default.
    threads: int | None = None
    # Draw the next training batch on a background thread while the current step runs (the same episodes).
    # Off by default: on a 2-core CPU it gained 1.02-1.04x on 1 thread and lost (0.78x) on 2, where the sampling
    # thread competes with torch's; meant for GPUs, where sampling is CPU work beside the device (not measured).
    prefetch: bool = False

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        _check(self.episodes >= 1, f"episodes: must be >= 1, got {self.episodes}")
        _check(self.lr > 0, f"lr: must be > 0, got {self.lr}")
        for i, m in enumerate(self.lr_milestones):
            _check(m >= 1, f"lr_milestones[{i}]: must be >= 1, got {m}")
            _check(i == 0 or m > self.lr_milestones[i - 1], f"lr_milestones[{i}]: must be ascending, got {m}")
        _check(0 < self.lr_decay <= 1, f"lr_decay: must be in (0, 1], got {self.lr_decay}")
        _check(0 <= self.momentum < 1, f"momentum: must be in [0, 1), got {self.momentum}")
        _check(0 < self.rmsprop_decay < 1, f"rmsprop_decay: must be in (0, 1), got {self.rmsprop_decay}")
        _check(
            self.grad_clip is None or self.grad_clip > 0, f"grad_clip: must be > 0 or null, got {self.grad_clip}"
        )
        _check(self.eval_every >= 1, f"eval_every: must be >= 1, got {self.eval_every}")
        _check(self.eval_episodes >= 1, f"eval_episodes: must be >= 1, got {self.eval_episodes}")
        _check(self.threads is None or self.threads >= 1, f"threads: must be >= 1 or null, got {self.threads}")

    def lr_at(self, episodes: int) -> float:
        """Learning rate for a step taken after ``episodes`` training episodes (the step schedule)."""
        return self.lr * self.lr_decay ** sum(1 for m in self.lr_milestones if episodes >= m)


@dataclass(frozen=True)
class TrainConfig:
    """The whole tree of one training run (``configs/mann/*.yaml``)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.data.verify_counts:
            _check(
                self.data.train_characters <= 1622,
                f"data.train_characters: must leave test characters out of 1623, got {self.data.train_characters}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Strict mapping from plain data (YAML) to the dataclasses above.


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{path}: keys must be strings, got {k!r}")
            out[k] = _coerce(item, v, f"{path}.{k}")
        return out
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)  # PyYAML reads 1e-3 (no dot) as a string (YAML 1.1)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a programming error, not user input


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by dotted path."""
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown config key (known under {where}: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", yaml-parsed value)``."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: list[tuple[str, Any]], cls: type | None = None) -> dict:
    """Set dotted keys in a nested dict (copying it). With ``cls``, a path that the schema lacks is an error."""
    tree = _deep_copy(tree)
    for key, value in overrides:
        parts = key.split(".")
        node = tree
        schema = cls
        for i, part in enumerate(parts):
            if schema is not None:
                names = {f.name: f for f in dataclasses.fields(schema)}
                if part not in names:
                    where = ".".join(parts[:i]) or "config"
                    raise ConfigError(
                        f"--set {key}: unknown key '{part}' under {where} (known: {', '.join(sorted(names))})"
                    )
                sub = typing.get_type_hints(schema)[part]
                if typing.get_origin(sub) is dict and i < len(parts) - 1:
                    # a mapping keyed by dotted names (e.g. fixed overrides): the rest of the path is one key
                    child = node.setdefault(part, {})
                    if not isinstance(child, dict):
                        raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a mapping")
                    child[".".join(parts[i + 1 :])] = value
                    break
                schema = sub if dataclasses.is_dataclass(sub) else None
                if i < len(parts) - 1 and schema is None:
                    raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            if i == len(parts) - 1:
                node[part] = value
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
                node = child
    return tree


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning I/O and syntax problems into ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (or defaults) + ``--set`` overrides -> validated TrainConfig."""
    tree = read_yaml(path) if path is not None else {}
    parsed = [parse_override(o) for o in overrides or []]
    tree = apply_overrides(tree, parsed, TrainConfig)
    return from_dict(TrainConfig, tree)


def train_config_from_dict(tree: Mapping[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, dict(tree))
