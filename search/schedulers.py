"""Plateau-aware early stopping for curves that sit at a plateau, then click (``scheduler.kind: plateau``).

A MANN's validation accuracy stays at its plateau (about chance) for a while, then rises; when it rises depends on
the configuration and the seed. ASHA compares trials at fixed rungs, so a good configuration that has not clicked
yet by a rung looks like a bad one and is stopped. This rule stops a trial only when the curves of this very study
say it cannot catch up; it places no rung in advance:

* **plateau and click.** The study's plateau is the median over trials of their first three evaluations' median.
  A trial has *clicked* once it has covered ``click_fraction`` of the way from the plateau to the best value
  seen (the incumbent).
* **late clickers lose.** A trial that has not clicked by episode t is stopped when the trials that ran the full
  budget say late clickers end lower: the best of those not clicked by ``t / click_slack`` (at least
  ``min_refs`` of them) ended ``margin`` below the best of those clicked by then (at least ``min_clicked``).
  So the stopping time follows the click times the study has seen, and a study where a late clicker reached the
  top stops no unclicked trial before that late time.
* **optimistic reach.** A trial at episode t with best value v (at least the plateau) has ``max_t - t``
  episodes left; its optimistic reach is v plus the largest rise any other trial showed within a window of that
  many episodes, anywhere on its curve (so a late click is credited with an earlier trial's whole rise). It is
  stopped when its reach plus ``margin`` is below the incumbent (used once ``min_refs`` curves span the window).

* **noise.** Both rules stop only on a gap larger than ``margin`` and than ``noise_factor`` times the study's
  evaluation noise: the standard deviation of one evaluation about its curve's local trend, estimated from every
  curve's second differences (``v[i+1] - 2 v[i] + v[i-1]`` has variance 6 sigma^2 for white noise on a locally
  linear curve; median absolute value, median over trials). So a task evaluated on fewer episodes, or with a
  noisier objective, gets a wider margin without retuning.

No trial is stopped before ``grace_episodes`` or once it reached the full budget. Values are in the objective's
units, larger = better (a ``min`` objective is negated). :class:`PlateauRule` is the rule on plain numbers
(tested without Ray); :class:`PlateauStopping` is its Tune scheduler.

**Resume.** Tune restores a scheduler as it was pickled when the experiment started (ray-project/ray#30838), so
the rule's evidence is not kept in the scheduler: like Optuna's pruners, it is read from the study's Optuna
storage (:class:`StudyEvidence`: every evaluation the searcher reported, at its episode count), once per driver,
before the first decision. A resumed study's rule therefore decides as an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler

from .protocol import DIVERGED_KEY

CONTINUE, STOP = "CONTINUE", "STOP"


@dataclass
class PlateauRule:
    max_t: float
    grace: float = 0.0
    margin: float = 0.02
    noise_factor: float = 3.0
    click_fraction: float = 0.25
    click_slack: float = 1.5
    min_clicked: int = 1
    min_refs: int = 2
    history: dict[Any, list[tuple[float, float]]] = field(default_factory=dict)
    stopped: dict[Any, str] = field(default_factory=dict)  # trial -> why ("late" | "reach")

    # --- what the study has seen ---------------------------------------------------------------------------

    def plateau(self) -> float:
        """The median over trials of their first three evaluations' median: where curves sit before a click."""
        return float(np.median([np.median([v for _, v in h[:3]]) for h in self.history.values()]))

    def incumbent(self) -> float:
        return max(v for h in self.history.values() for _, v in h)

    def noise(self) -> float:
        """The study's evaluation noise (one standard deviation): the median over trials with at least four
        evaluations of 1.4826 x median |second difference| / sqrt(6); 0 before any such trial."""
        sigmas = []
        for h in self.history.values():
            if len(h) >= 4:
                v = np.array([x for _, x in h])
                sigmas.append(1.4826 * float(np.median(np.abs(v[2:] - 2 * v[1:-1] + v[:-2]))) / math.sqrt(6))
        return float(np.median(sigmas)) if sigmas else 0.0

    def gap(self) -> float:
        """How far below the bar a trial must be to be stopped: ``margin`` or ``noise_factor`` x the noise."""
        return max(self.margin, self.noise_factor * self.noise())

    def click_level(self) -> float:
        p = self.plateau()
        return p + self.click_fraction * (self.incumbent() - p)

    def click_time(self, key: Any, level: float) -> float:
        return next((t for t, v in self.history[key] if v >= level), math.inf)

    def completed(self) -> list[Any]:
        return [k for k, h in self.history.items() if h[-1][0] >= self.max_t]

    def late_clickers_lose(self, t: float, level: float) -> bool:
        """True when the completed trials say a trial not clicked by ``t`` ends below the best: at least
        ``min_clicked`` of them had clicked by ``t / click_slack`` and at least ``min_refs`` had not, and the best
        of the latter ended :meth:`gap` below the best of the former."""
        by = t / self.click_slack
        early, late = [], []
        for k in self.completed():
            (early if self.click_time(k, level) <= by else late).append(self.history[k][-1][1])
        if len(early) < self.min_clicked or len(late) < self.min_refs:
            return False
        return max(late) + self.gap() < max(early)

    def best_rise(self, window: float, exclude: Any) -> float | None:
        """The largest rise within ``window`` episodes on any other trial's curve (a curve shorter than the
        window counts with its whole rise so far); None unless ``min_refs`` curves span the window."""
        rises, spanning = [], 0
        for key, h in self.history.items():
            if key == exclude:
                continue
            spanning += h[-1][0] - h[0][0] >= window
            t = np.array([x[0] for x in h])
            v = np.array([x[1] for x in h])
            dt = t[None, :] - t[:, None]  # (start, end)
            ok = (dt > 0) & (dt <= window)
            rises.append(float(np.max(np.where(ok, v[None, :] - v[:, None], 0.0))))
        if spanning < self.min_refs:
            return None
        return max(rises)

    # --- the decision --------------------------------------------------------------------------------------

    def record(self, key: Any, t: float, value: float) -> None:
        """Add one evaluation of ``key`` (an evaluation at an episode count it already has replaces it: a
        retried trial re-reports from its checkpoint)."""
        h = [(x, v) for x, v in self.history.get(key, []) if x != float(t)]
        h.append((float(t), float(value)))
        self.history[key] = sorted(h)

    def observe(self, key: Any, t: float, value: float) -> str:
        """Record one evaluation of ``key`` (value: larger is better); CONTINUE or STOP."""
        self.record(key, t, value)
        if t < self.grace or t >= self.max_t:
            return CONTINUE
        best_own = max(v for _, v in self.history[key])
        level = self.click_level()
        if best_own < level and self.late_clickers_lose(t, level):
            self.stopped[key] = "late"
            return STOP
        rise = self.best_rise(self.max_t - t, exclude=key)
        # a trial still below the plateau is credited with it: low early values are noise, not evidence
        if rise is not None and max(best_own, self.plateau()) + rise + self.gap() < self.incumbent():
            self.stopped[key] = "reach"
            return STOP
        return CONTINUE


