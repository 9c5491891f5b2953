"""The trial protocol: one decision for how a trial ended, and a scheduler whose evidence survives a resume."""

from __future__ import annotations

import pickle

import numpy as np
import optuna
import pytest

from mann import metrics
from search.config import load_search_config
from search.protocol import (BudgetWatch, Ending, StudyFacts, TrialReport, decide, outcome_counts, selectable)
from search.study import Study

from .test_study import search_yaml

S = optuna.trial.TrialState
M = "val/acc_2plus"


def _report(episodes: int, value: float = 0.5, **kw) -> TrialReport:
    return TrialReport(episodes, {M: value}, **kw)


@pytest.mark.parametrize("report, facts, error, ending, state", [
    (_report(480), StudyFacts(480, "asha"), None, Ending.COMPLETED, S.COMPLETE),
    (_report(160), StudyFacts(480, "asha"), None, Ending.EARLY_STOPPED, S.PRUNED),
    (_report(160), StudyFacts(480, "none"), None, Ending.STUDY_ENDED, S.PRUNED),
    (_report(160), StudyFacts(480, "asha", cap_spent=True), None, Ending.EPISODE_CAP, S.PRUNED),
    (_report(160), StudyFacts(480, "none", cap_spent=True), None, Ending.EPISODE_CAP, S.PRUNED),
    (_report(160), StudyFacts(480, "plateau", time_up=True), None, Ending.TIME_BUDGET, S.PRUNED),
    (_report(160), StudyFacts(480, "asha", study_ended=True), None, Ending.STUDY_ENDED, S.PRUNED),
    (_report(480), StudyFacts(480, "asha", cap_spent=True), None, Ending.COMPLETED, S.COMPLETE),
    (_report(320, diverged=True, failure="loss nan"), StudyFacts(480, "asha"), None, Ending.DIVERGED, S.FAIL),
    (_report(480), StudyFacts(480, "asha"), "Traceback ...", Ending.FAILED, S.FAIL),
    (None, StudyFacts(480, "asha"), None, Ending.FAILED, S.FAIL),
    (None, StudyFacts(480, "asha", study_ended=True), None, Ending.STUDY_ENDED, S.PRUNED),
])
def test_one_decision_says_how_a_trial_ended(report, facts, error, ending, state):
    outcome = decide(report, facts, error)
    assert outcome.ending == ending and outcome.state == state
    assert outcome.mlflow_status == {S.COMPLETE: "FINISHED", S.PRUNED: "KILLED", S.FAIL: "FAILED"}[state]
    assert outcome.reason  # always says why
    if ending == Ending.EARLY_STOPPED:
        assert facts.scheduler in outcome.reason  # names the scheduler that stopped it
    assert "scheduler" not in outcome.reason or ending == Ending.EARLY_STOPPED


def test_reports_round_trip_through_a_tune_result():
    r = TrialReport(320, {M: 0.4, "train/loss": 1.2}, diverged=True, failure="loss nan at 320")
    back = TrialReport.from_result({**r.to_result(), "training_iteration": 3, "trial_id": "x"})
    assert back == r and back.value(M) == 0.4
    assert TrialReport.from_result({"training_iteration": 1}) is None  # no evaluation in it
    assert TrialReport(1, {M: float("nan")}).value(M) is None


def test_the_budget_watch_counts_each_trials_latest_episodes():
    watch = BudgetWatch(max_episodes=480, scheduler="none", cap=1000, time_budget_s=None)
    watch.observe("a", _report(400))
    watch.observe("b", _report(400))
    watch.observe("a", _report(480))  # the latest count, not a sum
    assert watch.episodes == 880 and not watch.facts().cap_spent
    watch.observe("b", _report(520))
    assert watch.facts().cap_spent and not watch.facts().time_up


def test_selection_takes_every_trial_that_trained_without_failing():
    assert selectable("completed") and selectable("early_stopped") and selectable("episode_cap")
    assert not selectable("diverged") and not selectable("failed") and not selectable("error")
    assert not selectable(None)
    counts = outcome_counts([decide(_report(480), StudyFacts(480)), None])
    assert counts["completed"] == 1 and counts["running"] == 1 and counts["failed"] == 0


