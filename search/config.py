"""SearchConfig: what to search, how, with what budget, where results go; loaded and resolved once.

Strict like ``mann.config`` (pydantic models, unknown keys refused, errors name the dotted path).
:func:`load_search_config` reads a search YAML and everything it refers to into a :class:`LoadedSearch`: the
config, the base :class:`~mann.config.TrainConfig` (fixed overrides applied, parsed once) and a digest of the
files it came from, which a :class:`~search.study.Study` snapshots.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mann import metrics
from mann.config import (
    ConfigError,
    Number,
    Section,
    TrainConfig,
    apply_overrides,
    from_dict,
    parse_override,
    read_yaml,
    require,
)
from mann.train import require_validation_split

_SCALAR = (str, int, float, bool, type(None))
_NAME = r"^[A-Za-z0-9_.-]+$"
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_CONSTRAINT = re.compile(r"^\s*([A-Za-z0-9_.+-]+)\s*(<=|<|>=|>)\s*([A-Za-z0-9_.+-]+)\s*$")


def _g(v: Any) -> str:
    """A bound as written: 16, not 16.0 (bounds are parsed as floats)."""
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


class ParamSpec(Section):
    """One searched setting. ``when`` makes it conditional: ``{other.path: value or [values]}``."""

    type: Literal["int", "float", "categorical"]
    low: Number | None = None
    high: Number | None = None
    step: Number | None = None
    log: bool = False
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ParamSpec":
        if self.type == "categorical":
            require(bool(self.choices), "choices: a categorical parameter needs a non-empty list of choices")
            for c in self.choices or []:
                require(isinstance(c, _SCALAR), f"choices: must be scalars (str, number, bool, null), got {c!r}")
            require(len({repr(c) for c in self.choices}) == len(self.choices), "choices: must be distinct")
            require(self.low is None and self.high is None and self.step is None and not self.log,
                    "low: categorical parameters take only choices")
            return self
        require(self.choices is None, "choices: only categorical parameters take choices")
        require(self.low is not None, f"low: required for a {self.type} parameter")
        require(self.high is not None, f"high: required for a {self.type} parameter")
        if self.type == "int":
            for name in ("low", "high", "step"):
                v = getattr(self, name)
                require(v is None or float(v).is_integer(), f"{name}: must be an integer, got {_g(v)}")
        require(self.low <= self.high, f"low: must be <= high ({_g(self.high)}), got {_g(self.low)}")
        if self.type == "float":
            require(self.low < self.high, f"low: must be < high ({_g(self.high)}) for a float, got {_g(self.low)}")
        require(not self.log or self.low > 0, f"low: must be > 0 with log: true, got {_g(self.low)}")
        require(self.step is None or self.step > 0, f"step: must be > 0, got {_g(self.step)}")
        require(not (self.log and self.step is not None), "step: cannot be combined with log: true")
        return self


class Objective(Section):
    metric: str = "val/acc_2plus"
    mode: Literal["max", "min"] = "max"


class SamplerConfig(Section):
    kind: Literal["tpe", "cmaes", "random", "qmc", "nsga2"] = "tpe"
    seed: int = 0
    # Random trials before the model-based sampler takes over (TPE, CMA-ES). Optuna counts finished trials only:
    # under freeze_thaw a paused trial is unfinished (RUNNING), so TPE stays random longer (README, "What TPE
    # sees of a paused trial").
    n_startup_trials: int = Field(4, ge=0)
    # How those first trials are drawn (TPE, CMA-ES): qmc, a scrambled Sobol sequence that spreads them over the
    # space instead of leaving gaps and clumps, so a small region of good configurations is found after fewer
    # trials (the default since 2026-12-08); random, Optuna's own independent draws (before). Under freeze_thaw
    # most of a small study is drawn so (docs/freeze-thaw.md, "An even start"). Unset: qmc for tpe and cmaes;
    # other kinds have no start.
    startup: Literal["random", "qmc"] | None = None
    # TPE: model the running trials (paused ones included) as bad until they end (Optuna's constant liar), so the
    # trials a study holds open repel new samples. Optuna 5's default, set here so an Optuna 4 install (default
    # off) samples the same.
    constant_liar: bool = True

    @property
    def start(self) -> str | None:
        """How the first trials are drawn: ``random`` or ``qmc``; None for a kind without a start."""
        if self.kind not in ("tpe", "cmaes"):
            return None
        return self.startup or "qmc"


class PlateauConfig(Section):
    """Settings of ``scheduler.kind: plateau`` (search/schedulers.py), in the objective's units."""

    # A trial is stopped when even the largest rise seen in the study, in the episodes it has left, would leave
    # it this far below the best value seen.
    margin: float = Field(0.02, ge=0)
    # ... and more than this many times the study's evaluation noise (estimated from its curves; 0: off).
    noise_factor: float = Field(3.0, ge=0)
    # Clicked: this share of the way from the study's plateau to the best value seen.
    click_fraction: float = Field(0.25, gt=0, lt=1)
    # A trial not clicked by episode t is stopped when the completed trials not clicked by t / click_slack (at
    # least min_refs) all ended margin below the best completed one clicked by then (at least min_clicked).
    # 1.5: a trial may click half as late again as the references before it is judged (1.0 stopped the slower
    # seed of top configurations: docs/benchmark.md).
    click_slack: float = Field(1.5, ge=1)
    min_clicked: int = Field(1, ge=1)
    # Also: curves that must span a window before its rises are trusted.
    min_refs: int = Field(2, ge=1)


