"""Plateau-aware early stopping for curves that sit at a plateau, then click (``scheduler.kind: plateau``).

A MANN's validation accuracy stays at its plateau (about chance) for a while, then rises; when it rises depends on
the configuration and the seed. ASHA compares trials at fixed rungs, so a good configuration that has not clicked
yet by a rung looks like a bad one and is stopped. This rule stops a trial only when the curves of this very study
say it cannot catch up; it places no rung in advance:

* **plateau and click.** The study's plateau is the median over trials of the median of their evaluations in
  the *plateau span*: from the first at or past 10 % of the budget to the first at or past 30 % (``PLATEAU_SPAN``;
  the first three evaluations at the shipped configs' interval of 10 %, and the same stretch of a curve at any
  other interval). A trial has *clicked* once it has covered ``click_fraction`` of the way from the plateau to
  the best value seen (the incumbent).
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
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import Searcher

from .protocol import DIVERGED_KEY, TRIAL_NUMBER_KEY, probe_number

CONTINUE, STOP = "CONTINUE", "STOP"
# The stretch of a curve that gives the study's plateau, as fractions of the budget (PlateauRule.early).
PLATEAU_SPAN = (0.1, 0.3)


def plateau_span(h: list[tuple[float, float]], max_t: float) -> list[float]:
    """A curve's values in the plateau span (module doc), from its (episodes, value) points in order: from its
    first evaluation at or past ``PLATEAU_SPAN[0]`` x ``max_t`` to its first at or past ``PLATEAU_SPAN[1]`` x it,
    both included (a curve that has not reached the span yet: its first three values). The schedulers and the
    instruments over recorded tables (``search.bench``: the click of ``curves signals``, the oracle) all take a
    curve's plateau from here. By episodes, not by count: the first three evaluations, the rule before
    2026-12-07, meant 5-15 % of the budget to a study that evaluates every 5 % and 10-30 % to one that evaluates
    every 10 %; on the pre-click rise that moved the click level, and freeze_thaw's speed-up fell from 1.33 to
    1.02 across the four recorded tables when their studies reported every recorded evaluation (README "Pause
    and resume")."""
    lo, hi = (f * max_t for f in PLATEAU_SPAN)
    i0 = next((i for i, (t, _) in enumerate(h) if t >= lo), None)
    if i0 is None:
        return [v for _, v in h[:3]]
    i1 = next((i for i, (t, _) in enumerate(h) if t >= hi), len(h) - 1)
    return [v for _, v in h[i0:i1 + 1]]


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
        """The median over trials of their :meth:`early` values' median: where curves sit before a click."""
        return float(np.median([np.median(self.early(h)) for h in self.history.values()]))

    def early(self, h: list[tuple[float, float]]) -> list[float]:
        """A curve's values in the plateau span: :func:`plateau_span`."""
        return plateau_span(h, self.max_t)

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

    def pauses(self) -> dict[str, tuple[float | None, float | None]]:
        """``{tune trial id: (paused at, last resumed at)}`` (None: not paused / never resumed) of the trials
        the storage has RUNNING, from the attributes :meth:`mark` writes."""
        import optuna

        from .searcher import TUNE_TRIAL_ATTR, open_storage, storage_url

        try:
            ot = optuna.load_study(study_name=self.study.key, storage=open_storage(storage_url(self.study)))
        except KeyError:
            return {}

        def num(x):
            return float(x) if x not in (None, "") else None

        return {t.user_attrs[TUNE_TRIAL_ATTR]: (num(t.user_attrs.get(PAUSED_ATTR)), num(t.user_attrs.get(RESUMED_ATTR)))
                for t in ot.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                if TUNE_TRIAL_ATTR in t.user_attrs}

    def mark(self, number: int, paused_at: float | None = None, resumed_at: float | None = None,
             why: str | None = None) -> None:
        """Write a pause (``paused_at``, and ``why`` the scheduler paused it) or a resume (``resumed_at``; clears
        the pause) on Optuna trial ``number``: the pause state survives a driver restart and shows in
        optuna-dashboard."""
        from .searcher import open_storage, storage_url

        storage = open_storage(storage_url(self.study))
        tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.study.key), number)
        if resumed_at is not None:
            storage.set_trial_user_attr(tid, RESUMED_ATTR, float(resumed_at))
            storage.set_trial_user_attr(tid, PAUSED_ATTR, "")
            storage.set_trial_user_attr(tid, PAUSED_WHY_ATTR, "")
        else:
            storage.set_trial_user_attr(tid, PAUSED_ATTR, float(paused_at))
            storage.set_trial_user_attr(tid, PAUSED_WHY_ATTR, why or "")


