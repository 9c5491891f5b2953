"""SearchConfig: what to search, how, with what budget, where results go. Strict, like mann.config."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mann.config import (
    ConfigError,
    TrainConfig,
    _check,
    apply_overrides,
    from_dict,
    parse_override,
    read_yaml,
)

_SCALAR = (str, int, float, bool, type(None))
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_CONSTRAINT = re.compile(r"^\s*([A-Za-z0-9_.+-]+)\s*(<=|<|>=|>)\s*([A-Za-z0-9_.+-]+)\s*$")


@dataclass(frozen=True)
class ParamSpec:
    """One searched setting. ``when`` makes it conditional: ``{other.path: value or [values]}``."""

    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.type == "categorical":
            _check(bool(self.choices), "choices: a categorical parameter needs a non-empty list of choices")
            for c in self.choices or []:
                _check(isinstance(c, _SCALAR), f"choices: must be scalars (str, number, bool, null), got {c!r}")
            _check(len({repr(c) for c in self.choices}) == len(self.choices), "choices: must be distinct")
            _check(self.low is None and self.high is None and self.step is None and not self.log,
                   "low: categorical parameters take only choices")
            return
        _check(self.choices is None, "choices: only categorical parameters take choices")
        _check(self.low is not None, f"low: required for a {self.type} parameter")
        _check(self.high is not None, f"high: required for a {self.type} parameter")
        if self.type == "int":
            for name in ("low", "high", "step"):
                v = getattr(self, name)
                _check(v is None or float(v).is_integer(), f"{name}: must be an integer, got {v}")
        _check(self.low <= self.high, f"low: must be <= high ({self.high}), got {self.low}")
        if self.type == "float":
            _check(self.low < self.high, f"low: must be < high ({self.high}) for a float, got {self.low}")
        _check(not self.log or self.low > 0, f"low: must be > 0 with log: true, got {self.low}")
        _check(self.step is None or self.step > 0, f"step: must be > 0, got {self.step}")
        _check(not (self.log and self.step is not None), "step: cannot be combined with log: true")


@dataclass(frozen=True)
class Objective:
    metric: str = "val/acc_2plus"
    mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class SamplerConfig:
    kind: Literal["tpe", "cmaes", "random", "qmc", "nsga2"] = "tpe"
    seed: int = 0
    # Random trials before the model-based sampler takes over (TPE, CMA-ES).
    n_startup_trials: int = 4

    def __post_init__(self) -> None:
        _check(self.n_startup_trials >= 0, f"n_startup_trials: must be >= 0, got {self.n_startup_trials}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Early stopping on the primary objective; budgets in training episodes."""

    kind: Literal["asha", "median", "none"] = "asha"
    # No trial is stopped before this many episodes (MANN sits at chance for a while before it clicks).
    grace_episodes: int = 4000
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        _check(self.grace_episodes >= 1, f"grace_episodes: must be >= 1, got {self.grace_episodes}")
        _check(self.reduction_factor >= 2, f"reduction_factor: must be >= 2, got {self.reduction_factor}")


@dataclass(frozen=True)
class BudgetConfig:
    num_samples: int = 12
    max_concurrent: int | None = None
    time_budget_s: float | None = None
    # Retries of a failed trial (from its last checkpoint).
    max_failures: int = 2

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, f"num_samples: must be >= 1, got {self.num_samples}")
        _check(self.max_concurrent is None or self.max_concurrent >= 1,
               f"max_concurrent: must be >= 1 or null, got {self.max_concurrent}")
        _check(self.time_budget_s is None or self.time_budget_s > 0,
               f"time_budget_s: must be > 0 or null, got {self.time_budget_s}")
        _check(self.max_failures >= 0, f"max_failures: must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class ResourcesConfig:
    cpus_per_trial: float = 1.0
    # Fractions share a GPU between trials (e.g. 0.25: four trials per GPU).
    gpus_per_trial: float = 0.0

    def __post_init__(self) -> None:
        _check(self.cpus_per_trial > 0, f"cpus_per_trial: must be > 0, got {self.cpus_per_trial}")
        _check(self.gpus_per_trial >= 0, f"gpus_per_trial: must be >= 0, got {self.gpus_per_trial}")
        _check(self.gpus_per_trial <= 1 or float(self.gpus_per_trial).is_integer(),
               f"gpus_per_trial: above 1 must be a whole number, got {self.gpus_per_trial}")


@dataclass(frozen=True)
class MlflowConfig:
    # None: MLFLOW_TRACKING_URI, else an embedded SQLite store in the storage folder.
    tracking_uri: str | None = None
    experiment: str = "mann-search"
    registered_model: str = "mann"

    def __post_init__(self) -> None:
        _check(bool(self.experiment.strip()), "experiment: must not be empty")
        _check(bool(re.match(r"^[A-Za-z0-9_.-]+$", self.registered_model)),
               f"registered_model: letters, digits, '_', '-', '.' only, got {self.registered_model!r}")


@dataclass(frozen=True)
class SelectionConfig:
    enabled: bool = True
    top_k: int = 3
    test_episodes: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, f"top_k: must be >= 1, got {self.top_k}")
        _check(self.test_episodes >= 1, f"test_episodes: must be >= 1, got {self.test_episodes}")