class FreezeThawConfig(Section):
    """Settings of ``scheduler.kind: freeze_thaw`` (search/schedulers.py: FreezeThawRule): pause and resume,
    never stop. Values in the objective's units."""

    # click_rank: rank trials by when they click (pause the late and the unclicked); index: the chance of ending
    # near the top per episode still needed (the rule before 2026-12-06).
    policy: Literal["click_rank", "index"] = "click_rank"
    # click_rank: a trial not clicked by this quantile of the other clicked trials' click times x wait_slack is
    # paused; a trial that clicks later than the keep_quantile of theirs is paused at its click; before
    # min_clicked trials clicked, an unclicked trial is paused at first_rung x the budget.
    wait_quantile: float = Field(0.9, gt=0, le=1)
    wait_slack: float = Field(1.0, gt=0)
    keep_quantile: float = Field(0.75, gt=0, le=1)
    first_rung: float = Field(0.3, gt=0, le=1)
    # click_rank, before min_clicked trials clicked: while no trial clicked by the first horizon although this
    # many trials got there unclicked, the horizon doubles (a task that clicks later than first_rung x budget).
    escalate_after: int = Field(8, ge=1)
    # click_rank: every probe_every-th trial (by Optuna trial number) is a probe, never paused (it runs to its
    # end): the clicks a study sees come from the trials it let run, so a horizon set from them alone can only
    # shorten and would hide a task's late clicks, and a late clicker that ends highest; the probes show them.
    # 0: no probes.
    probe_every: int = Field(8, ge=0)
    # click_rank: a trial that clicks while fewer than min_clicked others have cannot be ranked yet; with defer_at
    # > 0 it is paused at defer_at x the budget instead of running to the end on no evidence, and resumes ahead of
    # fresh trials once the study's clicks rank it among the kept. 0 (the default): it runs on. Ahead on tables
    # that click early, behind on tables that click late (docs/freeze-thaw.md, "Deferring the first clickers").
    defer_at: float = Field(0.0, ge=0, lt=1)
    # index: a running trial is paused when its index (chance of ending near the top per episode it still needs)
    # is below this share of the best alternative's (a paused trial, or a fresh one while samples are left).
    pause_ratio: float = Field(0.5, gt=0, le=1)
    # Near the top: within margin, or noise_factor x the study's evaluation noise, of the best value seen.
    margin: float = Field(0.02, ge=0)
    noise_factor: float = Field(3.0, ge=0)
    # Clicked: this share of the way from the study's plateau to the best value seen.
    click_fraction: float = Field(0.25, gt=0, lt=1)
    # index: nothing is paused before this many trials clicked (until then every trial runs, first come first
    # served); click_rank: the click-time quantiles need this many other clicked trials.
    min_clicked: int = Field(4, ge=1)
    # index: a clicked trial's chance needs this many trials clicked by its episodes (else it keeps running).
    min_refs: int = Field(2, ge=1)
    # index: episodes a trial trains after it started or resumed before it may be paused again (None: grace).
    min_run_episodes: int | None = Field(None, ge=1)


