"""The search benchmark: the replay trainable on a tiny recorded table through the real Tuner, the nearest-
configuration mapping, the command's JSON, and the plateau-aware scheduler (pure rule and as built from YAML)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import search  # noqa: F401  (before Ray: token auth)
from search.bench.methods import BASELINE
from search.bench.replay import run_study, trajectory
from search.bench.table import load_table, pick_seed
from search.config import load_search_config
from search.schedulers import CONTINUE, STOP, PlateauRule

from .test_config import REPO

TINY = Path(__file__).parent / "data" / "curves-tiny.jsonl"  # 6 recorded quickstart configs x 2 seeds


def test_table_values_and_nearest_mapping():
    table = load_table(TINY)
    assert len(table.points) == 6 and table.n_curves == 12
    for i, p in enumerate(table.points):  # a recorded point maps to itself
        assert table.nearest(p) == i
        finals = [c["objective"][-1] for c in table.curves[i]]
        assert table.value[i] == pytest.approx(np.mean(finals))
    # a point near one configuration (a little lr, same the rest) maps to it; the space's log scale is used
    p = dict(table.points[2])
    p["train.lr"] = p["train.lr"] * 1.05
    assert table.nearest(p) == 2
    assert table.best == pytest.approx(table.value.max()) and 0.7 < table.best < 0.8
    assert pick_seed(2, p, 0) == pick_seed(2, p, 0) and {pick_seed(2, p, s) for s in range(20)} == {0, 1}


@pytest.fixture
def local_ray():
    """A local Ray for one test, shut down after it: a Ray left running in the test process keeps its dashboard
    agent's port, and the multi-node clusters of later tests then never get an agent."""
    import ray

    from search.ray_cluster import connect_ray

    started = connect_ray(num_cpus=2) == "local"
    yield
    if started:
        ray.shutdown()


def test_replay_trainable_serves_recorded_curves_through_the_tuner(tmp_path, local_ray):
    table = load_table(TINY)
    run = run_study(table, "tpe+plateau", 0, tmp_path, compress=0.0005, num_samples=6, cap=None)
    assert len(run.started) == 6 and set(run.ended) == set(run.started)
    by_trial: dict[str, list] = {}
    for trial, e, v, cfg, c in run.results:
        by_trial.setdefault(trial, []).append((e, v, cfg, c))
    for rows in by_trial.values():
        cfg, c = rows[0][2], rows[0][3]
        curve = table.curves[cfg][c]
        recorded = dict(zip(curve["episodes"], curve["objective"]))
        assert [e for e, *_ in rows] == sorted(e for e, *_ in rows)  # in order, each a recorded evaluation
        assert all(recorded[int(e)] == pytest.approx(v) for e, v, *_ in rows)
    xs, ys = trajectory(table, run)
    assert np.all(np.diff(xs) >= 0) and np.all(ys >= 0) and xs[-1] <= 6 * table.search.max_episodes


def test_benchmark_command_json(tmp_path, capsys):
    import ray

    from search.cli import main

    plot = tmp_path / "regret.png"
    # the plateau rule through real Tuners: test_replay_trainable_serves_recorded_curves_through_the_tuner
    assert main(["benchmark", "--engine", "tune", "--curves", str(TINY), "--repeats", "1", "--methods", "random",
                 "--json", "--plot", str(plot), "--compress", "0.0005", "--parallel", "2"]) == 0
    assert not ray.is_initialized()  # the command shut down the Ray it started
    top = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert top["engine"] == "tune" and top["repeats"] == 1 and set(top["tables"]) == {"tiny"}
    out = top["tables"]["tiny"]
    assert out["curves"] == 12 and out["configs"] == 6 and out["repeats"] == 1 and out["baseline"] == BASELINE
    assert set(out["methods"]) == {BASELINE, "random"}
    for m in out["methods"].values():
        assert set(m["regret_at"]) == {"0.25", "0.5", "1.0"}
        assert all(r["median"] >= 0 for r in m["regret_at"].values())
        assert 0 <= m["kill_before_click"]["stopped"] <= 1 and m["kill_before_click"]["paused_trials"] == 0
    assert out["methods"]["random"]["kill_before_click"] == {"stopped": 0.0, "paused_never_resumed": 0.0,
                                                             "stopped_trials": 0, "paused_trials": 0}
    assert plot.stat().st_size > 1000