class StudyEvidence:
    """The evaluations a study's Optuna storage holds, by Tune trial id: what a scheduler rebuilds its evidence
    from after a driver restart. Picklable (it holds the study's snapshot, not a connection)."""

    def __init__(self, study):
        self.study = study

    def history(self) -> dict[str, list[tuple[float, float]]]:
        """``{tune trial id: [(episodes, objective), ...]}`` from the trials' intermediate values; empty
        before the study's Optuna study exists."""
        import optuna

        from .searcher import TUNE_TRIAL_ATTR, open_storage, storage_url

        try:
            ot = optuna.load_study(study_name=self.study.key, storage=open_storage(storage_url(self.study)))
        except KeyError:
            return {}
        return {t.user_attrs[TUNE_TRIAL_ATTR]: sorted((float(k), float(v)) for k, v in t.intermediate_values.items())
                for t in ot.get_trials(deepcopy=False) if TUNE_TRIAL_ATTR in t.user_attrs}


class PlateauStopping(FIFOScheduler):
    """Tune scheduler around :class:`PlateauRule` (see the module doc)."""

    def __init__(self, time_attr: str, metric: str, mode: str, max_t: float,
                 evidence: StudyEvidence | None = None, **rule: Any):
        super().__init__()
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self.rule = PlateauRule(max_t=max_t, **rule)
        self.evidence = evidence
        self.synced = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "synced": False}  # a restored scheduler reads the storage again

    def sync(self) -> int:
        """Merge the study's stored evaluations into the rule's history (once per driver); how many."""
        self.synced = True
        if self.evidence is None:
            return 0
        n = 0
        for key, points in self.evidence.history().items():
            for t, v in points:
                self.rule.record(key, t, v if self._mode == "max" else -v)
                n += 1
        return n

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode come from the search config

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        t, v = result.get(self._time_attr), result.get(self._metric)
        if not self.synced:
            self.sync()
        if t is None or v is None or result.get(DIVERGED_KEY) or not np.isfinite(v):
            return CONTINUE
        return self.rule.observe(trial.trial_id, float(t), float(v) if self._mode == "max" else -float(v))

    def debug_string(self) -> str:
        return f"PlateauStopping: {len(self.rule.stopped)} stopped of {len(self.rule.history)} trials"