class _StoredEvidence:
    """What a scheduler of ours shares: its rule's evidence read from the study's Optuna storage (``evidence``: a
    :class:`StudyEvidence`) once per driver, since Tune restores a scheduler as pickled at the study's start."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "synced": False}  # a restored scheduler reads the storage again

    def sync(self) -> int:
        """Merge the study's stored evaluations into the scheduler (once per driver); how many were merged."""
        self.synced = True
        if self.evidence is None:
            return 0
        return sum(self.merge(key, points) for key, points in self.evidence.history().items())

    def merge(self, key: str, points: list[tuple[float, float]]) -> int:
        """Add one trial's stored (episodes, objective) points to the rule's history; how many."""
        for t, v in points:
            self.rule.record(key, t, v if self._mode == "max" else -v)
        return len(points)


class PlateauStopping(_StoredEvidence, FIFOScheduler):
    """Tune scheduler around :class:`PlateauRule` (see the module doc)."""

    def __init__(self, time_attr: str, metric: str, mode: str, max_t: float,
                 evidence: StudyEvidence | None = None, **rule: Any):
        super().__init__()
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self.rule = PlateauRule(max_t=max_t, **rule)
        self.evidence = evidence
        self.synced = False


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


# --- ASHA with its rungs kept across a driver restart (scheduler.kind: asha) ------------------------------------


