"""The pause-and-resume scheduler (``scheduler.kind: freeze_thaw``): the pure rule on hand-made curves, its
evidence rebuilt from the Optuna storage after a driver restart, and a real trial paused and resumed exactly."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

import search  # noqa: F401  (before Ray: token auth)
from mann.config import ConfigError
from search.config import load_search_config
from search.protocol import TRIAL_NUMBER_KEY, Ending, StudyFacts, TrialReport, decide
from search.schedulers import CONTINUE, PAUSE, STOP, WHY, FreezeThawRule
from search.study import Study

from .test_study import search_yaml

M = "val/acc_2plus"
T = [1500 * i for i in range(1, 21)]  # 1.5k .. 30k


def _curve(click: float | None, top: float, plateau: float = 0.45) -> list[float]:
    if click is None:
        return [plateau] * len(T)
    return [plateau + (top - plateau) * min(1.0, max(0.0, (t - click) / 6000)) for t in T]


def _rule(**kw) -> FreezeThawRule:
    """The index policy, as it was tuned (the tests of the click_rank policy build theirs)."""
    return FreezeThawRule(max_t=30000, grace=4500, min_run=4500,
                          **{"noise_factor": 0.0, "policy": "index", "min_clicked": 2, **kw})


def _ranker(**kw) -> FreezeThawRule:
    return FreezeThawRule(max_t=30000, grace=4500, **{"noise_factor": 0.0, **kw})


def test_click_rank_pauses_the_unclicked_at_the_first_rung_until_enough_trials_clicked():
    rule = _ranker()  # with no click seen the horizon is first_rung (0.3) x 30k = 9k
    decisions = {t: rule.observe("a", t, v, can_start_new=True) for t, v in zip(T, _curve(None, 0))
                 if "a" not in rule.paused}
    assert rule.paused == {"a": 9000} and decisions[9000] == PAUSE
    assert all(d == CONTINUE for t, d in decisions.items() if t < 9000)
    rule = _ranker()  # nothing fresh to run instead: it runs on
    for t, v in zip(T, _curve(None, 0)):
        assert rule.observe("b", t, v, can_start_new=False) == CONTINUE


def test_click_rank_horizon_and_keep_follow_the_studys_click_times():
    rule = _background(_ranker(click_fraction=0.5))
    # references clicking at 3k, 6k, 9k, 12k (their curves cross half-way 3k after they start rising)
    _references(rule, [_curve(c, 0.8) for c in (0, 3000, 6000, 9000)])
    clicks = rule.clicks()
    assert sorted(c for c in clicks.values() if math.isfinite(c)) == [3000, 6000, 9000, 12000]
    # horizon: the 0.9 quantile of 3k..12k (linear interpolation) = 11.1k, x wait_slack 1
    assert rule.horizon(clicks, exclude="x") == pytest.approx(11100)
    paused_at = next(t for t, v in zip(T, _curve(None, 0)) if rule.observe("flat", t, v, True) == PAUSE)
    assert paused_at == 12000  # the first evaluation at or past the horizon
    assert rule.why["flat"] == "not_clicked"
    assert rule.reason["flat"] == "not clicked by 12000 episodes, the horizon being 11100"
    # keep: clicking at or before the 0.75 quantile of the others' clicks (3k..12k: 9.75k) runs to the end
    for t, v in zip(T, _curve(6000, 0.8)):  # clicks at 9k
        assert rule.observe("early", t, v, True) == CONTINUE
    assert rule.why["early"] == "kept" and "early" not in rule.reason
    late = [(t, rule.observe("late", t, v, True)) for t, v in zip(T, _curve(9000, 0.8)) if "late" not in rule.paused]
    assert late[-1] == (12000, PAUSE)  # paused at its click (12k, later than 9.75k)
    assert rule.why["late"] == "late" and rule.reason["late"].startswith("clicked at 12000 episodes, later than 75 %")
    assert set(rule.why.values()) <= set(WHY)
    # resume order once the searcher has no samples left: the earliest click first
    assert rule.wants_fresh() and rule.next_paused() == "late"
    rule.resume("late")
    assert rule.started["late"] == 12000
    for t, v in zip(T[8:], _curve(9000, 0.8)[8:]):  # a resumed trial runs on
        assert rule.observe("late", t, v, True) == CONTINUE


def test_a_probe_is_never_paused_and_the_scheduler_marks_every_nth_trial_by_number():
    from ray.tune.experiment import Trial

    from search.schedulers import FreezeThaw

    rule = _ranker(click_fraction=0.5)
    _references(rule, [_curve(c, 0.8) for c in (0, 3000, 6000, 9000)])  # clicks 3k..12k: horizon 11.1k
    rule.probes.add("probe")
    for t, v in zip(T, _curve(None, 0)):  # never clicks: a probe runs to the end, the same curve is paused
        assert rule.observe("probe", t, v, True) == CONTINUE
    assert next(t for t, v in zip(T, _curve(None, 0)) if rule.observe("plain", t, v, True) == PAUSE) == 12000
    rule.probes.add("late probe")  # a probe that clicks late is not paused at its click either: it runs to its end
    assert all(rule.observe("late probe", t, v, True) == CONTINUE for t, v in zip(T, _curve(15000, 0.8)))
    assert "late probe" not in rule.paused and rule.why["late probe"] == "probe"

    sched = FreezeThaw("episodes", M, "max", max_t=30000, max_concurrent=2, num_samples=64, probe_every=8)
    for n in range(20):
        trial = Trial("run_trial", config={TRIAL_NUMBER_KEY: n}, trial_id=f"id{n}", stub=True)
        sched.on_trial_add(None, trial)
    assert sched.rule.probes == {"id7", "id15"}
    none = FreezeThaw("episodes", M, "max", max_t=30000, max_concurrent=2, num_samples=64, probe_every=0)
    none.on_trial_add(None, Trial("run_trial", config={TRIAL_NUMBER_KEY: 7}, trial_id="id7", stub=True))
    assert not none.rule.probes


def test_click_rank_first_horizon_doubles_while_trials_get_there_and_none_clicked_by_it():
    """A task that clicks later than first_rung x the budget: with a fixed first horizon every trial would be
    paused before its click until the episode cap ran out (regret 9.9 against ASHA's 4.8 on the quickstart table
    shifted by 30 % of the budget); once escalate_after trials reached the horizon unclicked, it doubles."""
    def flat_to(rule, key, until):
        for t, v in zip(T, _curve(None, 0)):
            if t <= until:
                rule.record(key, t, v)

    def paused_at(rule, key, curve):
        return next((t for t, v in zip(T, curve) if rule.observe(key, t, v, True) == PAUSE), None)

    rule = _ranker(escalate_after=3)
    for k in range(2):
        flat_to(rule, f"p{k}", 9000)  # two paused at the first horizon, unclicked: not enough to escalate
    assert paused_at(rule, "x", _curve(None, 0)) == 9000
    rule = _ranker(escalate_after=3)
    for k in range(3):
        flat_to(rule, f"p{k}", 9000)
    assert rule.horizon(rule.clicks(), exclude="x") == 18000
    assert paused_at(rule, "x", _curve(None, 0)) == 18000
    for k in range(3):
        flat_to(rule, f"q{k}", 18000)  # three more got to 18k, still nothing: 36k, capped at the budget
    assert rule.horizon(rule.clicks(), exclude="y") == 30000
    # a trial clicked by the first horizon: no escalation (the click times take over from min_clicked on)
    rule = _ranker(escalate_after=3)
    for k in range(5):
        flat_to(rule, f"p{k}", 9000)
    for t, v in zip(T, _curve(3000, 0.8)):
        rule.record("early", t, v)
    assert rule.clicks()["early"] <= 9000 and rule.horizon(rule.clicks(), exclude="x") == 9000


def test_click_rank_defers_a_trial_that_clicks_before_it_can_be_ranked_and_resumes_it_once_it_ranks_in():
    """defer_at: a trial that clicks while fewer than min_clicked others have is paused at defer_at x the budget
    instead of running to the end on no evidence; once the others' clicks rank it among the kept it resumes ahead
    of fresh trials (a late clicker paused at its click does not); without defer_at it runs to the end."""
    first = _curve(0, 0.8)  # clicks at 3k (half-way at click_fraction 0.5)
    plain = _background(_ranker(click_fraction=0.5))
    assert all(plain.observe("first", t, v, True) == CONTINUE for t, v in zip(T, first))

    rule = _background(_ranker(click_fraction=0.5, defer_at=0.5))  # deferred at 15k
    decisions = [(t, rule.observe("first", t, v, True)) for t, v in zip(T, first) if "first" not in rule.paused]
    assert decisions[-1] == (15000, PAUSE) and all(d == CONTINUE for _, d in decisions[:-1])
    assert rule.ranked_in() == [] and rule.wants_fresh()  # no other click yet: fresh trials take the slots
    _references(rule, [_curve(c, 0.8) for c in (3000, 6000, 9000)])  # clicks at 6k, 9k, 12k: three of four
    assert rule.ranked_in() == [] and rule.wants_fresh()
    late = [(t, rule.observe("late", t, v, True)) for t, v in zip(T, _curve(7500, 0.8)) if "late" not in rule.paused]
    assert late[-1] == (10500, PAUSE)  # a fourth click, later than the kept ones (9.75k): paused at its click
    assert rule.ranked_in() == ["first"] and not rule.wants_fresh() and rule.next_paused() == "first"
    rule.resume("first")
    assert rule.ranked_in() == [] and rule.wants_fresh()  # the late clicker waits, as before
    for t, v in zip(T[10:], first[10:]):  # the resumed trial runs to the end
        assert rule.observe("first", t, v, True) == CONTINUE


def _references(rule: FreezeThawRule, curves: list[list[float]]) -> None:
    for k, c in enumerate(curves):
        for t, v in zip(T, c):
            rule.record(f"ref{k}", t, v)


def _background(rule: FreezeThawRule, n: int = 3) -> FreezeThawRule:
    """Trials flat at the plateau (0.45) all along, as most of a real study's are between 10 and 30 % of the
    budget, where the study's plateau is read: the few early clickers of these tests do not move it."""
    for k in range(n):
        for t, v in zip(T, _curve(None, 0)):
            rule.record(f"flat{k}", t, v)
    return rule