class SchedulerConfig(Section):
    """Early stopping on the primary objective; budgets in training episodes."""

    kind: Literal["asha", "median", "plateau", "freeze_thaw", "none"] = "asha"
    # No trial is stopped before this many episodes (MANN sits at chance for a while before it clicks).
    grace_episodes: int = Field(4000, ge=1)
    reduction_factor: int = Field(2, ge=2)
    plateau: PlateauConfig = Field(default_factory=PlateauConfig)
    freeze_thaw: FreezeThawConfig = Field(default_factory=FreezeThawConfig)


class BudgetConfig(Section):
    num_samples: int = Field(12, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    time_budget_s: Number | None = Field(None, gt=0)
    # Retries of a failed trial (from its last checkpoint).
    max_failures: int = Field(2, ge=0)
    # Total training episodes of the study, summed over its trials: once spent, every trial stops (None: no cap).
    max_episodes: int | None = Field(None, ge=1)


class ResourcesConfig(Section):
    cpus_per_trial: Number = Field(1.0, gt=0)
    # Fractions share a GPU between trials (e.g. 0.25: four trials per GPU).
    gpus_per_trial: Number = Field(0.0, ge=0)
    # true (default): a worker process runs trial after trial (and a resumed one) instead of a new process per
    # trial start: the quickstart's `fit` 18-25 % shorter (README "Reusing worker processes"). false: a fresh
    # process for every start and resume (isolation, e.g. a library that leaks memory across trials).
    reuse_actors: bool = True

    @model_validator(mode="after")
    def _whole_gpus(self) -> "ResourcesConfig":
        require(self.gpus_per_trial <= 1 or float(self.gpus_per_trial).is_integer(),
                f"gpus_per_trial: above 1 must be a whole number, got {self.gpus_per_trial}")
        return self


class MlflowConfig(Section):
    # None: MLFLOW_TRACKING_URI, else an embedded SQLite store in the storage folder.
    tracking_uri: str | None = None
    experiment: str = Field("mann-search", pattern=r"\S")
    registered_model: str = Field("mann", pattern=_NAME)


class OptunaConfig(Section):
    # The Optuna study's RDB storage (an SQLAlchemy URL). None: MANN_OPTUNA_STORAGE, else SQLite in the study's
    # folder (optuna.db). Read by `optuna.load_study` and optuna-dashboard.
    storage: str | None = None
    # Studies whose finished trials seed this one's sampler (their folders, as `mann-search run` printed them):
    # see search.searcher.warm_start. Copied once, when the study starts; never trained again.
    warm_start: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _storage_url(self) -> "OptunaConfig":
        if self.storage is not None:
            problem = storage_url_problem(self.storage)
            require(problem is None, f"storage: {problem}")
        return self


MEMORY_SCHEME = "memory://"  # ``optuna.storage: memory://NAME``: in this process only (the benchmark's studies)


def storage_url_problem(url: str) -> str | None:
    """What is wrong with an Optuna storage URL before anything connects (None: nothing seen): it must parse as an
    SQLAlchemy URL whose dialect and driver are installed (``memory://NAME``: the benchmark's in-process storage)."""
    if url.startswith(MEMORY_SCHEME):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(url).get_dialect()
        if hasattr(dialect, "import_dbapi"):
            dialect.import_dbapi()  # the driver (psycopg2 ...) is there
    except NoSuchModuleError:  # (an ArgumentError)
        return f"no SQLAlchemy dialect {url.split('://')[0]!r} (postgresql+psycopg2, sqlite, mysql ...)"
    except ArgumentError:  # the URL itself is not repeated: it may hold a password
        return "not an SQLAlchemy URL (e.g. postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB, sqlite:///PATH)"
    except ImportError as exc:
        return f"the driver of {url.split('://')[0]!r} is not installed ({exc.name or exc})"
    return None


class SelectionConfig(Section):
    enabled: bool = True
    top_k: int = Field(3, ge=1)
    test_episodes: int = Field(1000, ge=1)
    seed: int = 0


class SearchConfig(Section):
    name: str = Field(pattern=_NAME)
    # The MANN config every trial starts from (relative paths: to this search config's folder, else the cwd).
    base: str
    space: dict[str, ParamSpec]
    # Fixed settings applied to the base before the sampled ones, by dotted path.
    overrides: dict[str, Any] = Field(default_factory=dict)
    # "a <= b" between searched or fixed settings, applied while sampling (define-by-run).
    constraints: list[str] = Field(default_factory=list)
    # The first is primary (scheduler, selection); more than one makes a multi-objective search.
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()])
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    # Results and checkpoints: a local folder, shared storage or s3://. None: MANN_SEARCH_STORAGE, else
    # ./runs/search.
    storage: str | None = None
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    optuna: OptunaConfig = Field(default_factory=OptunaConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "SearchConfig":
        require(bool(self.space), "space: at least one parameter to search")
        for path in self.space:
            require(bool(_PATH.match(path)), f"space.{path}: not a dotted settings path")
        for key in self.overrides:
            require(bool(_PATH.match(key)), f"overrides.{key}: not a dotted settings path")
        require(bool(self.objectives), "objectives: at least one")
        if len(self.objectives) > 1:
            require(self.sampler.kind != "cmaes", "sampler.kind: cmaes cannot do a multi-objective search")
            require(self.scheduler.kind == "none",
                    "scheduler.kind: early stopping needs a single objective; use 'none' for a multi-objective "
                    "search")
        require(self.sampler.startup in (None, "random") or self.sampler.start is not None,
                f"sampler.startup: {self.sampler.startup} applies to sampler.kind tpe or cmaes (their first "
                f"n_startup_trials trials), not {self.sampler.kind}")
        return self

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


def compare(a: Any, op: str, b: Any) -> bool:
    return {"<=": a <= b, "<": a < b, ">=": a >= b, ">": a > b}[op]


class LoadedSearch(Section):
    """A validated search: the config, the base MANN config (fixed overrides applied) and where they came from.

    This is what a study snapshots (``study.json``): resume, status and select read it, never the YAML again.
    """

    config: SearchConfig
    base: TrainConfig
    # Provenance, for a search read from files (None for one built in memory: :meth:`from_trees`)
    source: str | None = None  # the search config file
    base_source: str | None = None  # the base MANN config file
    digest: str | None = None  # of both files' text and the --set overrides, to tell when they were edited since

    @classmethod
    def from_trees(cls, config: dict[str, Any], base: dict[str, Any],
                   overrides: dict[str, Any] | None = None) -> "LoadedSearch":
        """A validated search built in memory from a search-config tree and a complete base MANN tree (what a
        curves table's header holds), with search-config ``overrides`` by dotted path; no files involved."""
        tree = apply_overrides(config, list((overrides or {}).items()), SearchConfig)
        loaded = cls(config=from_dict(SearchConfig, tree), base=from_dict(TrainConfig, base))
        _validate_space(loaded)
        _validate_constraints(loaded)
        _validate_objectives(loaded)
        return loaded

    @property
    def base_tree(self) -> dict[str, Any]:
        """The complete base MANN tree (every setting, defaults included)."""
        return self.base.to_dict()

    @property
    def constraints(self) -> tuple[Constraint, ...]:
        return tuple(parse_constraint(c, f"constraints[{i}]") for i, c in enumerate(self.config.constraints))

    @property
    def max_episodes(self) -> int:
        """The full training budget of one trial."""
        return self.base.train.episodes

    def trial_config(self, point: dict[str, Any], threads: int | None = None) -> TrainConfig:
        """The base + a sampled point (dotted paths) -> a validated TrainConfig."""
        pairs = list(point.items()) + ([("train.threads", threads)] if threads else [])
        return from_dict(TrainConfig, apply_overrides(self.base_tree, pairs, TrainConfig))

    def fixed_params(self) -> dict[str, Any]:
        """Every MANN setting of the base that the search does not sample, flattened by dotted path."""
        return {k: v for k, v in _flatten(self.base_tree).items() if k not in self.config.space}

    def changed_on_disk(self, overrides: list[str]) -> str | None:
        """One line saying the YAML files changed since this was loaded, or None."""
        if self.source is None or self.base_source is None:
            return None  # built in memory: nothing on disk to change
        try:
            now = _digest(Path(self.source), Path(self.base_source), overrides)
        except OSError:
            return f"{self.source} or {self.base_source} is no longer readable; using the study's snapshot"
        if now != self.digest:
            return (f"{self.source} (or its base {self.base_source}) changed since the study started; using the "
                    "study's snapshot (a changed config is a new study)")
        return None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, path) if isinstance(v, dict) else {path: v})
    return out