def test_benchmark_set_errors_name_the_key(capsys):
    from search.cli import main

    quickstart = str(REPO / "configs" / "search" / "quickstart.yaml")
    assert main(["benchmark", "--curves", str(TINY), "--config", quickstart,
                 "--set", "scheduler.plateau.click_slak=2"]) == 2
    assert "click_slak" in capsys.readouterr().err
    assert main(["benchmark", "--curves", str(TINY), "--set", "scheduler.plateau.click_slack=2"]) == 2
    err = capsys.readouterr().err
    assert "--set" in err and "tiny.yaml" in err and "--config" in err


# --- the plateau-aware rule ----------------------------------------------------------------------------------

T = [1500 * i for i in range(1, 21)]  # 1.5k .. 30k


def _curve(click: float | None, top: float, plateau: float = 0.45) -> list[float]:
    """Flat at the plateau, then a linear rise of 10k episodes to ``top`` (no click: flat)."""
    if click is None:
        return [plateau] * len(T)
    return [plateau + (top - plateau) * min(1.0, max(0.0, (t - click) / 10000)) for t in T]


def _feed(rule: PlateauRule, key, curve) -> tuple[str, float]:
    for t, v in zip(T, curve):
        if rule.observe(key, t, v) == STOP:
            return STOP, t
    return CONTINUE, T[-1]


def _together(rule: PlateauRule, curves: list[list[float]]) -> None:
    """Reference trials that ran the full budget (fed with the rule held off)."""
    grace, rule.grace = rule.grace, rule.max_t
    for i, t in enumerate(T):
        for k, curve in enumerate(curves):
            assert rule.observe(k, t, curve[i]) == CONTINUE
    rule.grace = grace


def test_plateau_rule_stops_flat_trials_once_early_clickers_won_and_keeps_clickers():
    rule = PlateauRule(max_t=30000, grace=3000)
    _together(rule, [_curve(4000, 0.75), _curve(None, 0), _curve(None, 0)])
    decision, t = _feed(rule, "flat", _curve(None, 0))
    # the clicker clicked at 7.5k on this grid: the flat trial is stopped once it is click_slack (1.5) times as
    # late as that, at the next evaluation, not at a fixed rung
    assert decision == STOP and t == 12000
    assert _feed(rule, "clicker", _curve(5000, 0.75)) == (CONTINUE, 30000)


def test_plateau_rule_waits_when_a_late_clicker_reached_the_top():
    rule = PlateauRule(max_t=30000, grace=3000)
    _together(rule, [_curve(4000, 0.75), _curve(None, 0), _curve(None, 0), _curve(16000, 0.76)])
    # the study saw a click at 16k reach the top: a trial still flat at 12k is not stopped for being late
    decision, t = _feed(rule, "late", _curve(15000, 0.75))
    assert decision == CONTINUE
    assert "late" not in rule.stopped.values()


def test_plateau_rule_grace_and_noise_below_the_plateau():
    rule = PlateauRule(max_t=30000, grace=9000)
    _together(rule, [_curve(3000, 0.9), _curve(None, 0), _curve(None, 0)])
    low = [0.30] * len(T)
    assert all(rule.observe("low", t, v) == CONTINUE for t, v in zip(T[:5], low))  # before grace: never
    rule2 = PlateauRule(max_t=30000, grace=1500)
    _together(rule2, [_curve(3000, 0.7), _curve(3000, 0.7)])
    assert rule2.observe("noisy", 1500, 0.38) == CONTINUE  # below the plateau early: credited with the plateau


