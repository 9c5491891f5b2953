"""Typed, frozen configuration for every component, mapped strictly from YAML (pydantic v2 models).

Each component gets only its own section (``MemoryConfig`` never sees the training section). Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` naming the dotted path of the culprit, e.g.
``model.memory.slots: must be >= 1, got 0``: :func:`from_dict` turns pydantic's errors into that one line.
"""

from __future__ import annotations

import math
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration value is wrong; the message starts with the dotted path of the culprit, which ``path``
    holds (None where no single setting is to blame), so callers never match on the message's text.
    ``detail`` is the message without the path."""

    def __init__(self, message: str, path: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.path = path
        self.detail = detail if detail is not None else message


class RuleError(ValueError):
    """A cross-field rule of a section broken (see :func:`require`): ``field`` names the setting."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


def _yaml_float(value: Any) -> Any:
    """PyYAML reads ``1e-3`` (no dot) as a string (YAML 1.1): accept numeric strings; refuse nan and inf before
    any bound is compared with them."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return value
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    return value


# A finite number (an integer is fine too); numeric strings from YAML 1.1 are read as numbers.
Number = Annotated[float, BeforeValidator(_yaml_float)]


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys forbidden, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")


def require(cond: bool, msg: str) -> None:
    """A cross-field rule of a section; ``msg`` is ``"<field>: <what is wrong>"``."""
    if not cond:
        field, _, detail = msg.partition(": ")
        raise RuleError(field, detail)


class MemoryConfig(Section):
    """LRUA external memory (paper section 3.2)."""

    slots: int = Field(128, ge=1)
    width: int = Field(40, ge=1)
    read_heads: int = Field(4, ge=1)
    gamma: Number = Field(0.95, gt=0, le=1)
    # Paper Eq. 8 writes the key k_t; "add" emits a separate add vector (a common port variant).
    write_content: Literal["key", "add"] = "key"
    # Paper: at step t the write (Eq. 7-8) happens first and the read (Eq. 2-4) uses M_t. False reads M_{t-1}.
    read_after_write: bool = True
    # Paper: "prior to writing to memory, the least used memory location is computed from w_u_{t-1} and is set
    # to zero". False keeps the row and only adds to it.
    zero_least_used: bool = True
    # Paper Eq. 3 has no key strength (softmax of raw cosines); "learned" adds an NTM-style softplus strength.
    key_strength: Literal["none", "learned"] = "none"
    init_value: Number = Field(1e-6, ge=0)

    @model_validator(mode="after")
    def _heads_fit(self) -> "MemoryConfig":
        require(self.read_heads <= self.slots, f"read_heads: must be <= slots ({self.slots}), got {self.read_heads}")
        return self


class ControllerConfig(Section):
    kind: Literal["lstm", "feedforward"] = "lstm"
    hidden: int = Field(200, ge=1)


class ModelConfig(Section):
    """``kind: mann`` is controller + LRUA memory; ``lstm`` and ``feedforward`` are the paper's baselines
    (the controller alone, no memory)."""

    kind: Literal["mann", "lstm", "feedforward"] = "mann"
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    # Use the fused memory step (same math, hand-written backward) where it applies; false: the readable path.
    fused_memory: bool = True

    @model_validator(mode="after")
    def _baseline_controller(self) -> "ModelConfig":
        if self.kind in ("lstm", "feedforward"):
            require(self.controller.kind == self.kind,
                    f"controller.kind: the '{self.kind}' baseline needs controller.kind '{self.kind}', "
                    f"got '{self.controller.kind}'")
        return self


class DataConfig(Section):
    """Where Omniglot lives and how it is preprocessed and split."""

    # None: the MANN_DATA_DIR environment variable.
    data_dir: str | None = None
    # None: MANN_CACHE_DIR, else ~/.cache/mann-search.
    cache_dir: str | None = None
    image_size: int = Field(20, ge=4, le=105)
    # Paper: 1200 training and 423 test characters out of all 1623 (both zips pooled).
    train_characters: int = Field(1200, ge=1)
    # Carved out of the training characters; every evaluation during training (and so every search objective)
    # is measured on them, never on the test characters, which stay for the final score. Training needs >= 1.
    val_characters: int = Field(100, ge=0)
    split_seed: int = 0
    # 90/180/270-degree rotations of training characters as extra classes.
    rotations: bool = True
    # Random translation of training images by up to this many pixels (after resizing).
    max_shift: int = 1
    # Check the standard counts (964 + 659 characters x 20 drawers); off only for test fixtures.
    verify_counts: bool = True

    @model_validator(mode="after")
    def _split_fits(self) -> "DataConfig":
        require(self.val_characters < self.train_characters,
                f"val_characters: must be < train_characters ({self.train_characters}), got {self.val_characters}")
        require(0 <= self.max_shift < self.image_size // 2,
                f"max_shift: must be in [0, {self.image_size // 2}), got {self.max_shift}")
        return self

    @property
    def data_dir_origin(self) -> str:
        """Where the data directory was set, as a user would change it: ``data.data_dir`` or ``MANN_DATA_DIR``."""
        return "data.data_dir" if self.data_dir else "MANN_DATA_DIR"

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


class TaskConfig(Section):
    """One episode of ``length`` steps over ``classes`` classes.

    ``sampling: balanced`` (the default) shows every class exactly ``instances`` times in a random order, so an
    episode has ``classes * instances`` steps. ``sampling: random`` is the paper's 15-class string set-up as its
    only public port (snowkylin/ntm) runs it: ``steps`` steps, each step's class drawn uniformly with replacement
    among the episode's ``classes`` classes, so a class may appear fewer or more than ``instances`` times (or not
    at all). ``instances`` is then the number of instance columns reported (accuracy at the 1st..K-th
    appearance); later appearances are trained on but not scored.
    """

    classes: int = Field(5, ge=2)
    instances: int = Field(10, ge=1)
    # "onehot": classes-way one-hot labels; "string": the paper's five 5-way characters (25 dims, 3125 labels).
    labels: Literal["onehot", "string"] = "onehot"
    sampling: Literal["balanced", "random"] = "balanced"
    # Steps per episode; None: classes * instances (the only length balanced sampling allows).
    steps: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _fits_omniglot(self) -> "TaskConfig":
        require(self.instances <= 20,
                f"instances: Omniglot has 20 drawers per character, so at most 20, got {self.instances}")
        if self.labels == "string":
            require(self.classes <= 3125, f"classes: string labels allow at most 3125, got {self.classes}")
        if self.sampling == "balanced" and self.steps is not None:
            require(self.steps == self.classes * self.instances,
                    f"steps: balanced sampling has classes * instances = {self.classes * self.instances} steps, "
                    f"got {self.steps} (set sampling: random for another length)")
        return self

    @property
    def length(self) -> int:
        """Steps per episode."""
        return self.steps if self.steps is not None else self.classes * self.instances


class OptimConfig(Section):
    batch_size: int = Field(16, ge=1)
    # Training budget in episodes (one batch holds batch_size episodes).
    episodes: int = Field(100_000, ge=1)
    optimizer: Literal["adam", "rmsprop"] = "adam"
    lr: Number = Field(1e-3, gt=0)
    # Step schedule: the learning rate is multiplied by lr_decay at each of these episode counts (ascending),
    # e.g. [800000] with 0.1 trains at lr until 800k episodes and at lr/10 after. Empty: a constant lr.
    lr_milestones: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    lr_decay: Number = Field(0.1, gt=0, le=1)
    # Paper's RMSprop momentum 0.9, decay 0.95 ("alpha" in torch).
    momentum: Number = Field(0.9, ge=0, lt=1)
    rmsprop_decay: Number = Field(0.95, gt=0, lt=1)
    grad_clip: Number | None = Field(10.0, gt=0)
    # String labels: the training loss per step is the mean ("mean") or the sum ("sum", the paper's wording) of
    # the five characters' cross-entropies; both are averaged over steps and episodes. Adam is invariant to the
    # scale of the loss, so the two differ only where grad_clip cuts (sum's gradient is 5x mean's) and in RMSprop
    # and Adam's epsilon. Ignored for one-hot labels.
    string_loss: Literal["mean", "sum"] = "mean"
    # Evaluate on fixed validation episodes every this many training episodes.
    eval_every: int = Field(2000, ge=1)
    eval_episodes: int = Field(320, ge=1)
    eval_seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads; None leaves torch's default.
    threads: int | None = Field(None, ge=1)
    # Draw the next training batch on a background thread while the current step runs (the same episodes).
    # Off by default: on a 2-core CPU it gained 1.02-1.04x on 1 thread and lost (0.78x) on 2, where the sampling
    # thread competes with torch's; meant for GPUs, where sampling is CPU work beside the device (not measured).
    prefetch: bool = False

    @model_validator(mode="after")
    def _ascending(self) -> "OptimConfig":
        for i, m in enumerate(self.lr_milestones[1:], 1):
            require(m > self.lr_milestones[i - 1], f"lr_milestones[{i}]: must be ascending, got {m}")
        return self

    def lr_at(self, episodes: int) -> float:
        """Learning rate for a step taken after ``episodes`` training episodes (the step schedule)."""
        return self.lr * self.lr_decay ** sum(1 for m in self.lr_milestones if episodes >= m)


class TrainConfig(Section):
    """The whole tree of one training run (``configs/mann/*.yaml``)."""

    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: OptimConfig = Field(default_factory=OptimConfig)

    @model_validator(mode="after")
    def _leaves_test_characters(self) -> "TrainConfig":
        if self.data.verify_counts:
            require(self.data.train_characters <= 1622,
                    f"data.train_characters: must leave test characters out of 1623, got "
                    f"{self.data.train_characters}")
        return self


# ---------------------------------------------------------------------------------------------------------------
# YAML -> models, with pydantic's errors as one line naming the dotted path.


def _fields(cls: Any) -> dict[str, Any] | None:
    return cls.model_fields if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> X."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _unwrap(args[0]) if len(args) == 1 else tp
    return tp


def _walk(cls: Any, loc: tuple) -> tuple[Any, Any]:
    """The type found at ``loc`` under ``cls`` and, if the last part is a model field, its FieldInfo."""
    node, info = cls, None
    for part in loc:
        fields = _fields(node)
        if fields is not None and isinstance(part, str) and part in fields:
            info = fields[part]
            node = _unwrap(info.annotation)
        elif typing.get_origin(node) in (list, dict) and typing.get_args(node):
            node, info = _unwrap(typing.get_args(node)[-1]), None
        else:
            return Any, None
    return node, info


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _num(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _range(info: Any) -> str | None:
    """``(0, 1]`` from a field's two bounds, or None when it has at most one."""
    b = {type(m).__name__: m for m in getattr(info, "metadata", [])}
    lo = f"[{_num(b['Ge'].ge)}" if "Ge" in b else f"({_num(b['Gt'].gt)}" if "Gt" in b else None
    hi = f"{_num(b['Le'].le)}]" if "Le" in b else f"{_num(b['Lt'].lt)})" if "Lt" in b else None
    return f"{lo}, {hi}" if lo and hi else None


_TYPE_WORDS = {
    "int_type": "expected an integer", "int_parsing": "expected an integer", "int_from_float": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "finite_number": "expected a finite number", "bool_type": "expected true or false",
    "bool_parsing": "expected true or false", "string_type": "expected a string", "list_type": "expected a list",
    "tuple_type": "expected a list",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _message(cls: type, err: dict[str, Any]) -> tuple[str, str]:
    """The culprit's dotted path (within ``cls``) and what is wrong with it, from pydantic's ``loc`` and type."""
    loc, kind, value, ctx = tuple(err["loc"]), err["type"], err.get("input"), err.get("ctx") or {}
    path = _dotted(loc)
    if kind == "extra_forbidden":
        node, _ = _walk(cls, loc[:-1])
        known = ", ".join(sorted(_fields(node) or {}))
        return path, f"unknown config key (known under {_dotted(loc[:-1]) or 'config'}: {known})"
    if kind in ("value_error", "assertion_error"):
        error = ctx.get("error")
        if isinstance(error, RuleError):
            return f"{path}.{error.field}" if path else error.field, error.detail
        return path, str(error or err["msg"])
    if kind in _TYPE_WORDS:
        return path, f"{_TYPE_WORDS[kind]}, got {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path or "config", f"expected a mapping, got {type(value).__name__} {value!r}"
    if kind == "literal_error":
        allowed = ", ".join(str(ctx.get("expected", "")).replace(" or ", ", ").split(", "))
        return path, f"must be one of {allowed}, got {value!r}"
    if kind in _BOUNDS:
        span = _range(_walk(cls, loc)[1])
        if span:
            return path, f"must be in {span}, got {value!r}"
        bound = next(iter(ctx.values()), "?")
        return path, f"must be {_BOUNDS[kind]} {_num(bound)}, got {value!r}"
    if kind == "string_pattern_mismatch":
        return path, f"must match {ctx.get('pattern')}, got {value!r}"
    if kind == "missing":
        return path, "required"
    return path, f"{err['msg']}, got {value!r}"


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build config model ``cls`` from plain data (YAML), naming the culprit's dotted path in a ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} {data!r}",
                          path or None, f"expected a mapping, got {type(data).__name__} {data!r}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        where, detail = _message(cls, exc.errors(include_url=False)[0])
        full = ".".join(p for p in (path, where) if p)
        raise ConfigError(f"{full}: {detail}" if full else detail, full or None, detail) from None


def replace(obj: Section, **changes: Any) -> Any:
    """A copy of a config with some fields changed, validated again (frozen models are never edited)."""
    tree = obj.to_dict()
    tree.update({k: v.to_dict() if isinstance(v, Section) else v for k, v in changes.items()})
    return from_dict(type(obj), tree)


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


def _section_at(cls: type | None, parts: list[str]) -> bool:
    """Whether the dotted path ``parts`` names a section (a typed config class) of the schema ``cls``."""
    schema = cls
    for part in parts:
        names = _fields(schema) if schema is not None else None
        if not names or part not in names:
            return False
        schema = _unwrap(names[part].annotation)
    return _fields(schema) is not None


def _expand(key: str, value: Any, cls: type | None) -> list[tuple[str, Any]]:
    """A mapping given for a whole section (``train={episodes: 5}``, or ``overrides: {train: {episodes: 5}}``)
    sets the keys it names and keeps the section's others, as their dotted paths would; a section is never
    replaced wholesale (that reset every setting the mapping left out to its default, silently)."""
    if isinstance(value, dict) and cls is not None and _section_at(cls, key.split(".")):
        return [pair for k, v in value.items() for pair in _expand(f"{key}.{k}", v, cls)]
    return [(key, value)]


def apply_overrides(tree: dict[str, Any], overrides: list[tuple[str, Any]], cls: type | None = None) -> dict:
    """Set dotted keys in a nested dict (copying it). With ``cls``, a path that the schema lacks is an error, and a
    mapping given for a section sets the keys it names (:func:`_expand`)."""
    tree = _deep_copy(tree)
    overrides = [pair for key, value in overrides for pair in _expand(str(key), value, cls)]
    for key, value in overrides:
        parts = key.split(".")
        node = tree
        schema = cls
        for i, part in enumerate(parts):
            if schema is not None:
                names = _fields(schema) or {}
                if part not in names:
                    where = ".".join(parts[:i]) or "config"
                    raise ConfigError(
                        f"--set {key}: unknown key '{part}' under {where} (known: {', '.join(sorted(names))})"
                    )
                sub = _unwrap(names[part].annotation)
                if typing.get_origin(sub) is dict and i < len(parts) - 1:
                    # a mapping keyed by dotted names (e.g. fixed overrides): the rest of the path is one key
                    child = node.setdefault(part, {})
                    if not isinstance(child, dict):
                        raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a mapping")
                    rest = ".".join(parts[i + 1 :])
                    entry = next((k for k in child if isinstance(child[k], dict) and rest.startswith(k + ".")), None)
                    args = typing.get_args(sub)
                    if entry is not None and len(args) == 2 and _fields(_unwrap(args[1])) is not None:
                        # a field of an existing entry (space.model.memory.gamma.low=0.5): set it, keep the rest
                        child[entry] = {**child[entry], rest[len(entry) + 1 :]: value}
                    else:
                        child[rest] = value
                    break
                schema = sub if _fields(sub) is not None else None
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


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key set twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning I/O and syntax problems, and a file with no settings, into ConfigError
    naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: line {exc.line}: {exc.key} is set twice in one mapping (YAML would keep the "
                          f"last one silently); set it once") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if data is None:
        raise ConfigError(f"{path}: empty config file (no settings; a config file must set something)")
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