def _plateau_study(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = search_yaml(tmp_path, scheduler={"kind": "plateau", "grace_episodes": 60})
    study = Study.create(load_search_config(f, ["overrides.train.episodes=600", "overrides.train.eval_every=30"]), [],
                         f"sqlite:///{tmp_path / 'm.db'}")
    study.local_dir.mkdir(parents=True, exist_ok=True)
    return study


def _results(n: int = 12, steps: int = 20, seed: int = 2) -> tuple[list[str], list[tuple[str, int, float]]]:
    """Trials started one after another (every 4 evaluations), each at chance (0.33) until it clicks at its own
    time to its own height, with noise; their results in arrival order."""
    rng = np.random.default_rng(seed)
    arrivals = []
    for i in range(n):
        click, top = rng.integers(2, steps), rng.uniform(0.36, 0.95)
        for k in range(steps):
            v = 0.33 + (top - 0.33) * (k >= click) + rng.normal(0, 0.01)
            arrivals.append((4 * i + k, f"trial_{i}", (k + 1) * 30, float(v)))
    return [f"trial_{i}" for i in range(n)], [(k, t, v) for _, k, t, v in sorted(arrivals)]


def _drive(scheduler, results, stopped: set[str], searcher=None) -> list[tuple[str, int, str]]:
    """Hand each result to the scheduler, then (unless stopped) to the searcher, as Tune does; the decisions."""
    from ray.tune.experiment import Trial

    decisions = []
    for k, t, v in results:
        if k in stopped:
            continue
        result = TrialReport(t, {M: v}).to_result()
        d = scheduler.on_trial_result(None, Trial("fn", config={}, trial_id=k, stub=True), result)
        decisions.append((k, t, d))
        if d == "STOP":
            stopped.add(k)
        if searcher is not None:
            searcher.on_trial_result(k, result)
            if d == "STOP":
                searcher.on_trial_complete(k, result)
    return decisions


def _numbered_searcher(study, names):
    from search.runner import make_searcher

    searcher = make_searcher(study)
    for k in names:  # the Optuna trials of these Tune trials, as suggest makes them
        searcher.numbers[k] = searcher.optuna.study.ask().number
        searcher.optuna.trial(searcher.numbers[k]).set_user_attr("tune_trial_id", k)
    return searcher


def test_a_resumed_plateau_scheduler_decides_as_an_uninterrupted_one(tmp_path):
    """The driver dies halfway through the study's results: the scheduler Tune restores (as pickled when the
    study started) rebuilds its evidence from the Optuna storage and decides every later result as the
    scheduler of an uninterrupted study does."""
    from search.runner import make_scheduler

    study, other = _plateau_study(tmp_path), _plateau_study(tmp_path / "other")
    curves, order = _results()
    # the uninterrupted study (its own storage)
    whole = _drive(make_scheduler(other), order, set(), _numbered_searcher(other, curves))
    assert any(d == "STOP" for _, _, d in whole), "the rule must stop something for this test to mean anything"

    # the interrupted one: its scheduler pickled at the start, as Tune does, and the driver killed midway
    stopped: set[str] = set()
    scheduler = make_scheduler(study)
    at_start = pickle.dumps(scheduler)
    searcher = _numbered_searcher(study, curves)
    half = len(order) // 2
    first = _drive(scheduler, order[:half], stopped, searcher)
    restored = pickle.loads(at_start)
    assert restored.rule.history == {}  # what Tune hands a resumed study
    second = _drive(restored, order[half:], stopped, pickle.loads(pickle.dumps(searcher)))
    assert any(d == "STOP" for _, _, d in second)  # decisions after the kill that need the evidence before it
    assert first + second == whole
    assert len(restored.rule.history) == len(curves)


def test_a_scheduler_without_storage_evidence_would_decide_otherwise(tmp_path):
    """The check above can fail: without the storage, a restored scheduler decides differently."""
    from search.runner import make_scheduler

    study = _plateau_study(tmp_path)
    _, order = _results()
    whole = _drive(make_scheduler(study), order, set())
    blind = make_scheduler(study)
    blind.evidence = None
    stopped: set[str] = set()
    first = _drive(make_scheduler(study), order[: len(order) // 2], stopped)
    assert first + _drive(blind, order[len(order) // 2:], stopped) != whole