def test_plateau_scheduler_from_yaml_and_existing_configs_load():
    from search import PlateauStopping, Study, make_scheduler

    for name in ("smoke", "quickstart", "cluster"):
        load_search_config(REPO / "configs" / "search" / f"{name}.yaml")
    s = load_search_config(REPO / "configs" / "search" / "smoke.yaml",
                           ["scheduler.kind=plateau", "scheduler.plateau.margin=0.05"])
    sched = make_scheduler(Study.create(s))
    assert isinstance(sched, PlateauStopping) and sched.rule.margin == 0.05 and sched.rule.grace == 160
    assert sched.rule.max_t == s.max_episodes


def test_plateau_rule_gap_follows_the_study_noise():
    rule = PlateauRule(max_t=30000, grace=30000)
    assert rule.noise() == 0.0 and rule.gap() == rule.margin  # no curve yet: the margin alone
    zigzag = [0.5 + 0.001 * i + (0.02 if i % 2 else -0.02) for i in range(len(T))]
    for t, v in zip(T, zigzag):
        rule.observe("z", t, v)
    # second differences of a line plus +-0.02 alternating are +-0.08: sigma = 1.4826 * 0.08 / sqrt(6)
    sigma = 1.4826 * 0.08 / math.sqrt(6)
    assert rule.noise() == pytest.approx(sigma) and rule.gap() == pytest.approx(3 * sigma)
    assert PlateauRule(max_t=30000, noise_factor=0.0, history=rule.history).gap() == 0.02


def test_plateau_rule_stops_on_a_gap_above_the_noise_only():
    def study(noise: float) -> PlateauRule:
        rule = PlateauRule(max_t=30000, grace=3000)
        wiggle = [noise if i % 2 else -noise for i in range(len(T))]
        refs = [_curve(4000, 0.75), _curve(15000, 0.72), _curve(15000, 0.72)]
        _together(rule, [[v + w for v, w in zip(c, wiggle)] for c in refs])
        return rule

    # late clickers ended 3 points below the early one: more than the 2-point margin of a clean study, so a flat
    # trial is stopped for being late ...
    clean = study(0.0)
    decision, t_clean = _feed(clean, "flat", _curve(None, 0))
    assert decision == STOP and clean.stopped["flat"] == "late"
    # ... but not more than 3 x the noise of a study whose evaluations scatter by +-1 point: the flat trial runs
    # on until even the largest rise seen could no longer lift it to the best value (the reach rule)
    rule = study(0.01)
    assert rule.gap() > 0.03
    decision, t = _feed(rule, "flat", _curve(None, 0))
    assert t > t_clean and rule.stopped.get("flat") != "late"


def test_plateau_and_clicks_do_not_depend_on_how_often_the_study_evaluates():
    """The plateau is read from the same stretch of a curve (10-30 % of the budget) whether a study evaluates
    every 5 % or every 10 % of it: on curves that rise a little before their click (as MANN's do: chance, then a
    guessing level, then the click) the first three evaluations, the rule before, gave the 5 % study a lower
    plateau and so earlier clicks."""

    def curve(click, top, every):
        ts = list(range(every, 30001, every))
        pre = lambda t: 0.33 + 0.12 * min(1.0, t / 4500)  # chance, rising to a guessing level by 4.5k  # noqa: E731
        return [(t, pre(t) + (top - 0.45) * min(1.0, max(0.0, (t - click) / 6000)) if click is not None else pre(t))
                for t in ts]

    clicks = {}
    for every in (1500, 3000):
        rule = PlateauRule(max_t=30000)
        for k, (c, top) in enumerate([(6000, 0.8), (12000, 0.75), (None, 0), (None, 0), (18000, 0.7)]):
            for t, v in curve(c, top, every):
                rule.record(k, t, v)
        level = rule.click_level()
        clicks[every] = (rule.plateau(), {k: rule.click_time(k, level) for k in rule.history})
    assert clicks[1500][0] == pytest.approx(clicks[3000][0]) == pytest.approx(0.45)
    # the same clicks, each seen at the first evaluation of its grid at or past it
    fine = {k: math.ceil(c / 3000) * 3000 if math.isfinite(c) else c for k, c in clicks[1500][1].items()}
    assert fine == clicks[3000][1] and sum(map(math.isfinite, fine.values())) == 3