def test_nothing_is_paused_before_clicks_are_seen_nor_without_an_alternative():
    rule = _rule()
    for t, v in zip(T, _curve(None, 0)):  # alone, no click anywhere: runs like FIFO
        assert rule.observe("a", t, v, can_start_new=True) == CONTINUE
    rule = _rule()
    _references(rule, [_curve(3000, 0.75), _curve(4500, 0.7), _curve(None, 0)])
    for t, v in zip(T, _curve(None, 0)):  # a flat trial, but no fresh trial and nothing paused to run instead
        assert rule.observe("b", t, v, can_start_new=False) == CONTINUE


def test_a_flat_trial_is_paused_once_the_study_clicks_early_and_a_clicked_top_trial_runs_on():
    rule = _rule()
    _references(rule, [_curve(3000, 0.75), _curve(4500, 0.7), _curve(6000, 0.74), _curve(None, 0)])
    paused_at = None
    for t, v in zip(T, _curve(None, 0)):
        if rule.observe("flat", t, v, can_start_new=True) == PAUSE:
            paused_at = t
            break
    assert paused_at >= 4500 and rule.paused == {"flat": paused_at}
    for t, v in zip(T, _curve(3000, 0.76)):
        assert rule.observe("top", t, v, can_start_new=True) == CONTINUE
    # a paused trial keeps a positive index (it may be resumed), below a fresh trial's here
    S = rule.survival()
    assert 0 < rule.index("flat") < rule.fresh_index() and 0 < S(30000) < 1
    assert rule.wants_fresh() and rule.next_paused() == "flat"