@dataclass(frozen=True)
class SearchConfig:
    name: str
    # The MANN config every trial starts from (relative paths: to this search config's folder, else the cwd).
    base: str
    space: dict[str, ParamSpec]
    # Fixed settings applied to the base before the sampled ones, by dotted path.
    overrides: dict[str, Any] = field(default_factory=dict)
    # "a <= b" between searched or fixed settings, applied while sampling (define-by-run).
    constraints: list[str] = field(default_factory=list)
    # The first is primary (scheduler, selection); more than one makes a multi-objective search.
    objectives: list[Objective] = field(default_factory=lambda: [Objective()])
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # Results and checkpoints: a local folder, shared storage or s3://. None: MANN_SEARCH_STORAGE, else
    # ./runs/search.
    storage: str | None = None
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def __post_init__(self) -> None:
        _check(bool(re.match(r"^[A-Za-z0-9_.-]+$", self.name)),
               f"name: letters, digits, '_', '-', '.' only, got {self.name!r}")
        _check(bool(self.space), "space: at least one parameter to search")
        for path in self.space:
            _check(bool(_PATH.match(path)), f"space.{path}: not a dotted settings path")
        _check(bool(self.objectives), "objectives: at least one")
        if len(self.objectives) > 1:
            _check(self.sampler.kind != "cmaes", "sampler.kind: cmaes cannot do a multi-objective search")
            _check(self.scheduler.kind == "none",
                   "scheduler.kind: early stopping needs a single objective; use 'none' for a multi-objective search")

    @property
    def primary(self) -> Objective:
        return self.objectives[0]

    def resolved_storage(self) -> str:
        raw = self.storage or os.environ.get("MANN_SEARCH_STORAGE") or "runs/search"
        if "://" in raw:
            return raw
        return str(Path(raw).expanduser().resolve())


@dataclass(frozen=True)
class Constraint:
    left: str | float
    op: str
    right: str | float

    def refs(self) -> list[str]:
        return [x for x in (self.left, self.right) if isinstance(x, str)]


def parse_constraint(text: str, where: str) -> Constraint:
    m = _CONSTRAINT.match(text)
    if not m:
        raise ConfigError(f"{where}: expected 'a.path <= b.path' (or <, >=, >), got {text!r}")

    def side(s: str) -> str | float:
        try:
            return float(s)
        except ValueError:
            if not _PATH.match(s):
                raise ConfigError(f"{where}: {s!r} is neither a number nor a dotted settings path") from None
            return s

    c = Constraint(side(m.group(1)), m.group(2), side(m.group(3)))
    if not c.refs():
        raise ConfigError(f"{where}: compares two numbers; name at least one setting")
    return c


@dataclass(frozen=True)
class LoadedSearch:
    """A validated search: the config, the base MANN tree (fixed overrides applied) and parsed constraints."""

    config: SearchConfig
    base_tree: dict[str, Any]
    constraints: tuple[Constraint, ...]
    source: str  # the search config file


_MISSING = object()


