"""How fast any search that cannot judge a configuration before its curve clicks could reach the benchmark's
target: the *oracle screen*, a reference for the speed-ups a table allows (an instrument over recorded curves,
not a method a study can run).

The oracle samples (configuration, seed) curves of the table uniformly at random, as random search does, and
learns a configuration's true value (its mean final objective over seeds) the moment its curve clicks. A curve
clicks as in ``mann-search curves signals`` (the plateau rule's level: ``click_fraction`` of the way from the
plateau, the median of the curves' medians over the plateau span, to the best final value); a curve that never clicks is
known at the full budget. The oracle watches each curve until it clicks or until the *deadline*, the latest
click time of any curve of a configuration at or under the target regret (a curve not clicked by then cannot be
one of those), and stops at the first curve of such a configuration. Its episodes to the target: the episodes
of every curve it watched. Random sampling, perfect judgement at the click, no episode spent after it: a search
that samples no better than at random and cannot tell a configuration before its click needs at least this many.
Only a sampler that finds the good configurations more often than at random (TPE, where the space has structure)
or a signal that judges a curve before its click (``mann-search curves signals`` measures them) can beat it.

The speed-up bound is the baseline's median episodes to the target over the oracle's median.

:class:`OracleAtClick` is the same judgement as a scheduler, run with the study's own sampler (the benchmark's
``tpe+oracle@click`` row): where TPE samples better than at random it goes past the bound. A yardstick, not a
ceiling: it waits for the latest good click, and a rule that gives up on late clickers sooner can beat it where
the good configurations click early.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray.tune.schedulers import TrialScheduler

from search import FreezeThaw

from .signals import CLICK_FRACTION, click_labels, curve_plateau


def click_episodes(table, click_fraction: float = CLICK_FRACTION) -> list[list[float]]:
    """Per configuration, per usable curve: episodes to its click (the full budget when it never clicks)."""
    max_t = float(table.search.max_episodes)
    curves = [c for cs in table.curves for c in cs]

    def vals(c):
        return [table.sign * float(v) if v is not None and math.isfinite(float(v)) else -math.inf
                for v in c["objective"]]

    _, level = click_labels(np.array([vals(c)[-1] for c in curves]),
                            np.array([curve_plateau(c, max_t, table.sign) for c in curves]), click_fraction)
    return [[next((min(float(e), max_t) for e, v in zip(c["episodes"], vals(c)) if v >= level), max_t)
             for c in cs] for cs in table.curves]


def oracle_screen(table, target_regret: float, draws: int = 4000, seed: int = 0) -> dict[str, Any]:
    """The oracle screen of the module doc on ``table`` (:class:`search.bench.table.Table`) for a target in
    points of regret: ``{"episodes_to_target": median over draws, "deadline": as a fraction of the budget,
    "good_configs": how many configurations are at or under the target}``."""
    good = good_configurations(table, target_regret)
    clicks = click_episodes(table)
    deadline = _deadline(clicks, good)
    rng = np.random.default_rng(seed)
    flat = [(i, c) for i, cs in enumerate(clicks) for c in cs]
    # each configuration is drawn uniformly, then one of its curves: weight a curve by 1 / its configuration's
    p = np.array([1.0 / (len(clicks) * len(clicks[i])) for i, _ in flat])
    cost = np.array([min(c, deadline) for _, c in flat])
    hit = np.array([bool(good[i]) for i, _ in flat])
    spent = np.empty(draws)
    for d in range(draws):
        total = 0.0
        while True:
            picks = rng.choice(len(flat), size=64, p=p)
            first = np.flatnonzero(hit[picks])
            if len(first):
                total += float(cost[picks[: first[0] + 1]].sum())
                break
            total += float(cost[picks].sum())
        spent[d] = total
    return {"episodes_to_target": float(np.median(spent)), "deadline": round(deadline / table.search.max_episodes, 3),
            "good_configs": int(good.sum())}


def good_configurations(table, target_regret: float) -> np.ndarray:
    """Per configuration: whether its regret (points under the table's best) is at or under the target."""
    return 100.0 * (table.best - table.value) <= target_regret + 1e-9


def _deadline(clicks: list[list[float]], good: np.ndarray) -> float:
    return max(c for i, cs in enumerate(clicks) if good[i] for c in cs)


class OracleAtClick(FreezeThaw):
    """The scheduler half of the oracle screen, run with the study's own sampler (``tpe+oracle@click``, a
    reference row of the simulated engine, not a method: it reads the table). Every trial runs until its curve
    clicks or the deadline (module doc); then a trial of a configuration at or under the target goes on to the
    full budget and any other is paused (resumed, once, to its end only when the searcher has no samples
    left, as freeze_thaw resumes). What a pause-and-resume scheduler with perfect judgement at the click, waiting
    for the latest good click, reaches with TPE."""

    def __init__(self, study, table, salt: int, target_regret: float):
        from mann import metrics

        search = study.search
        primary = search.config.primary
        super().__init__(time_attr=metrics.EPISODES, metric=primary.metric, mode=primary.mode,
                         max_t=search.max_episodes, max_concurrent=search.config.budget.max_concurrent or 2,
                         num_samples=search.config.budget.num_samples)
        self.table, self.salt = table, salt
        self.clicks = click_episodes(table)
        self.good = good_configurations(table, target_regret)
        self.deadline = _deadline(self.clicks, self.good)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        t = result.get(self._time_attr)
        if t is None:
            return TrialScheduler.CONTINUE
        cfg, seed = self.table.curve_of(trial.config, self.salt)
        t = float(t)
        if self.good[cfg] or trial.trial_id in self.rule.started or t >= self.rule.max_t \
                or t < min(self.clicks[cfg][seed], self.deadline):  # (a resumed trial runs on)
            return TrialScheduler.CONTINUE
        self.rule.pause(trial.trial_id, t)
        return TrialScheduler.PAUSE