def test_late_clicks_in_the_study_make_an_unclicked_trial_worth_resuming():
    early = _rule()
    _references(early, [_curve(3000, 0.75), _curve(3000, 0.7), _curve(4500, 0.74), _curve(None, 0)])
    late = _rule()
    _references(late, [_curve(3000, 0.75), _curve(16500, 0.76), _curve(18000, 0.77), _curve(None, 0)])
    for rule in (early, late):
        for t, v in zip(T[:8], _curve(None, 0)):
            rule.record("x", t, v)
    # the chance of clicking before the budget, given no click by 12k, follows the study's click times
    assert late.index("x") > 3 * early.index("x")


def test_kaplan_meier_with_censoring_by_hand():
    rule = _rule(click_fraction=0.5)
    for k, (click, n) in enumerate([(3000, 20), (6000, 20), (None, 5), (None, 20)]):  # censored at 7.5k, 30k
        for t, v in zip(T[:n], _curve(click, 0.85)):
            rule.record(k, t, v)
    clicks = rule.clicks()
    assert clicks[0] == 6000 and clicks[1] == 9000 and math.isinf(clicks[2]) and math.isinf(clicks[3])
    S = rule.survival(clicks)
    # at 6k: 1 of 4 at risk clicks -> 3/4; at 9k: the one censored at 7.5k left, 1 of 2 -> 3/8
    assert S(5999) == 1.0 and S(6000) == pytest.approx(0.75) and S(9000) == pytest.approx(0.375)
    assert S(30000) == pytest.approx(0.375)  # the last time observed is 30k: no tail


