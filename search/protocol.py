"""The trial protocol: what a trial reports (:class:`TrialReport`) and how it ended (:func:`decide`).

One vocabulary for the end of a trial, decided in one function that the MLflow lineage, the Optuna searcher,
model selection, the CLI and the benchmark all call. An ending is Optuna's :class:`~optuna.trial.TrialState`
plus a reason (Optuna's pruners say *that* a trial was pruned; the reason says *who* ended it):

============== ========= =============================================================================
ending         Optuna    what ended it
============== ========= =============================================================================
completed      COMPLETE  it trained its full budget (``train.episodes`` of the base config)
early_stopped  PRUNED    the study's scheduler or stopping rule (``by`` names it: asha, median, plateau)
episode_cap    PRUNED    the study's episode cap (``budget.max_episodes``) was spent
time_budget    PRUNED    the study's time budget (``budget.time_budget_s``) ran out
study_ended    PRUNED    the study ended while it ran or waited (its driver stopped, or no event came)
paused_at_end  PRUNED    the study ended (cap, time, driver) while the freeze_thaw scheduler had it paused
diverged       FAIL      training diverged (a NaN or infinite loss); retrying would diverge again
failed         FAIL      the trial raised (its error is the reason)
============== ========= =============================================================================

A PRUNED trial keeps its intermediate values in Optuna (its samplers weigh it by them); only a COMPLETE trial
tells a final value. MLflow shows COMPLETE as FINISHED, PRUNED as KILLED (so early ends are visible in the runs
table without opening tags) and FAIL as FAILED.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from optuna.trial import TrialState

from mann import metrics

# The result keys a trial adds to its metrics (the rest are mann.metrics names); nothing else reads them.
DIVERGED_KEY = "diverged"
FAILURE_KEY = "failure"


TRIAL_NUMBER_KEY = "trial_number"  # in a Tune trial's config: its Optuna trial number (not a MANN setting)
# ... and, for a trial that trains again the configuration of one lost with a killed driver, the lost trial's
# newest checkpoint (a path or URI), which it resumes from (search.searcher.reask_lost)
RESUME_KEY = "resume_from"
NAME_LIMIT = 250  # MLflow's run name limit


def sampled_point(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's config without the study's bookkeeping: the sampled MANN settings by dotted path."""
    return {k: v for k, v in config.items() if k not in (TRIAL_NUMBER_KEY, RESUME_KEY)}


def probe_number(every: int, number) -> bool:
    """Whether Optuna trial ``number`` is a freeze_thaw probe with ``probe_every`` ``every`` (every ``every``-th
    trial by number, so the same trials after a resume; 0: none)."""
    return bool(every) and isinstance(number, int) and number % every == every - 1


def is_probe(scheduler, number) -> bool:
    """:func:`probe_number` for a study's scheduler settings (a ``search.config.SchedulerConfig``): only
    freeze_thaw's click_rank policy has probes. The console and MLflow ask this; the scheduler asks
    :func:`probe_number`."""
    ft = scheduler.freeze_thaw
    return scheduler.kind == "freeze_thaw" and ft.policy == "click_rank" and probe_number(ft.probe_every, number)


def trial_label(config: dict[str, Any], fallback: str = "trial") -> str:
    """``t07``: the Optuna trial number (``fallback`` for a trial no study searcher numbered); what
    ``mann-search export --trial`` takes."""
    number = config.get(TRIAL_NUMBER_KEY)
    return f"t{number:02d}" if isinstance(number, int) else fallback


def trial_name(config: dict[str, Any], fallback: str = "trial") -> str:
    """``t07 slots=35 read_heads=4 gamma=0.98``: the trial's label and the sampled values, by the last part of
    each path (the MLflow run name and the console's)."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
             for k, v in sampled_point(config).items()]
    return " ".join([trial_label(config, fallback), *parts])[:NAME_LIMIT]


def label_of(name: str) -> str:
    """The label a :func:`trial_name` starts with (``t07``), e.g. from an MLflow run name."""
    return str(name).split(" ", 1)[0]


def trial_dirname(config: dict[str, Any], fallback: str = "trial") -> str:
    """The trial's result folder: its name with characters a path should not hold replaced."""
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in trial_name(config, fallback))
    return safe[:100]


class Ending(str, Enum):
    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    EPISODE_CAP = "episode_cap"
    TIME_BUDGET = "time_budget"
    STUDY_ENDED = "study_ended"
    PAUSED_AT_END = "paused_at_end"
    DIVERGED = "diverged"
    FAILED = "failed"

    @property
    def state(self) -> TrialState:
        if self is Ending.COMPLETED:
            return TrialState.COMPLETE
        if self in (Ending.DIVERGED, Ending.FAILED):
            return TrialState.FAIL
        return TrialState.PRUNED


def selectable(ending: str | None) -> bool:
    """Whether a trial that ended so (an :class:`Ending` value, as tagged) may be selected: it trained without
    failing; early-ended trials included."""
    try:
        return Ending(ending).state != TrialState.FAIL
    except ValueError:
        return False


MLFLOW_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


@dataclass(frozen=True)
class TrialReport:
    """One evaluation as a trial reports it: flat ``mann.metrics`` names, the episodes trained so far, and
    whether training diverged (then ``failure`` says how)."""

    episodes: int
    values: Mapping[str, float] = field(default_factory=dict)
    diverged: bool = False
    failure: str | None = None

    def to_result(self) -> dict[str, Any]:
        """The dict handed to ``tune.report``."""
        out: dict[str, Any] = {**self.values, metrics.EPISODES: float(self.episodes),
                               DIVERGED_KEY: int(self.diverged)}
        if self.failure:
            out[FAILURE_KEY] = self.failure
        return out

    @classmethod
    def from_result(cls, result: Mapping[str, Any] | None) -> "TrialReport | None":
        """A Tune result (or a ``trial.last_result``) read back; None when it holds no evaluation."""
        if not result or metrics.EPISODES not in result:
            return None
        values = {k: v for k, v in metrics.loggable(result).items() if k not in (metrics.EPISODES, DIVERGED_KEY)}
        return cls(episodes=int(float(result[metrics.EPISODES])), values=values,
                   diverged=bool(result.get(DIVERGED_KEY)), failure=result.get(FAILURE_KEY) or None)

    def value(self, metric: str) -> float | None:
        v = self.values.get(metric)
        return float(v) if v is not None and math.isfinite(v) else None


