"""What a benchmarked method is: the table's recorded search with a few overrides (:data:`METHODS`; the
simulated engine's reference rows in :data:`SIM_ONLY_OVERRIDES`), the shipped config's scheduler and sampler
settings (:func:`scheduler_overrides`, :func:`sampler_overrides`), its study and searcher (:func:`method_study`,
:func:`method_searcher`), and what one study of it did (:class:`Run`). Both engines build their studies here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search import (DefineByRun, LoadedSearch, SchedulerConfig, SearchConfig, Study, TrialOutcome, make_sampler,
                    make_searcher)

from .table import Table, search_from_header

BASELINE = "tpe+asha (ray optuna)"
# name -> (search-config overrides, searcher flavour: "study" = StudySearch, "ray" = Ray's plain OptunaSearch)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "random": ({"sampler.kind": "random", "sampler.startup": "random", "scheduler.kind": "none"}, "study"),
    "tpe": ({"sampler.kind": "tpe", "scheduler.kind": "none"}, "study"),
    BASELINE: ({"sampler.kind": "tpe", "sampler.startup": "random", "scheduler.kind": "asha"}, "ray"),
    "tpe+asha": ({"sampler.kind": "tpe", "scheduler.kind": "asha"}, "study"),
    "tpe+median": ({"sampler.kind": "tpe", "scheduler.kind": "median"}, "study"),
    "tpe+plateau": ({"sampler.kind": "tpe", "scheduler.kind": "plateau"}, "study"),
    "tpe+freeze_thaw": ({"sampler.kind": "tpe", "scheduler.kind": "freeze_thaw"}, "study"),
}
ORACLE = "tpe+oracle@click"
# methods only the simulated engine runs (search.bench.sim.SIM_ONLY adds their schedulers): name -> overrides
SIM_ONLY_OVERRIDES: dict[str, dict[str, Any]] = {
    "i-epoch": {"sampler.kind": "random", "sampler.startup": "random", "scheduler.kind": "none",
                "budget.max_concurrent": None},
    ORACLE: {"sampler.kind": "tpe", "scheduler.kind": "freeze_thaw"},
}


@dataclass
class Run:
    """What one study did: its results in arrival order and how its trials ended."""

    results: list[tuple[str, float, float, int, int]] = field(default_factory=list)  # trial, episodes, value, cfg, curve
    ended: dict[str, TrialOutcome] = field(default_factory=dict)  # trial -> how it ended (search.decide)
    started: list[str] = field(default_factory=list)  # trial ids in the order the searcher created them
    paused: list[str] = field(default_factory=list)  # paused and never resumed (the simulated engine)
    resumed: dict[str, int] = field(default_factory=dict)  # trial -> times resumed after a pause (sim)
    why: dict[str, str] = field(default_factory=dict)  # trial -> freeze_thaw's last word on it (sim; schedulers.WHY)
    wall_s: float = 0.0
    sim_s: float = 0.0  # simulated seconds of the study (the simulated engine)


def scheduler_overrides(table: Table, kind: str, shipped: SearchConfig | None) -> dict[str, Any]:
    """A method's scheduler settings: the shipped config's when it uses that kind, else the table's recorded
    search's (ASHA and median as recorded); the plateau rule and freeze_thaw without either wait 15 % of the budget
    and take the shipped config's section of their kind (``scheduler.plateau`` / ``scheduler.freeze_thaw``: its
    defaults, or what ``--set`` put there; without a shipped config, today's defaults), never the table's recorded
    one: that holds the defaults of the day the table was recorded."""
    for cfg in (shipped, table.search.config):
        if cfg is not None and cfg.scheduler.kind == kind:
            return {"scheduler": cfg.scheduler.to_dict()}
    if kind in ("plateau", "freeze_thaw"):
        out: dict[str, Any] = {"scheduler.grace_episodes": max(1, round(0.15 * table.search.max_episodes))}
        own = shipped.scheduler if shipped is not None else SchedulerConfig()
        out[f"scheduler.{kind}"] = getattr(own, kind).to_dict()
        return out
    return {}


# The shipped config's sampler settings every method takes (its kind is the method's, its seed the repetition's;
# the baseline, Ray's plain TPE, and the random-sampling methods draw their start at random whatever it says).
SAMPLER_SETTINGS = ("n_startup_trials", "constant_liar", "startup")
# What `mann-search benchmark --set` may change: the shipped config's settings the benchmark reads (key prefixes).
BENCHMARK_SET = ("scheduler.", *(f"sampler.{k}" for k in SAMPLER_SETTINGS), "overrides.train.eval_every")


def sampler_overrides(shipped: SearchConfig | None) -> dict[str, Any]:
    """Every method's sampler settings beyond its kind and seed: the shipped config's (what ``--set sampler.*``
    changed; the baseline's too), else the table's recorded search's."""
    if shipped is None:
        return {}
    return {f"sampler.{k}": getattr(shipped.sampler, k) for k in SAMPLER_SETTINGS}


def method_study(table: Table, method: str, repeat: int, num_samples: int, cap: int | None,
                 shipped: SearchConfig | None, optuna_storage: str, path: str) -> tuple[LoadedSearch, Study, str]:
    """A method's study on the table: the table's recorded search with the method's overrides, seed ``repeat``,
    ``num_samples`` trials and the episode cap; (search, study, searcher flavour). Both engines build it."""
    overrides, flavour = (SIM_ONLY_OVERRIDES[method], "study") if method in SIM_ONLY_OVERRIDES else METHODS[method]
    search = search_from_header(table.header, {
        **sampler_overrides(shipped), **overrides, **scheduler_overrides(table, overrides["scheduler.kind"], shipped),
        "sampler.seed": repeat,
        "budget.num_samples": num_samples, "budget.max_episodes": cap,
        "budget.time_budget_s": None, "budget.max_failures": 0, "resources.cpus_per_trial": 1,
        "resources.gpus_per_trial": 0, "storage": str(Path(path).parent), "optuna.storage": optuna_storage})
    return search, Study.create(search, path=path), flavour


def method_searcher(search: LoadedSearch, study: Study, flavour: str):
    """The method's searcher: Ray's plain OptunaSearch ("ray", the baseline) or the study's StudySearch."""
    if flavour == "ray":
        from ray.tune.search.optuna import OptunaSearch

        primary = search.config.primary
        return OptunaSearch(space=DefineByRun(search), metric=primary.metric, mode=primary.mode,
                            sampler=make_sampler(search))
    return make_searcher(study)