def test_the_rule_is_strict_in_yaml(tmp_path):
    f = search_yaml(tmp_path, scheduler={"kind": "freeze_thaw", "grace_episodes": 160,
                                         "freeze_thaw": {"pause_ratio": 0.3, "min_run_episodes": 320}})
    cfg = load_search_config(f).config.scheduler
    assert cfg.kind == "freeze_thaw" and cfg.freeze_thaw.pause_ratio == 0.3
    with pytest.raises(ConfigError, match="freeze_thaw.pause_ratoi"):
        load_search_config(f, ["scheduler.freeze_thaw.pause_ratoi=0.2"])
    with pytest.raises(ConfigError, match="pause_ratio"):
        load_search_config(f, ["scheduler.freeze_thaw.pause_ratio=2"])
    with pytest.raises(ConfigError, match="escalate_after"):
        load_search_config(f, ["scheduler.freeze_thaw.escalate_after=0"])
    assert load_search_config(f, ["scheduler.freeze_thaw.escalate_after=3"]).config.scheduler.freeze_thaw.escalate_after == 3


def test_status_shows_the_snapshot_scheduler_settings_of_its_kind(tmp_path):
    from search.runner import scheduler_settings

    f = search_yaml(tmp_path, scheduler={"kind": "freeze_thaw", "grace_episodes": 160,
                                         "freeze_thaw": {"escalate_after": 5}})
    shown = scheduler_settings(load_search_config(f).config.scheduler)
    assert shown["kind"] == "freeze_thaw" and shown["grace_episodes"] == 160
    assert shown["freeze_thaw"]["escalate_after"] == 5 and shown["freeze_thaw"]["first_rung"] == 0.3
    assert "plateau" not in shown and "reduction_factor" not in shown
    asha = scheduler_settings(load_search_config(f, ["scheduler.kind=asha"]).config.scheduler)
    assert asha == {"kind": "asha", "grace_episodes": 160, "reduction_factor": 2}


def test_paused_at_the_study_end_is_pruned_with_the_reason():
    o = decide(TrialReport(160, {M: 0.4}), StudyFacts(480, "freeze_thaw", cap_spent=True), paused=True)
    assert o.ending == Ending.PAUSED_AT_END and o.state.name == "PRUNED" and "episode cap" in o.reason
    assert decide(TrialReport(480, {M: 0.4}), StudyFacts(480, "freeze_thaw"), paused=True).ending == Ending.COMPLETED
    # freeze_thaw never stops: a trial it did not pause ended with the study
    assert decide(TrialReport(160, {M: 0.4}), StudyFacts(480, "freeze_thaw")).ending == Ending.STUDY_ENDED


def test_the_console_line_of_a_trial_paused_when_the_study_ended_says_paused_at_end(tmp_path):
    """The trial lines `mann-search run` prints decide the ending as MLflow and Optuna do (search.decide with
    paused): a trial the scheduler held paused when the study ended is paused_at_end, not episode_cap."""
    import io

    from ray.tune.experiment import Trial

    from search.console import trial_lines

    study = _study(tmp_path)
    out = io.StringIO()
    lines = trial_lines(study, out=out)
    held, cut = (Trial("replay", config={TRIAL_NUMBER_KEY: n}, trial_id=f"t{n}", stub=True) for n in (0, 1))
    for trial, status in ((held, Trial.PAUSED), (cut, Trial.RUNNING)):
        trial.update_last_result({"episodes": 180, M: 0.4})
        trial.set_status(status)
        lines.on_trial_start(0, [held, cut], trial)
    lines.on_step_end(0, [held, cut])
    lines.on_experiment_end([held, cut])
    text = out.getvalue()
    assert "paused_at_end at 180 episodes" in text and text.count("paused_at_end") == 1
    assert "at 180 episodes" in text.splitlines()[-1] and "paused_at_end" not in text.splitlines()[-1]