def base_value(tree: dict[str, Any], path: str) -> Any:
    """The value of a dotted path in the base tree, else TrainConfig's default; KeyError if no such setting."""
    default: Any = TrainConfig().to_dict()
    node: Any = tree
    for part in path.split("."):
        if not isinstance(default, dict) or part not in default:
            raise KeyError(path)
        default = default[part]
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    return default if node is _MISSING else node


def load_search_config(path: str | Path, overrides: list[str] | None = None) -> LoadedSearch:
    """Read, override and validate a search config and everything it refers to."""
    path = Path(path)
    tree = read_yaml(path)
    parsed = [parse_override(o) for o in overrides or []]
    tree = apply_overrides(tree, parsed, SearchConfig)
    for required in ("name", "base", "space"):
        if required not in tree:
            raise ConfigError(f"{required}: required in a search config ({path})")
    cfg = from_dict(SearchConfig, tree)

    base_path = Path(cfg.base)
    if not base_path.is_absolute():
        beside = path.parent / base_path
        base_path = beside if beside.exists() else Path.cwd() / base_path
    try:
        base_tree = read_yaml(base_path)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}") from None
    fixed = []
    for key, value in cfg.overrides.items():
        if not _PATH.match(key):
            raise ConfigError(f"overrides.{key}: not a dotted settings path")
        fixed.append((key, value))
    try:
        base_tree = apply_overrides(base_tree, fixed, TrainConfig)
        from_dict(TrainConfig, base_tree)
    except ConfigError as exc:
        raise ConfigError(f"base ({base_path}) with overrides: {str(exc).replace('--set ', 'overrides.')}") from None

    _validate_space(cfg, base_tree)
    constraints = tuple(parse_constraint(c, f"constraints[{i}]") for i, c in enumerate(cfg.constraints))
    order = list(cfg.space)
    for i, c in enumerate(constraints):
        for ref in c.refs():
            try:
                base_value(base_tree, ref)
            except KeyError:
                raise ConfigError(f"constraints[{i}]: {ref!r} is not a MANN setting") from None
        searched = [r for r in c.refs() if r in cfg.space]
        if not searched:
            _check_fixed_constraint(c, base_tree, i)
    for p, spec in cfg.space.items():
        for ref in (spec.when or {}):
            if ref not in cfg.space and not _exists(base_tree, ref):
                raise ConfigError(f"space.{p}.when: {ref!r} is not a MANN setting")
            if ref in cfg.space and order.index(ref) > order.index(p):
                raise ConfigError(f"space.{p}.when: {ref!r} must come before {p!r} in the space")
    return LoadedSearch(cfg, base_tree, constraints, str(path))


def _exists(tree: dict[str, Any], path: str) -> bool:
    try:
        base_value(tree, path)
        return True
    except KeyError:
        return False


def _check_fixed_constraint(c: Constraint, tree: dict[str, Any], i: int) -> None:
    left = base_value(tree, c.left) if isinstance(c.left, str) else c.left
    right = base_value(tree, c.right) if isinstance(c.right, str) else c.right
    if not compare(left, c.op, right):
        raise ConfigError(f"constraints[{i}]: does not hold for the fixed values ({left} {c.op} {right} is false)")


def compare(a: Any, op: str, b: Any) -> bool:
    return {"<=": a <= b, "<": a < b, ">=": a >= b, ">": a > b}[op]


def _validate_space(cfg: SearchConfig, base_tree: dict[str, Any]) -> None:
    """Every searched path is a MANN setting, and each extreme value is valid for that setting."""
    for p, spec in cfg.space.items():
        if not _exists(base_tree, p) or isinstance(base_value(base_tree, p), dict):
            raise ConfigError(f"space.{p}: not a MANN setting (a leaf of configs/mann/*.yaml)")
        values = spec.choices if spec.type == "categorical" else [spec.low, spec.high]
        names = [f"choices[{i}]" for i in range(len(values))] if spec.type == "categorical" else ["low", "high"]
        for name, v in zip(names, values):
            if spec.type == "int":
                v = int(v)
            try:
                from_dict(TrainConfig, apply_overrides(base_tree, [(p, v)]))
            except ConfigError as exc:
                msg = str(exc)
                # Only errors about this very setting; combinations are the constraints' business.
                if msg.startswith(f"{p}:"):
                    raise ConfigError(f"space.{p}.{name}: {msg[len(p) + 2:]}") from None