@dataclass(frozen=True)
class StudyFacts:
    """What the study knows when a trial ends: its budget and which of its own limits were reached."""

    max_episodes: int  # one trial's full budget
    scheduler: str = "none"  # the scheduler kind that may stop trials early ("none": nothing does)
    cap_spent: bool = False  # budget.max_episodes was reached by the trials together
    time_up: bool = False  # budget.time_budget_s ran out
    study_ended: bool = False  # decided at the end of the study (no trial-complete event came)


class BudgetWatch:
    """The study's limits as one driver sees them, from the results it is shown: episodes spent (each trial's
    latest reported episodes, so a retried trial is not counted twice; the rule of ``budget.max_episodes``) and
    seconds since this driver started (``budget.time_budget_s``; Tune counts it per driver too)."""

    def __init__(self, max_episodes: int, scheduler: str, cap: int | None, time_budget_s: float | None):
        self.max_episodes, self.scheduler = max_episodes, scheduler
        self.cap, self.time_budget_s = cap, time_budget_s
        self.spent: dict[str, int] = {}
        self.restart()

    def restart(self) -> None:
        self.started = time.monotonic()

    def observe(self, trial: str, report: TrialReport | None) -> None:
        if report is not None:
            self.spent[trial] = report.episodes

    @property
    def episodes(self) -> int:
        return sum(self.spent.values())

    def facts(self, study_ended: bool = False) -> StudyFacts:
        cap_spent = bool(self.cap) and self.episodes >= self.cap
        # Tune checks its time budget between events: allow a second of slack
        time_up = bool(self.time_budget_s) and time.monotonic() - self.started >= self.time_budget_s - 1
        return StudyFacts(self.max_episodes, self.scheduler, cap_spent, time_up, study_ended)

    @classmethod
    def of(cls, search) -> "BudgetWatch":
        """The watch of a :class:`search.config.LoadedSearch`."""
        b = search.config.budget
        return cls(search.max_episodes, search.config.scheduler.kind, b.max_episodes, b.time_budget_s)


@dataclass(frozen=True)
class TrialOutcome:
    ending: Ending
    reason: str
    episodes: int

    @property
    def state(self) -> TrialState:
        return self.ending.state

    @property
    def mlflow_status(self) -> str:
        return MLFLOW_STATUS[self.state]

    @property
    def selectable(self) -> bool:
        return selectable(self.ending.value)

    def as_tags(self) -> dict[str, str]:
        return {"outcome": self.ending.value, "state": self.state.name, "reason": self.reason}


def decide(report: TrialReport | None, facts: StudyFacts, error: str | None = None,
           paused: bool = False) -> TrialOutcome:
    """How a finished trial ended, from its last report, the study's facts, the trial's error (if it raised) and
    whether the scheduler had it paused (a paused trial below its budget ends paused_at_end, whichever study
    limit ended it: the reason names the limit).

    The order matters: an error or a divergence is the trial's own end whatever else happened; a trial at its
    full budget completed; below it, the study's own limits (cap, time) come before the scheduler, because when
    a limit is spent Tune ends every running trial and the scheduler decided nothing."""
    episodes = report.episodes if report else 0
    if error is not None:
        return TrialOutcome(Ending.FAILED, error or "the trial raised", episodes)
    if report is not None and report.diverged:
        return TrialOutcome(Ending.DIVERGED, report.failure or "training diverged", episodes)
    if report is None and not (facts.cap_spent or facts.time_up or facts.study_ended):
        return TrialOutcome(Ending.FAILED, "the trial ended without reporting an evaluation", 0)
    if report is not None and episodes >= facts.max_episodes:
        return TrialOutcome(Ending.COMPLETED, f"trained its full budget of {facts.max_episodes} episodes", episodes)
    if paused:
        why = ("the study's episode cap was spent" if facts.cap_spent else "the study's time budget ran out"
               if facts.time_up else "the study ended")
        return TrialOutcome(Ending.PAUSED_AT_END, f"paused at {episodes} episodes (checkpoint kept) when {why}",
                            episodes)
    if facts.cap_spent:
        return TrialOutcome(Ending.EPISODE_CAP, f"the study's episode cap was spent at {episodes} episodes",
                            episodes)
    if facts.time_up:
        return TrialOutcome(Ending.TIME_BUDGET, f"the study's time budget ran out at {episodes} episodes", episodes)
    if facts.study_ended or facts.scheduler in ("none", "freeze_thaw"):  # freeze_thaw pauses, never stops
        return TrialOutcome(Ending.STUDY_ENDED, f"the study ended at {episodes} episodes", episodes)
    return TrialOutcome(Ending.EARLY_STOPPED, f"stopped by the {facts.scheduler} scheduler at {episodes} episodes",
                        episodes)


def outcome_counts(outcomes: list[TrialOutcome | None]) -> dict[str, int]:
    """Trials by ending (``running`` for None: not ended yet), every ending listed."""
    counts = {e.value: 0 for e in Ending}
    counts["running"] = 0
    for o in outcomes:
        counts[o.ending.value if o else "running"] += 1
    return counts