def test_the_console_says_when_a_trial_is_paused_and_when_it_resumes(tmp_path):
    """A pause and a resume each print a line (where, the objective, that the checkpoint is kept); a trial's
    first start still says started."""
    import io

    from ray.tune.experiment import Trial

    from search.console import trial_lines

    study = _study(tmp_path)
    out = io.StringIO()
    lines = trial_lines(study, out=out)
    trial = Trial("replay", config={TRIAL_NUMBER_KEY: 3}, trial_id="t3", stub=True)
    trial.set_status(Trial.RUNNING)
    lines.on_trial_start(0, [trial], trial)
    trial.update_last_result({"episodes": 240, M: 0.25})
    lines.on_step_end(0, [trial])
    assert out.getvalue().count("\n") == 1  # running: no line
    trial.set_status(Trial.PAUSED)
    lines.on_step_end(1, [trial])
    lines.on_step_end(2, [trial])  # still paused: one line only
    trial.set_status(Trial.RUNNING)
    lines.on_trial_start(3, [trial], trial)
    text = out.getvalue().splitlines()
    assert len(text) == 3, text
    assert text[0].endswith("  started")
    assert f"paused at 240 episodes, {M} 0.2500 (checkpoint kept" in text[1]
    assert text[2].endswith("resumed at 240 episodes")
    # paused again, then the study ends (its episode cap): Tune terminates the paused trial as it is, and a step
    # may end between; its end line says paused_at_end, as Optuna and MLflow record it
    trial.update_last_result({"episodes": 300, M: 0.3})
    trial.set_status(Trial.PAUSED)
    lines.on_step_end(4, [trial])
    trial.set_status(Trial.TERMINATED)
    lines.on_step_end(5, [trial])
    lines.on_experiment_end([trial])
    end = out.getvalue().splitlines()[-1]
    assert "paused_at_end at 300 episodes" in end, end


def test_a_probe_says_so_on_the_console_and_in_mlflow_and_a_paused_run_is_tagged(tmp_path, mlflow_server):
    """Trial 7 of a freeze_thaw study (probe_every 8) is a probe: its start line says so and its MLflow run has
    ``mann.probe``; trial 3 is not. A paused trial's run is tagged ``mann.paused`` (with where, and why: the
    sentence the scheduler stored in Optuna, which its console line also ends with), and ``false`` again once it
    runs."""
    import io

    import mlflow
    from ray.tune.experiment import Trial

    from search.console import trial_lines
    from search.lineage import make_callback
    from search.tracking import StudyTracker

    from search.runner import make_searcher
    from search.schedulers import StudyEvidence

    study = _study(tmp_path)
    searcher = make_searcher(study)
    for _ in range(8):
        searcher.optuna.study.ask()
    why = "not clicked by 240 episodes, the horizon being 240"
    StudyEvidence(study).mark(3, paused_at=240, why=why)  # as the scheduler does when it pauses trial 3
    out = io.StringIO()
    lines = trial_lines(study, out=out)
    tracker = StudyTracker(mlflow_server.uri, "probe-tags", study.key, tmp_path / "staging")
    lineage = make_callback(tracker, study, fresh=True)
    lineage.setup()
    probe, plain = (Trial("replay", config={TRIAL_NUMBER_KEY: n}, trial_id=f"t{n}", stub=True) for n in (7, 3))
    for trial in (probe, plain):
        trial.set_status(Trial.RUNNING)
        lines.on_trial_start(0, [probe, plain], trial)
        lineage.on_trial_start(0, [probe, plain], trial)
    text = out.getvalue().splitlines()
    assert text[0].endswith("started (a probe: never paused)") and text[1].endswith("  started")
    plain.update_last_result({"episodes": 240, M: 0.25})
    plain.set_status(Trial.PAUSED)
    lineage.on_step_end(1, [probe, plain])
    lines.on_step_end(1, [probe, plain])
    assert out.getvalue().splitlines()[-1].endswith(f"(checkpoint kept; resumes when its turn comes): {why}")
    assert tracker.flush(force=True)
    client = mlflow.MlflowClient(mlflow_server.uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "probe-tags"]
    runs = {r.info.run_name.split(" ")[0]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("mann.role") == "trial"}
    assert runs["t07"].data.tags.get("mann.probe") == "true" and "mann.probe" not in runs["t03"].data.tags
    assert runs["t03"].data.tags.get("mann.paused") == "true" and runs["t03"].data.tags.get("mann.paused_at") == "240"
    assert runs["t03"].data.tags.get("mann.paused_why") == why
    plain.set_status(Trial.RUNNING)
    lineage.on_step_end(2, [probe, plain])
    assert tracker.flush(force=True)
    tags = client.get_run(runs["t03"].info.run_id).data.tags
    assert tags.get("mann.paused") == "false" and not tags.get("mann.paused_why")


# --- resume: the evidence (curves and pauses) rebuilt from the Optuna storage ---------------------------------


def _study(tmp_path, scheduler=None, max_concurrent=3):
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = search_yaml(tmp_path, scheduler=scheduler or {"kind": "freeze_thaw", "grace_episodes": 90},
                    budget={"num_samples": 12, "max_concurrent": max_concurrent})
    study = Study.create(load_search_config(f, ["overrides.train.episodes=600", "overrides.train.eval_every=30"]), [],
                         f"sqlite:///{tmp_path / 'm.db'}")
    study.local_dir.mkdir(parents=True, exist_ok=True)
    return study