def _digest(source: Path, base: Path, overrides: list[str]) -> str:
    h = hashlib.sha256()
    for part in (source.read_bytes(), base.read_bytes(), "\n".join(overrides).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def base_value(tree: dict[str, Any], path: str) -> Any:
    """The value of a dotted path in a complete base tree (``LoadedSearch.base_tree``); KeyError if none."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def load_search_config(path: str | Path, overrides: list[str] | None = None) -> LoadedSearch:
    """Read, override and validate a search config and everything it refers to."""
    path = Path(path)
    overrides = list(overrides or [])
    tree = read_yaml(path)
    tree = apply_overrides(tree, [parse_override(o) for o in overrides], SearchConfig)
    unknown = sorted(str(k) for k in tree if k not in SearchConfig.model_fields)
    if unknown:  # before "required": `extends:` for `base:` is a misspelt key, not a missing one
        raise ConfigError(f"{unknown[0]}: unknown config key in {path} (known: "
                          f"{', '.join(sorted(SearchConfig.model_fields))})")
    for required in ("name", "base", "space"):
        if required not in tree:
            raise ConfigError(f"{required}: required in a search config ({path})")
    cfg = from_dict(SearchConfig, tree)

    base_path = Path(cfg.base)
    if not base_path.is_absolute():
        beside = path.parent / base_path
        base_path = beside if beside.exists() else Path.cwd() / base_path
        if not base_path.exists():  # name where it was looked for first: beside the search config, as documented
            raise ConfigError(f"base: {cfg.base}: not found beside the search config ({beside}) nor from the "
                              f"working directory ({Path.cwd() / cfg.base})")
    try:
        base_tree = read_yaml(base_path)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}") from None
    try:
        base_tree = apply_overrides(base_tree, list(cfg.overrides.items()), TrainConfig)
        base = from_dict(TrainConfig, base_tree)
        require_validation_split(base)
    except ConfigError as exc:
        raise ConfigError(f"base ({base_path}) with overrides: {str(exc).replace('--set ', 'overrides.')}") from None

    loaded = LoadedSearch(config=cfg, base=base, source=str(path.resolve()), base_source=str(base_path.resolve()),
                          digest=_digest(path, base_path, overrides))
    _validate_space(loaded)
    _validate_constraints(loaded)
    _validate_objectives(loaded)
    return loaded


def _exists(tree: dict[str, Any], path: str) -> bool:
    try:
        base_value(tree, path)
        return True
    except KeyError:
        return False


def _validate_objectives(loaded: LoadedSearch) -> None:
    """Each objective is a metric a trial reports (mann.metrics) on the validation characters: a misspelt name
    would only show once every trial had run without it, and the test characters are held out for selection."""
    spec = loaded.config.space.get("task.instances")
    most = max([loaded.base.task.instances, *([int(spec.high)] if spec is not None and spec.high is not None else []),
                *(int(c) for c in (spec.choices if spec is not None and spec.choices else []) if isinstance(c, int))])
    # the names an evaluation of `most` instances reports, built where the trainable builds them (mann.metrics)
    known = [*metrics.evaluation("val", [0.0] * most, 0.0), metrics.name("val", "read_entropy")]
    for i, o in enumerate(loaded.config.objectives):
        where = f"objectives[{i}].metric"
        if o.metric.startswith("test/"):
            raise ConfigError(f"{where}: {o.metric}: the test characters are held out for selection, which scores "
                              f"the chosen trials on them; a search ranks trials on val ({'val/' + o.metric[5:]})")
        if o.metric.startswith("val/") and o.metric not in known:
            raise ConfigError(f"{where}: {o.metric} is not a metric a trial reports (on val: loss, acc, acc_2plus, "
                              f"acc_1 ... acc_{most}, read_entropy)")
        if not o.metric.startswith(("val/", "train/", "model/", "time/")):
            raise ConfigError(f"{where}: {o.metric}: an objective is a metric a trial reports: val/ (e.g. "
                              f"val/acc_2plus), train/, model/ (model/parameters) or time/")


def _validate_constraints(loaded: LoadedSearch) -> None:
    cfg, tree = loaded.config, loaded.base_tree
    order = list(cfg.space)
    for i, c in enumerate(loaded.constraints):
        for ref in c.refs():
            if not _exists(tree, ref):
                raise ConfigError(f"constraints[{i}]: {ref!r} is not a MANN setting")
        if not any(r in cfg.space for r in c.refs()):
            left = base_value(tree, c.left) if isinstance(c.left, str) else c.left
            right = base_value(tree, c.right) if isinstance(c.right, str) else c.right
            if not compare(left, c.op, right):
                raise ConfigError(f"constraints[{i}]: does not hold for the fixed values ({left} {c.op} {right} is "
                                  "false)")
    for p, spec in cfg.space.items():
        for ref in (spec.when or {}):
            if ref not in cfg.space and not _exists(tree, ref):
                raise ConfigError(f"space.{p}.when: {ref!r} is not a MANN setting")
            if ref in cfg.space and order.index(ref) > order.index(p):
                raise ConfigError(f"space.{p}.when: {ref!r} must come before {p!r} in the space")


def _validate_space(loaded: LoadedSearch) -> None:
    """Every searched path is a MANN setting, and each extreme value is valid for that setting."""
    tree = loaded.base_tree
    for p, spec in loaded.config.space.items():
        if not _exists(tree, p) or isinstance(base_value(tree, p), dict):
            raise ConfigError(f"space.{p}: not a MANN setting (a leaf of configs/mann/*.yaml)")
        values = spec.choices if spec.type == "categorical" else [spec.low, spec.high]
        names = [f"choices[{i}]" for i in range(len(values))] if spec.type == "categorical" else ["low", "high"]
        for name, v in zip(names, values):
            try:
                loaded.trial_config({p: int(v) if spec.type == "int" else v})
            except ConfigError as exc:
                # Only errors about this very setting; combinations are the constraints' business.
                if exc.path == p:
                    raise ConfigError(f"space.{p}.{name}: {exc.detail}", f"space.{p}.{name}", exc.detail) from None