class StoredASHA(_StoredEvidence, AsyncHyperBandScheduler):
    """Ray's ASHA whose rungs are rebuilt from the study's Optuna storage once per driver (``evidence``: a
    :class:`StudyEvidence`).

    Tune restores a scheduler as pickled when the study started, so after ``mann-search resume`` Ray's ASHA has
    empty rungs; worse, a restored trial that completes is recorded at *every* rung it passed with its final value
    (``on_trial_complete``), so the next trial met a cutoff made of a finished trial's last value. In a recipe
    study (#23, study 2, leg 2) the trial with the best value at the first rung (0.637 at 50k episodes) was stopped
    there because the only value the fresh rung held was the restored trial's 0.773 at 150k. Here each rung gets,
    for each trial the storage knows, the first value it reported at or past the rung: what an uninterrupted ASHA
    holds."""

    def __init__(self, *args, evidence: StudyEvidence | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.evidence = evidence
        self.synced = False

    def merge(self, key: str, points: list[tuple[float, float]]) -> int:
        """Record a trial's first stored value at or past each rung (unless the rung has it); how many."""
        bracket = self._trial_info.get(key, self._brackets[0])  # a finished trial: the first bracket
        n = 0
        for milestone, recorded in bracket._rungs:
            first = next((v for t, v in points if t >= milestone), None)
            if key not in recorded and first is not None and np.isfinite(first):
                recorded[key] = self._metric_op * first
                n += 1
        return n

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if not self.synced:
            self.sync()
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if not self.synced:
            self.sync()
        super().on_trial_complete(tune_controller, trial, result)


# --- pause and resume: freeze-thaw on time to click (scheduler.kind: freeze_thaw) ---------------------------

PAUSE = "PAUSE"
from .searcher import PAUSED_ATTR, PAUSED_WHY_ATTR  # noqa: E402  Optuna user attributes: episodes when paused
RESUMED_ATTR = "mann.resumed_at"  # ... episodes at which it was last resumed

# click_rank: why a trial ran on or was paused at its latest evaluation (FreezeThawRule.why; one word each, in the
# benchmark's spend breakdown; a paused trial's sentence is FreezeThawRule.reason, stored as mann.paused_why).
WHY = {
    "grace": "within the grace episodes: not judged yet",
    "resumed": "resumed after a pause, or nothing fresh left to run instead: runs to its end",
    "probe": "a probe: never paused, runs to its end",
    "waiting": "not clicked yet, before the horizon",
    "not_clicked": "paused: not clicked by the horizon",
    "kept": "clicked early among the study's clicks: runs to its end",
    "unranked": "clicked before enough other trials had: nothing to rank it by, runs on",
    "deferred": "paused: clicked before enough others had (defer_at)",
    "late": "paused: clicked later than the kept share of the study's clicks",
}


@dataclass
class FreezeThawRule:
    """Pause-and-resume bookkeeping on plain numbers (``scheduler.kind: freeze_thaw``; tested without Ray).

    A trial is never stopped: it is paused (its checkpoint kept) when the study's own curves say the next episodes
    buy more elsewhere, and resumed when they say it is its turn again. Two policies decide (``policy``).

    **click_rank** (the default): a curve's click time ranks it. Among the curves that click, the earlier a curve
    clicks the higher it ends (Spearman of click time with the final value -0.65 to -0.86 on the four recorded
    tables, AUROC 0.84-0.96 for "its configuration is at the benchmark's target"), while the value before the
    click points the wrong way on three of them. So, while the searcher has samples left:

    * a trial not clicked by the *horizon* is paused: the ``wait_quantile`` quantile of the click times of the
      study's other clicked trials, times ``wait_slack``; before ``min_clicked`` of them clicked, the horizon is
      ``first_rung`` x the budget (0.3: chosen on the four recorded tables, docs/freeze-thaw.md), doubled
      (again and again, up to the budget) while no trial clicked by it although ``escalate_after`` trials got
      there: on a task that clicks later than ``first_rung`` x the budget a fixed first horizon would pause every
      trial before its click until the episode cap ran out (docs/freeze-thaw.md, "Later clicks");
    * a trial that clicks later than the ``keep_quantile`` quantile of the others' click times is paused at its
      click (once ``min_clicked`` clicked); one that clicks earlier runs to the full budget;
    * a *probe* (``probes``: every ``probe_every``-th trial, by Optuna trial number, marked by
      :class:`FreezeThaw`) is never paused: it runs to its end. The clicks a study sees come from the trials it
      let run, so a horizon set from them alone only shortens and hides a task's late clicks (at 32 trials at
      once the first clicks seen are all early ones); and where a task's late clickers end highest (the rule's
      premise turned round) only full curves show it. The probes keep measuring both (since 2026-12-08 also
      past their click: docs/freeze-thaw.md, "When late clickers end highest").

    * a trial that clicks while fewer than ``min_clicked`` others have cannot be ranked: it runs to the end, or,
      with ``defer_at`` > 0, is *deferred*: paused at ``defer_at`` x the budget, and resumed ahead of fresh trials
      once the others' clicks rank it among the kept (its click at or before their ``keep_quantile``).

    Fresh trials take free slots first (but for deferred trials that now rank among the kept); once the searcher
    has no samples left, paused trials resume, the earliest click first (then the best latest value), and a
    resumed trial runs to its end. Nothing is paused before ``grace`` episodes.

    **index** (the rule before 2026-12-06): each trial, and a fresh one, gets an index, the *chance of ending near
    the top per episode it still needs*:

    * **click** (as :class:`PlateauRule`): plateau = median of the trials' plateau-span medians; a
      trial has clicked once it reached ``click_fraction`` of the way from the plateau to the incumbent.
    * **time to click, censored**: a Kaplan-Meier survival S(t) of the episodes to click pooled over the study's
      trials (a trial not clicked yet is censored at its episodes); past the last observed time S decays at the
      study's mean click hazard (clicks / episodes at risk). An unclicked trial at t clicks before the budget
      with q = 1 - S(max_t) / S(t); a fresh one with q0 = 1 - S(max_t); both floored at 0.5 / (n + 1) x the
      share of the budget left (n: trials seen), so a late click the study has not seen yet is not ruled out.
    * **value after a click**: pi = the share of clicked trials whose best value reached the bar (the incumbent
      minus the gap: ``margin`` or ``noise_factor`` x the study's evaluation noise), smoothed (k + 0.5) / (n + 1).
    * **index**: unclicked trial: q pi / (max_t - t); fresh trial: q0 pi / max_t; clicked trial: the share of
      trials clicked by t whose rise from t on would carry this trial's level (mean of its last two values) over
      the bar, smoothed, per episode left (1 per episode left when fewer than ``min_refs`` such trials).

    A running trial is paused when its index is below ``pause_ratio`` x the best alternative's (a paused trial,
    or a fresh one while the searcher has samples left), no earlier than ``grace`` episodes and ``min_run``
    episodes after it (re)started, and only once ``min_clicked`` trials clicked (before that nothing is known:
    every trial runs, as FIFO). A free slot goes to the best of the paused trials and a fresh one; once the
    searcher has no samples left, the paused trials resume best first. Larger values are better."""

    max_t: float
    grace: float = 0.0
    min_run: float = 0.0
    policy: str = "click_rank"
    wait_quantile: float = 0.9
    wait_slack: float = 1.0
    keep_quantile: float = 0.75
    first_rung: float = 0.3
    escalate_after: int = 8
    probe_every: int = 8
    defer_at: float = 0.0
    pause_ratio: float = 0.5
    margin: float = 0.02
    noise_factor: float = 3.0
    click_fraction: float = 0.25
    min_clicked: int = 4
    min_refs: int = 2
    history: dict[Any, list[tuple[float, float]]] = field(default_factory=dict)
    paused: dict[Any, float] = field(default_factory=dict)  # trial -> episodes when paused
    started: dict[Any, float] = field(default_factory=dict)  # trial -> episodes when it last (re)started
    probes: set = field(default_factory=set)  # trials never paused before their click (click_rank)
    why: dict[Any, str] = field(default_factory=dict)  # click_rank: trial -> WHY key of its latest decision
    reason: dict[Any, str] = field(default_factory=dict)  # click_rank: trial -> why it was paused, a sentence
    pauses: int = 0
    resumes: int = 0

    # --- evidence --------------------------------------------------------------------------------------------

    def record(self, key: Any, t: float, value: float) -> None:
        self._stats().record(key, t, value)  # the plateau rule's bookkeeping, on this rule's history

    def _stats(self) -> PlateauRule:
        return PlateauRule(max_t=self.max_t, margin=self.margin, noise_factor=self.noise_factor,
                           click_fraction=self.click_fraction, history=self.history)

    def bar(self) -> float:
        return self._stats().incumbent() - self._stats().gap()

    def clicks(self) -> dict[Any, float]:
        """Episodes to click by trial (inf: not clicked yet)."""
        s = self._stats()
        if not self.history:
            return {}
        level = s.click_level()
        if s.incumbent() - s.plateau() <= s.gap():  # nothing rose above the noise yet: no click seen
            return {k: math.inf for k in self.history}
        return {k: s.click_time(k, level) for k in self.history}

    def survival(self, clicks: dict[Any, float] | None = None):
        """S(t) = P(episodes to click > t): Kaplan-Meier over the trials, exponential tail past the last time."""
        clicks = self.clicks() if clicks is None else clicks
        obs = sorted((c if math.isfinite(c) else self.history[k][-1][0], math.isfinite(c)) for k, c in clicks.items())
        events = sum(e for _, e in obs)
        exposure = sum(t for t, _ in obs)
        hazard = events / exposure if exposure > 0 else 0.0
        steps: list[tuple[float, float]] = []
        s, at_risk, i = 1.0, len(obs), 0
        while i < len(obs):
            t, d, n = obs[i][0], 0, 0
            while i < len(obs) and obs[i][0] == t:
                d += obs[i][1]
                n += 1
                i += 1
            if d:
                s *= 1.0 - d / at_risk
                steps.append((t, s))
            at_risk -= n
        last = obs[-1][0] if obs else 0.0

        def S(t: float) -> float:
            v = 1.0
            for x, sv in steps:
                if x <= t:
                    v = sv
            return v * math.exp(-hazard * max(0.0, t - last))

        return S

    def ready(self, clicks: dict[Any, float] | None = None) -> bool:
        clicks = self.clicks() if clicks is None else clicks
        return sum(math.isfinite(c) for c in clicks.values()) >= self.min_clicked

    # --- indices: chance of ending near the top, per episode still needed ------------------------------------

    def _success_after_click(self, clicks: dict[Any, float], bar: float) -> float:
        reached = [max(v for _, v in self.history[k]) >= bar for k, c in clicks.items() if math.isfinite(c)]
        return (sum(reached) + 0.5) / (len(reached) + 1)

    def index(self, key: Any, clicks: dict[Any, float] | None = None, S=None) -> float:
        clicks = self.clicks() if clicks is None else clicks
        h = self.history[key]
        t = h[-1][0]
        left = max(self.max_t - t, 1.0)
        bar = self.bar()
        if not math.isfinite(clicks.get(key, math.inf)):
            S = S or self.survival(clicks)
            return self._click_chance(S, t, len(clicks)) * self._success_after_click(clicks, bar) / left
        level = float(np.mean([v for _, v in h[-2:]]))
        rises = []
        for k, c in clicks.items():
            if k == key or not c <= t:
                continue
            other = self.history[k]
            now = [v for x, v in other if x <= t]
            later = [v for x, v in other if x > t]
            if now and later:
                rises.append(max(later) - now[-1])
        if len(rises) < self.min_refs:
            return 1.0 / left
        return (sum(level + r >= bar for r in rises) + 0.5) / (len(rises) + 1) / left

    def _click_chance(self, S, t: float, n: int) -> float:
        """P(click before max_t | no click by t) from S, plus a floor that shrinks with the trials seen and the
        episodes left (0.5 / (n + 1) x share of the budget left): a study that saw no late click yet has not
        ruled one out."""
        st = S(t)
        q = max(0.0, 1.0 - S(self.max_t) / st) if st > 0 else 0.0
        return q + (1.0 - q) * 0.5 / (n + 1) * max(0.0, self.max_t - t) / self.max_t

    def fresh_index(self, clicks: dict[Any, float] | None = None, S=None) -> float:
        clicks = self.clicks() if clicks is None else clicks
        S = S or self.survival(clicks)
        return self._click_chance(S, 0.0, len(clicks)) * self._success_after_click(clicks, self.bar()) / self.max_t

    def best_alternative(self, exclude: Any, can_start_new: bool) -> tuple[Any, float]:
        """(the paused trial to resume, or None for a fresh one; its index); (None, -1) when there is none."""
        clicks = self.clicks()
        S = self.survival(clicks)
        best: tuple[Any, float] = (None, self.fresh_index(clicks, S) if can_start_new else -1.0)
        for k in sorted(self.paused, key=str):
            if k != exclude and k in self.history:
                i = self.index(k, clicks, S)
                if i > best[1]:
                    best = (k, i)
        return best

    # --- decisions -------------------------------------------------------------------------------------------

    def observe(self, key: Any, t: float, value: float, can_start_new: bool) -> str:
        """Record one evaluation of a running trial; CONTINUE or PAUSE (larger values are better)."""
        self.record(key, t, value)
        self.started.setdefault(key, 0.0)
        if t < self.grace and self.policy == "click_rank":
            self.why[key] = "grace"
        if key in self.paused or t >= self.max_t or t < self.grace:
            return CONTINUE
        if self.policy == "click_rank":
            return self._click_rank(key, t, can_start_new)
        if t - self.started[key] < self.min_run:
            return CONTINUE
        clicks = self.clicks()
        if not self.ready(clicks):
            return CONTINUE
        S = self.survival(clicks)
        alt, alt_index = self.best_alternative(key, can_start_new)
        if alt_index <= 0 or self.index(key, clicks, S) >= self.pause_ratio * alt_index:
            return CONTINUE
        self.pause(key, t)
        return PAUSE

    @staticmethod
    def _other_clicks(clicks: dict[Any, float], exclude: Any) -> list[float]:
        return [c for k, c in clicks.items() if k != exclude and math.isfinite(c)]

    def horizon(self, clicks: dict[Any, float], exclude: Any = None) -> float:
        """click_rank: the episodes by which a trial must have clicked (class doc)."""
        others = self._other_clicks(clicks, exclude)
        if len(others) >= self.min_clicked:
            return float(np.quantile(others, self.wait_quantile)) * self.wait_slack
        h = self.first_rung * self.max_t
        while h < self.max_t:  # nothing clicked by h although escalate_after trials got there: a later-clicking task
            if any(c <= h for c in others):
                break
            # (none of them clicked by h: the check above)
            reached = sum(1 for k, hist in self.history.items() if k != exclude and hist and hist[-1][0] >= h)
            if reached < self.escalate_after:
                break
            h = min(2.0 * h, self.max_t)
        return h

    def _click_rank(self, key: Any, t: float, can_start_new: bool) -> str:
        why, reason = self._rank(key, t, can_start_new)
        self.why[key] = why
        if reason is None:
            return CONTINUE
        self.reason[key] = reason
        self.pause(key, t)
        return PAUSE

    def _rank(self, key: Any, t: float, can_start_new: bool) -> tuple[str, str | None]:
        """click_rank's decision on a trial at ``t`` episodes: (its WHY key, the sentence if it is paused)."""
        if self.started[key] > 0 or not can_start_new:  # resumed, or nothing fresh to run instead: runs on
            return "resumed", None
        if key in self.probes:
            return "probe", None
        clicks = self.clicks()
        own = clicks.get(key, math.inf)
        if math.isfinite(own):
            others = self._other_clicks(clicks, key)
            if self._kept(own, others):
                return "kept", None
            if len(others) < self.min_clicked:
                if not (self.defer_at > 0 and t >= self.defer_at * self.max_t):
                    return "unranked", None  # nothing to rank it by yet: it runs on, unless deferred
                return "deferred", (f"clicked at {own:.0f} episodes while {len(others)} other trial(s) had "
                                    f"(min_clicked {self.min_clicked}): deferred at {t:.0f} until the study's "
                                    f"clicks rank it")
            return "late", (f"clicked at {own:.0f} episodes, later than {100 * self.keep_quantile:.0f} % of the "
                            f"study's {len(others)} other clicks (by {np.quantile(others, self.keep_quantile):.0f})")
        h = self.horizon(clicks, exclude=key)
        if t < h:
            return "waiting", None
        return "not_clicked", f"not clicked by {t:.0f} episodes, the horizon being {h:.0f}"

    def ranked_in(self, clicks: dict[Any, float] | None = None) -> list[Any]:
        """click_rank with ``defer_at``: the deferred trials (paused after their click) whose click now ranks
        among the kept; they resume ahead of fresh trials. Rebuilt from the pauses and curves alone, so a resumed
        driver sees the same."""
        if self.defer_at <= 0 or not self.paused:
            return []
        clicks = self.clicks() if clicks is None else clicks
        out = []
        for k in sorted(self.paused, key=str):
            own = clicks.get(k, math.inf)
            # deferred: paused after its click (not unclicked, nor a late clicker paused at its click)
            if own < self.paused[k] and self._kept(own, self._other_clicks(clicks, k)):
                out.append(k)
        return out

    def _kept(self, own: float, others: list[float]) -> bool:
        """click_rank: a click at or before the ``keep_quantile`` of the others' (``min_clicked`` of them at
        least) runs on."""
        return len(others) >= self.min_clicked and own <= float(np.quantile(others, self.keep_quantile))

    def pause(self, key: Any, t: float) -> None:
        self.paused[key] = float(t)
        self.pauses += 1

    def resume(self, key: Any) -> None:
        t = self.paused.pop(key, None)
        if t is not None:
            self.started[key] = t
            self.resumes += 1

    def wants_fresh(self) -> bool:
        """Whether a free slot should go to a fresh trial rather than a paused one."""
        if not self.paused:
            return True
        if self.policy == "click_rank":
            return not self.ranked_in()
        if not self.ready():
            return True
        return self.best_alternative(None, True)[0] is None

    def next_paused(self, among: set | None = None) -> Any:
        """The paused trial (of ``among``, if given) to resume first: the best index; before any click is seen,
        the earliest paused."""
        keys = sorted((k for k in self.paused if among is None or k in among), key=str)
        if not keys:
            return None
        if self.policy == "click_rank":  # deferred trials ranked in first; the earliest click, the best latest value
            clicks = self.clicks()
            keys = [k for k in self.ranked_in(clicks) if k in keys] or keys
            return min(keys, key=lambda k: (clicks.get(k, math.inf),
                                            -self.history[k][-1][1] if k in self.history else math.inf))
        if not self.ready():
            return min(keys, key=lambda k: self.paused[k])
        clicks = self.clicks()
        S = self.survival(clicks)
        return max(keys, key=lambda k: self.index(k, clicks, S) if k in self.history else 0.0)


class FreezeThaw(_StoredEvidence, FIFOScheduler):
    """Tune scheduler around :class:`FreezeThawRule`: returns PAUSE from ``on_trial_result`` (Tune saves the
    trial's checkpoint and frees its slot) and picks the paused trial to resume in ``choose_trial_to_run``.

    It needs its searcher wrapped in :class:`SlotLimiter` (``search.runner.build_tuner`` does it): Ray's
    ConcurrencyLimiter counts a paused trial as running, so no fresh trial would ever take a paused trial's slot.

    **Resume**: like :class:`PlateauStopping`, the evidence (curves, and which trials are paused since when) is
    read from the study's Optuna storage before the first decision of a driver; pauses and resumes are written
    there as trial attributes (``mann.paused_at``, ``mann.resumed_at``)."""

    def __init__(self, time_attr: str, metric: str, mode: str, max_t: float, max_concurrent: int, num_samples: int,
                 evidence: StudyEvidence | None = None, **rule: Any):
        super().__init__()
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self.max_concurrent, self.num_samples = max_concurrent, num_samples
        self.rule = FreezeThawRule(max_t=max_t, **rule)
        self.evidence = evidence
        self.synced = False
        self.live: set[str] = set()  # trials added and not finished (running, pending or paused)
        self.added: set[str] = set()
        self.numbers: dict[str, int] = {}

    def sync(self) -> int:
        """Merge the study's stored evaluations and pauses into the rule (once per driver); how many points."""
        n = super().sync()
        if self.evidence is None:
            return n
        for key, (paused_at, resumed_at) in self.evidence.pauses().items():
            if paused_at is not None:
                self.rule.paused[key] = paused_at
            if resumed_at is not None:
                self.rule.started[key] = resumed_at
        return n

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    # --- slots ---------------------------------------------------------------------------------------------

    def active(self) -> int:
        """Trials that hold or wait for a slot: live and not paused."""
        return len(self.live - set(self.rule.paused))

    def can_start_new(self) -> bool:
        return len(self.added) < self.num_samples

    def admits_new(self) -> bool:
        """Whether the searcher may start a fresh trial now (asked by :class:`SlotLimiter`)."""
        if not self.synced:
            self.sync()
        return self.active() < self.max_concurrent and self.rule.wants_fresh()

    # --- Tune's scheduler interface ------------------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self.synced:
            self.sync()
        self.added.add(trial.trial_id)
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # a finished trial of a restored study
            return
        self.live.add(trial.trial_id)
        number = trial.config.get(TRIAL_NUMBER_KEY)
        if isinstance(number, int):
            self.numbers[trial.trial_id] = number
            if probe_number(self.rule.probe_every, number):
                self.rule.probes.add(trial.trial_id)
        if trial.status == Trial.PENDING and trial.trial_id in self.rule.paused:
            # a restored study: Tune requeues every unfinished trial as PENDING and starts each PENDING trial it
            # has resources for, whatever the scheduler says; one the storage holds paused goes back to PAUSED
            # here (Tune files the trial under the status on_trial_add leaves) and waits for its turn
            trial.set_status(Trial.PAUSED)
        if trial.status == Trial.PAUSED:  # restored paused
            self.rule.paused.setdefault(trial.trial_id, float((trial.last_result or {}).get(self._time_attr, 0)))

    def _gone(self, trial) -> None:
        self.live.discard(trial.trial_id)
        self.rule.paused.pop(trial.trial_id, None)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._gone(trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._gone(trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._gone(trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        t, v = result.get(self._time_attr), result.get(self._metric)
        if not self.synced:
            self.sync()
        if t is None or v is None or result.get(DIVERGED_KEY) or not np.isfinite(v):
            return CONTINUE
        decision = self.rule.observe(trial.trial_id, float(t), float(v) if self._mode == "max" else -float(v),
                                     self.can_start_new())
        if decision == PAUSE:
            self._mark(trial.trial_id, paused_at=float(t), why=self.rule.reason.get(trial.trial_id))
            return FIFOScheduler.PAUSE
        return CONTINUE

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        if not self.synced:
            self.sync()
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED}
        for key in paused:
            self.rule.paused.setdefault(key, float((paused[key].last_result or {}).get(self._time_attr, 0)))
        if not paused or self.active() >= self.max_concurrent:
            return None
        if self.can_start_new() and self.rule.wants_fresh() and any(t.status == Trial.RUNNING for t in trials):
            return None  # the searcher fills the slot with a fresh trial (unless it has nothing: then resume)
        key = self.rule.next_paused(among=set(paused))
        if key is None:
            return None
        self.rule.resume(key)
        self._mark(key, resumed_at=self.rule.started.get(key, 0.0))
        return paused[key]

    def _mark(self, key: str, **kw) -> None:
        if self.evidence is not None and key in self.numbers:
            try:
                self.evidence.mark(self.numbers[key], **kw)
            except Exception:  # the storage down: the pause still happens; a resumed driver sees it from Tune
                pass

    def debug_string(self) -> str:
        r = self.rule
        return f"FreezeThaw: {len(r.paused)} paused now, {r.pauses} pauses, {r.resumes} resumes, {len(r.probes)} probes"


class SlotLimiter(Searcher):
    """At most the scheduler's ``max_concurrent`` trials hold a slot, a paused one not counted; a fresh trial
    only when :meth:`FreezeThaw.admits_new` says the slot should not go to a paused one. Wraps the searcher."""

    def __init__(self, searcher: Searcher, scheduler: FreezeThaw):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher, self.scheduler = searcher, scheduler

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if not self.scheduler.admits_new():
            return None
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {}  # no state of its own: the slots are the scheduler's, the samples the searcher's

    def set_state(self, state: dict) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