def _results(n: int = 12, steps: int = 20, seed: int = 3):
    rng = np.random.default_rng(seed)
    arrivals = []
    for i in range(n):
        click, top = rng.integers(2, steps + 6), rng.uniform(0.36, 0.95)
        for k in range(steps):
            v = 0.33 + (top - 0.33) * (k >= click) + rng.normal(0, 0.01)
            arrivals.append((3 * i + k, f"trial_{i}", (k + 1) * 30, float(v)))
    return [f"trial_{i}" for i in range(n)], [(k, t, v) for _, k, t, v in sorted(arrivals)]


class _Controller:
    def __init__(self, trials):
        self.trials = trials

    def get_trials(self):
        return list(self.trials.values())


def _drive(scheduler, searcher, trials, results, seen):
    """Feed results in arrival order (a paused trial's results wait until it is resumed); after each, ask the
    scheduler which trial to run. Returns the decisions."""
    from ray.tune.experiment import Trial

    out = []
    controller = _Controller({k: t for k, t in trials.items() if k in seen})
    for k, t, v in results:
        if k not in seen:
            seen.add(k)
            controller.trials[k] = trials[k]
            trials[k].set_status(Trial.RUNNING)
            scheduler.on_trial_add(controller, trials[k])
        if trials[k].status != Trial.RUNNING:
            continue
        result = TrialReport(t, {M: v}).to_result()
        d = scheduler.on_trial_result(controller, trials[k], result)
        searcher.on_trial_result(k, result)
        out.append((k, t, d))
        if d == PAUSE:
            trials[k].set_status(Trial.PAUSED)
        elif t >= 600:  # its full budget
            trials[k].set_status(Trial.TERMINATED)
            scheduler.on_trial_complete(controller, trials[k], result)
        chosen = scheduler.choose_trial_to_run(controller)
        if chosen is not None:
            chosen.set_status(Trial.RUNNING)
            out.append((chosen.trial_id, "resumed"))
    return out


def _trials(searcher, curves):
    from ray.tune.experiment import Trial

    trials = {}
    for k in curves:
        number = searcher.optuna.study.ask().number
        searcher.numbers[k] = number
        searcher.optuna.trial(number).set_user_attr("tune_trial_id", k)
        trials[k] = Trial("fn", config={TRIAL_NUMBER_KEY: number}, trial_id=k, stub=True)
    return trials


def test_a_resumed_freeze_thaw_scheduler_decides_as_an_uninterrupted_one(tmp_path):
    from ray.tune.experiment import Trial

    from search.runner import make_scheduler, make_searcher

    curves, order = _results()
    other = _study(tmp_path / "other")
    searcher = make_searcher(other)
    whole = _drive(make_scheduler(other), searcher, _trials(searcher, curves), order, set())
    pauses = [x for x in whole if x[-1] == PAUSE]
    resumes = [x for x in whole if x[-1] == "resumed"]
    assert pauses and resumes, "trials must be paused and resumed for this test to mean much"

    study = _study(tmp_path / "study")
    scheduler = make_scheduler(study)
    at_start = pickle.dumps(scheduler)  # Tune restores a scheduler as pickled when the study started
    searcher = make_searcher(study)
    trials = _trials(searcher, curves)
    half = len(order) // 2
    seen: set[str] = set()
    first = _drive(scheduler, searcher, trials, order[:half], seen)
    restored = pickle.loads(at_start)
    assert restored.rule.history == {} and restored.rule.paused == {}
    held = {k for k in seen if trials[k].status == Trial.PAUSED}
    assert held, "a trial must be paused at the restart for this test to mean much"
    for k in seen:  # Tune requeues the unfinished trials as PENDING (ray: _requeue_restored_trials) and starts
        if k in held:  # every PENDING trial it has resources for; the scheduler keeps the paused ones PAUSED
            trials[k].set_status(Trial.PENDING)
        restored.on_trial_add(_Controller(trials), trials[k])
    assert {k for k in seen if trials[k].status == Trial.PAUSED} == held
    second = _drive(restored, pickle.loads(pickle.dumps(searcher)), trials, order[half:], seen)
    assert first + second == whole
    assert any(x[-1] == PAUSE for x in second) and any(x[-1] == "resumed" for x in second)
    print(f"{len(pauses)} pauses, {len(resumes)} resumes, {len(second)} decisions after the restart")
    # the pauses are in the storage: Optuna shows them, and status lists the paused trials
    from search.searcher import paused_reasons, trial_outcomes

    stored = restored.evidence.pauses()
    paused_now = {k for k, (p, _) in stored.items() if p is not None}
    assert paused_now == set(restored.rule.paused)
    assert sum(o == "paused" for o in trial_outcomes(study).values()) == len(paused_now)
    # ... with why each was paused (optuna-dashboard's user attributes, `mann-search status`)
    why = paused_reasons(study)
    assert len(why) == len(paused_now) and all(w.startswith(("not clicked by", "clicked at")) for w in why.values())
    from search.searcher import pause_reason  # what the console's pause line and the MLflow tag show

    assert sorted(pause_reason(study, trials[k]) for k in paused_now) == sorted(why.values())


def test_a_resumed_asha_stops_as_an_uninterrupted_one(tmp_path):
    """Tune restores ASHA as pickled at the study's start (empty rungs), and a restored trial that completes is
    recorded at every rung with its final value: the next trial met a cutoff made of that value and was stopped
    (a recipe study of #23 lost its best trial at the first rung so). make_scheduler's ASHA rebuilds its rungs
    from the Optuna storage: the resumed study stops exactly the trials an uninterrupted one stops."""
    from ray.tune.experiment import Trial

    from search.runner import make_scheduler, make_searcher

    def asha_study(path):
        return _study(path, {"kind": "asha", "grace_episodes": 90, "reduction_factor": 3}, max_concurrent=1)

    def drive(scheduler, searcher, trials, order, done):
        """One trial at a time, in order, each to its end or its stop; what the scheduler decided."""
        out = []
        for k in order:
            if k in done:
                continue
            trial = trials[k]
            trial.set_status(Trial.RUNNING)
            scheduler.on_trial_add(_Controller(trials), trial)
            for t, v in curves[k]:
                if (k, t) in done:
                    continue
                result = TrialReport(t, {M: v}).to_result()
                d = scheduler.on_trial_result(_Controller(trials), trial, result)
                searcher.on_trial_result(k, result)
                done.add((k, t))
                out.append((k, t, d))
                if d == STOP:
                    scheduler.on_trial_remove(_Controller(trials), trial)
                    break
                if t >= 600:
                    scheduler.on_trial_complete(_Controller(trials), trial, result)
                    break
            trial.set_status(Trial.TERMINATED)
            done.add(k)
        return out

    # rising curves of different heights: with a cutoff from the restored trial's late value (0.79 at 330
    # episodes) instead of the first rung's values (0.53-0.55 at 90), trial_3 would be stopped at 90
    heights = [0.5, 0.55, 0.3, 0.6, 0.35, 0.65, 0.58, 0.45]
    names = [f"trial_{i}" for i in range(len(heights))]
    curves = {k: [((j + 1) * 30, 0.3 + a * (1 - math.exp(-(j + 1) * 30 / 150))) for j in range(20)]
              for k, a in zip(names, heights)}
    other = asha_study(tmp_path / "other")
    searcher = make_searcher(other)
    whole = drive(make_scheduler(other), searcher, _trials(searcher, curves), names, set())
    assert any(d == STOP for *_, d in whole) and any(t == 600 for _, t, _ in whole)

    study = asha_study(tmp_path / "study")
    scheduler = make_scheduler(study)
    at_start = pickle.dumps(scheduler)
    searcher = make_searcher(study)
    trials = _trials(searcher, curves)
    done: set = set()
    # the first leg: the trials up to the second one that runs its full budget, which is interrupted half-way
    # (its evaluations are in the storage); the second leg restores the scheduler as Tune does and goes on
    full = [k for k in names if (k, 600, "CONTINUE") in whole or (k, 600, STOP) in whole]
    assert len(full) >= 2
    cut = names.index(full[1])
    first = drive(scheduler, searcher, trials, names[:cut], done)
    saved = curves[full[1]]
    curves[full[1]] = saved[:10]
    first += drive(scheduler, searcher, trials, [full[1]], done)
    curves[full[1]] = saved
    done.discard(full[1])
    restored = pickle.loads(at_start)  # what Tune restores
    second = drive(restored, pickle.loads(pickle.dumps(searcher)), trials, names[cut:], done)
    assert first + second == whole
    assert any(d == STOP for *_, d in second)


# --- a real trial paused and resumed through Tune ------------------------------------------------------------


def test_a_real_trial_is_paused_its_slot_runs_another_and_it_resumes_exactly(tmp_path, omniglot_dir, monkeypatch):
    """One CPU, one slot, two real trials of the smoke search. The rule is told to pause the first trial at its
    first evaluation; the second trial then trains in the freed slot; with no samples left the first resumes
    from its checkpoint and reports, at every evaluation, what the same config trained uninterrupted reports."""
    import time

    import ray
    from ray import tune

    from mann.train import Callback, train
    from search.ray_cluster import connect_ray
    from search.runner import build_tuner
    from search.schedulers import FreezeThawRule, StudyEvidence
    from search.searcher import OptunaStudy

    real_observe = FreezeThawRule.observe

    def observe(self, key, t, value, can_start_new):  # pause the study's first trial once, at its first evaluation
        decision = real_observe(self, key, t, value, can_start_new)
        if not self.pauses and t == 160:
            self.pause(key, t)
            return PAUSE
        return decision

    monkeypatch.setattr(FreezeThawRule, "observe", observe)
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    search = load_search_config(search_yaml(tmp_path), [
        "scheduler.kind=freeze_thaw", "scheduler.grace_episodes=160", "budget.num_samples=2",
        "budget.max_concurrent=1", "budget.max_failures=0", "selection.enabled=false",
        "overrides.train.episodes=320", "overrides.train.eval_episodes=16"])
    study = Study.create(search, [], None, path=str(tmp_path / "tune" / "ft"))
    study.local_dir.mkdir(parents=True, exist_ok=True)

    events: list[tuple] = []
    in_optuna: list[tuple] = []

    class Watch(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            events.append(("result", trial.config[TRIAL_NUMBER_KEY], int(result["episodes"]),
                           {k: result[k] for k in result if k.startswith("val/")}))

        def on_step_end(self, iteration, trials, **info):
            status = {t.config[TRIAL_NUMBER_KEY]: t.status for t in trials}
            if events and events[-1][0] == "status" and events[-1][1] == status:
                return
            events.append(("status", status))
            if "PAUSED" in status.values():  # what Optuna holds while a trial is paused
                ot = OptunaStudy(study).study
                in_optuna.append({t.number: (t.state.name, t.user_attrs.get("mann.paused_at"),
                                             sorted(t.intermediate_values)) for t in ot.get_trials()})

    t0 = time.perf_counter()
    started = connect_ray(num_cpus=1) == "local"
    try:
        t1 = time.perf_counter()
        grid = build_tuner(study, Watch(), verbose=0).fit()
        t2 = time.perf_counter()
    finally:
        if started:
            ray.shutdown()
    print(f"ray start {t1 - t0:.0f} s, study {t2 - t1:.0f} s")
    assert not any(r.error for r in grid)
    results = [e for e in events if e[0] == "result"]
    first = [(e[2], e[3]) for e in results if e[1] == 0]
    second = [e[2] for e in results if e[1] == 1]
    assert [e for e, _ in first] == [160, 320] and second == [160, 320]
    order = [e[1] for e in results]
    assert order == [0, 1, 1, 0], order  # paused after 160; the other trial ran in its slot; resumed
    statuses = [e[1] for e in events if e[0] == "status"]
    assert any(s.get(0) == "PAUSED" and s.get(1) == "RUNNING" for s in statuses)
    assert not any(list(s.values()).count("RUNNING") > 1 for s in statuses)  # one slot
    # while paused, Optuna has the trial RUNNING with its intermediate value and the pause mark
    assert in_optuna and in_optuna[0][0] == ("RUNNING", 160.0, [160])
    assert StudyEvidence(study).pauses() == {}  # both finished: none RUNNING (and paused) any more
    # the resumed trial reports what the same config reports trained without a pause (same seed)
    point = {k: v for k, v in grid[0].config.items() if k != TRIAL_NUMBER_KEY} \
        if grid[0].config[TRIAL_NUMBER_KEY] == 0 else \
        {k: v for k, v in grid[1].config.items() if k != TRIAL_NUMBER_KEY}
    cfg = search.trial_config(point, threads=1)

    class Collect(Callback):
        def __init__(self):
            self.rows = []

        def on_eval(self, report):
            self.rows.append((report.episodes, {k: v for k, v in report.metrics().items() if k.startswith("val/")}))

    collect = Collect()
    train(cfg, callbacks=[collect], out_dir=tmp_path / "plain")
    assert [e for e, _ in collect.rows] == [160, 320]
    for (e1, m1), (e2, m2) in zip(first, collect.rows):
        assert e1 == e2 and m1.keys() == m2.keys()
        for k in m1:
            assert m1[k] == pytest.approx(m2[k], abs=1e-6), (e1, k)
