"""The benchmark's simulated engine (search/bench/sim.py) on the tiny recorded table, with the real searcher and
scheduler objects: results follow the recorded curves, concurrency and the episode cap hold, PAUSE and resume,
the i-epoch baseline; and the statistics (search/bench/stats.py) against hand-computed cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import search  # noqa: F401  (before Ray: token auth)
from search import Ending
from search.bench import stats
from search.bench.methods import BASELINE
from search.bench.replay import trajectory
from search.bench.table import load_table
from search.bench.sim import run_study_sim

from .test_config import REPO

TINY = Path(__file__).parent / "data" / "curves-tiny.jsonl"  # 6 recorded quickstart configs x 2 seeds


def _by_trial(run):
    out: dict[str, list] = {}
    for trial, e, v, cfg, c in run.results:
        out.setdefault(trial, []).append((e, v, cfg, c))
    return out


def _follows_recorded_curves(table, run):
    for rows in _by_trial(run).values():
        cfg, c = rows[0][2], rows[0][3]
        curve = table.curves[cfg][c]
        recorded = dict(zip(curve["episodes"], curve["objective"]))
        episodes = [e for e, *_ in rows]
        assert episodes == sorted(set(episodes))  # each evaluation once, in order (a resumed trial goes on)
        assert all(recorded[int(e)] == pytest.approx(v) for e, v, *_ in rows)


def test_sim_engine_replays_the_table_through_the_real_searcher_and_scheduler():
    table = load_table(TINY)
    run = run_study_sim(table, BASELINE, 0, num_samples=6, cap=None)
    assert len(run.started) == 6 and set(run.ended) == set(run.started) and not run.paused
    _follows_recorded_curves(table, run)
    endings = {o.ending for o in run.ended.values()}
    assert endings == {Ending.COMPLETED, Ending.EARLY_STOPPED}  # ASHA (grace 12k of 30k) stopped some
    for trial, o in run.ended.items():
        last = _by_trial(run)[trial][-1][0]
        assert (o.ending == Ending.COMPLETED) == (last >= table.search.max_episodes)
        if o.ending == Ending.EARLY_STOPPED:
            assert last >= 12000  # not before ASHA's grace period
    # same seed, same study (trial ids aside)
    again = run_study_sim(table, BASELINE, 0, num_samples=6, cap=None)
    assert [r[1:] for r in again.results] == [r[1:] for r in run.results]
    other = run_study_sim(table, BASELINE, 1, num_samples=6, cap=None)
    assert [r[1:] for r in other.results] != [r[1:] for r in run.results]


def test_replayed_results_carry_the_recorded_losses_as_the_trainable_reports_them():
    """Beside the objective, a replayed evaluation reports the losses its table recorded under the trainable's
    names (``train/loss``, ``val/loss``), so a scheduler sees what it would see in a real study."""
    from ray.tune.schedulers import FIFOScheduler

    class Seen(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.rows = []

        def on_trial_result(self, tune_controller, trial, result):
            self.rows.append(dict(result))
            return FIFOScheduler.CONTINUE

    def rows(table):
        seen = Seen()
        run = run_study_sim(table, "tpe", 0, num_samples=2, cap=None, scheduler=lambda study: seen)
        curve_of = {t: table.curves[cfg][c] for t, _, _, cfg, c in run.results}
        assert seen.rows and all(r["trial_id"] in curve_of for r in seen.rows)
        return [(r, curve_of[r["trial_id"]]) for r in seen.rows]

    table = load_table(REPO / "results/curves/quickstart.jsonl")  # recorded with its losses
    metric = table.search.config.primary.metric
    for r, curve in rows(table):
        i = [int(e) for e in curve["episodes"]].index(int(r["episodes"]))
        assert r[metric] == curve["objective"][i]
        assert r["train/loss"] == curve["train_loss"][i] and r["val/loss"] == curve["val_loss"][i]
    # a table recorded without them (the tiny one): the objective alone
    assert all("train/loss" not in r and "val/loss" not in r for r, _ in rows(load_table(TINY)))


def test_sim_engine_keeps_concurrency_and_the_episode_cap():
    table = load_table(TINY)
    cap = 100_000
    run = run_study_sim(table, "tpe", 0, num_samples=24, cap=cap)
    latest: dict[str, float] = {}
    spent = []
    for trial, e, *_ in run.results:
        latest[trial] = e
        spent.append(sum(latest.values()))
    assert spent[-1] >= cap and spent[-2] < cap  # stopped at the result that spent the cap
    assert any(o.ending == Ending.EPISODE_CAP for o in run.ended.values())
    # at most budget.max_concurrent (2) trials between their first and last result at any time
    first = {t: run.results.index(next(r for r in run.results if r[0] == t)) for t in latest}
    last = {t: max(i for i, r in enumerate(run.results) if r[0] == t) for t in latest}
    for i in range(len(run.results)):
        assert sum(first[t] <= i <= last[t] for t in latest) <= 2


class PauseOnce:
    """A scheduler factory: FIFO, but every trial is paused once at its first result past ``at`` episodes, and
    trials in ``hold`` are never resumed."""

    def __init__(self, at: float, hold: int | None = None):
        self.at, self.hold = at, hold

    def __call__(self, study):
        from ray.tune.experiment import Trial
        from ray.tune.schedulers import FIFOScheduler, TrialScheduler

        at, hold_first = self.at, self.hold

        class Pausing(FIFOScheduler):
            def __init__(self):
                super().__init__()
                self.paused, self.held = set(), set()

            def on_trial_result(self, tune_controller, trial, result):
                if result["episodes"] < at or trial.trial_id in self.paused or result.get("done"):
                    return TrialScheduler.CONTINUE
                self.paused.add(trial.trial_id)
                if hold_first is not None and len(self.held) < hold_first:
                    self.held.add(trial.trial_id)
                return TrialScheduler.PAUSE

            def choose_trial_to_run(self, tune_controller):
                trials = tune_controller.get_trials()
                for t in trials:
                    if t.status == Trial.PENDING:
                        return t
                for t in trials:
                    if t.status == Trial.PAUSED and t.trial_id not in self.held:
                        return t
                return None

        return Pausing()


def test_sim_engine_pauses_and_resumes_where_the_trial_left_off():
    table = load_table(TINY)
    run = run_study_sim(table, "tpe", 0, num_samples=4, cap=None, scheduler=PauseOnce(9000))
    assert len(run.started) == 4 and not run.paused
    assert run.resumed == {t: 1 for t in run.started}  # each paused once, each resumed
    _follows_recorded_curves(table, run)
    for rows in _by_trial(run).values():  # resumed at its next evaluation, run to its end
        assert rows[-1][0] >= table.search.max_episodes and len(rows) == len(table.curves[rows[0][2]][rows[0][3]]
                                                                             ["episodes"])
    assert all(o.ending == Ending.COMPLETED for o in run.ended.values())


def test_sim_engine_reports_trials_paused_and_never_resumed():
    table = load_table(TINY)
    run = run_study_sim(table, "tpe", 0, num_samples=4, cap=None, scheduler=PauseOnce(9000, hold=1))
    assert len(run.paused) == 1
    held = run.paused[0]
    assert held not in run.resumed and _by_trial(run)[held][-1][0] < 12000
    assert run.ended[held].ending == Ending.STUDY_ENDED  # what Tune's callbacks see at the end
    # the held trial keeps its limiter slot (budget.max_concurrent 2): the rest ran one at a time after it
    assert len(run.started) == 4 and sum(o.ending == Ending.COMPLETED for o in run.ended.values()) == 3


def test_i_epoch_probes_every_trial_then_continues_the_best():
    table = load_table(TINY)
    run = run_study_sim(table, "i-epoch", 0, num_samples=8, cap=120_000)
    rows = _by_trial(run)
    rung = 0.1 * table.search.max_episodes
    probes = {t: next(v for e, v, *_ in r if e >= rung) for t, r in rows.items()}
    assert len(probes) == 8  # every configuration got its short budget first
    first_resumed = min(run.resumed, key=lambda t: next(i for i, r in enumerate(run.results)
                                                         if r[0] == t and r[1] > rung))
    assert probes[first_resumed] == max(probes.values())
    assert set(run.paused) == set(rows) - set(run.resumed)


def test_oracle_reference_pauses_at_the_click_every_trial_not_at_the_target():
    """tpe+oracle@click (reads the table): a trial of a configuration at or under the target runs to the full
    budget; any other runs until its curve clicks (or the deadline), is paused there and, while the searcher has
    samples left; then each paused trial once, to its end)."""
    from search.bench.bound import OracleAtClick, click_episodes, good_configurations

    table = load_table(TINY)
    target = float(np.sort(100.0 * (table.best - table.value))[1])  # the two best configurations
    good, clicks = good_configurations(table, target), click_episodes(table)
    deadline = max(c for i, cs in enumerate(clicks) if good[i] for c in cs)
    made, starts = [], []  # starts: (trial, resumed?) in the order the scheduler picked them to run

    def oracle(study):
        sched = OracleAtClick(study, table, 0, target)
        pick = sched.choose_trial_to_run

        def logged(controller, *a, **k):
            trial = pick(controller, *a, **k)
            if trial is not None:
                starts.append((trial.trial_id, trial.status == "PAUSED"))
            return trial
        sched.choose_trial_to_run = logged
        made.append(sched)
        return sched

    run = run_study_sim(table, "tpe+freeze_thaw", 0, num_samples=10, cap=None, scheduler=oracle)
    rule = made[0].rule  # pause episodes: rule.paused (still paused) or rule.started (resumed from there)
    _follows_recorded_curves(table, run)
    rows = _by_trial(run)
    assert len(rows) == 10 and set(run.resumed.values()) <= {1}
    for trial, r in rows.items():
        cfg, c = r[0][2], r[0][3]
        assert r[-1][0] >= table.search.max_episodes  # no cap: every trial ends its curve
        if good[cfg]:
            assert trial not in rule.started and trial not in rule.paused and trial not in run.resumed
        else:  # paused at its first report at or past its click (or the deadline), resumed once at the end
            stop_at = min(clicks[cfg][c], deadline)
            assert run.resumed[trial] == 1 and rule.started[trial] == min(e for e, *_ in r if e >= stop_at)
            # only once the searcher's samples were all started (by start order: a resumed trial may report
            # before the last fresh one's first result)
            assert starts.index((trial, True)) > starts.index((run.started[-1], False))
    assert any(good[r[0][2]] for r in rows.values()) and any(not good[r[0][2]] for r in rows.values())


def test_freeze_thaw_defer_at_resumes_a_deferred_trial_ahead_of_fresh_ones_through_the_tune_scheduler():
    """defer_at through FreezeThaw and the SlotLimiter on simulated time: a trial that clicked before it could be
    ranked is paused after its click and, once it ranks among the kept, resumed while the searcher still has
    samples (before its last trial starts), and runs its curve to the end; without defer_at no paused trial
    resumes before the searcher's samples are all started."""
    from search.schedulers import FreezeThaw

    table = load_table(TINY)
    metric, max_t = table.search.config.objectives[0].metric, table.search.max_episodes

    def study(seed, defer_at):
        made, clicked_when_resumed = [], {}

        def scheduler(study):
            made.append(FreezeThaw("episodes", metric, "max", max_t=max_t, max_concurrent=2, num_samples=12,
                                   grace=0.1 * max_t, defer_at=defer_at, probe_every=0, min_clicked=3))
            rule, resume = made[-1].rule, made[-1].rule.resume

            def resumed(key):  # whether it had clicked before its pause, as the rule saw it then
                clicked_when_resumed[key] = rule.clicks().get(key, math.inf) < rule.paused.get(key, -math.inf)
                resume(key)

            rule.resume = resumed
            return made[-1]

        run = run_study_sim(table, "tpe+freeze_thaw", seed, num_samples=12, cap=None, scheduler=scheduler)
        _follows_recorded_curves(table, run)
        rule, rows = made[0].rule, _by_trial(run)
        last_fresh = next(i for i, x in enumerate(run.results) if x[0] == run.started[-1])
        early = []  # (trial, its click before its pause) for each trial resumed before the last fresh trial
        for trial, t0 in rule.started.items():
            if t0 > 0 and next(i for i, x in enumerate(run.results) if x[0] == trial and x[1] > t0) < last_fresh:
                early.append((trial, clicked_when_resumed[trial]))
                assert rows[trial][-1][0] >= max_t  # resumed: runs its curve to the end
        return early

    deferred = [e for seed in range(4) for e in study(seed, 0.3)]
    assert deferred and all(clicked_before_pause for _, clicked_before_pause in deferred)
    assert not any(study(seed, 0.0) for seed in range(4))


def test_sim_benchmark_json_schema_over_two_tables(tmp_path, capsys):
    from search.cli import main

    other = tmp_path / "tiny2.jsonl"
    lines = TINY.read_text().splitlines()
    head = json.loads(lines[0])
    head["name"] = "tiny2"
    other.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    assert main(["benchmark", "--curves", str(TINY), "--curves", str(other), "--repeats", "4", "--json",
                 "--plot", str(tmp_path / "p.png"), "--n-boot", "200", "--methods", "tpe+asha", "i-epoch"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["engine"] == "sim" and out["repeats"] == 4 and out["wall_s"] > 0
    assert set(out["tables"]) == {"tiny", "tiny2"}
    assert out["tables"]["tiny"]["shipped_config"] is None and out["tables"]["tiny"]["report_every"] == 1
    for t in out["tables"].values():
        assert t["curves"] == 12 and t["configs"] == 6 and t["baseline"] == BASELINE and t["default"] == "tpe+asha"
        assert set(t["methods"]) == {BASELINE, "tpe+asha", "i-epoch"}
        for m in t["methods"].values():
            for f in ("0.25", "0.5", "1.0"):
                r = m["regret_at"][f]
                assert r["ci95"][0] <= r["median"] <= r["ci95"][1]
            s = m["speedup"]
            assert s["median"] is None or s["median"] >= 0
            assert 0 <= m["reached"] <= 1
            assert 0 <= m["kill_before_click"]["stopped"] <= 1
            assert 0 <= m["kill_before_click"]["paused_never_resumed"] <= 1
        assert t["methods"][BASELINE]["speedup"]["median"] == 1.0  # the baseline against itself
        assert t["methods"]["i-epoch"]["kill_before_click"]["paused_trials"] > 0
    assert set(out["across_tables"]) == set(out["tables"]["tiny"]["methods"])
    for t in out["tables"].values():  # the oracle screen's bound: the baseline's median episodes over its
        o, base = t["oracle_screen"], t["methods"][BASELINE]["episodes_to_target"]
        assert 1 <= o["good_configs"] <= 6 and 0 < o["deadline"] <= 1 and o["episodes_to_target"] > 0
        assert o["speedup_bound"] is None if base is None else \
            o["speedup_bound"] == pytest.approx(base / o["episodes_to_target"], abs=1e-3)
    g = out["across_tables"][BASELINE]
    assert g["speedup_geomean"] == 1.0 and g["ci95"][0] <= 1.0 <= g["ci95"][1]


def test_each_table_is_benchmarked_with_its_own_shipped_config(tmp_path, capsys):
    """A table named like a shipped search config gets that config's scheduler and report interval; a table
    beside it without one keeps its recorded settings (not the first table's)."""
    from search.cli import main

    other = tmp_path / "quickstart.jsonl"
    lines = TINY.read_text().splitlines()
    head = json.loads(lines[0])
    head["name"] = "quickstart"  # configs/search/quickstart.yaml: eval_every 3000 against the table's 1500
    other.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    assert main(["benchmark", "--curves", str(other), "--curves", str(TINY), "--repeats", "2", "--json",
                 "--plot", str(tmp_path / "p.png"), "--n-boot", "50", "--methods", "tpe+asha"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    quick, tiny = out["tables"]["quickstart"], out["tables"]["tiny"]
    assert quick["shipped_config"].endswith("configs/search/quickstart.yaml") and quick["report_every"] == 2
    assert tiny["shipped_config"] is None and tiny["report_every"] == 1
    assert main(["benchmark", "--curves", str(other), "--curves", str(TINY), "--repeats", "2", "--markdown",
                 "--plot", str(tmp_path / "p.png"), "--n-boot", "50", "--methods", "tpe+asha",
                 "--save", str(tmp_path / "b.json")]) == 0
    md = capsys.readouterr().out
    assert set(json.loads((tmp_path / "b.json").read_text())["tables"]) == {"quickstart", "tiny"}
    assert (tmp_path / "p-quickstart.png").is_file() and (tmp_path / "p-tiny.png").is_file()  # a plot per table
    assert md.count("| tpe+asha | ") == 3 and "**quickstart**" in md and "**tiny**" in md  # 2 tables + across
    assert "| method | speed-up, geometric mean [95 % CI] |" in md  # across the two tables


def test_benchmark_study_shape_from_the_command_line(tmp_path, capsys):
    """--num-samples / --max-concurrent replace the table's recorded study shape (a cluster's many trials at
    once); a bad value is refused naming the option."""
    from search.cli import main

    assert main(["benchmark", "--curves", str(TINY), "--repeats", "3", "--json", "--plot", str(tmp_path / "p.png"),
                 "--n-boot", "50", "--methods", "tpe+asha", "--num-samples", "5", "--max-concurrent", "4"]) == 0
    t = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tables"]["tiny"]
    assert t["study_shape"] == {"num_samples": 5, "max_concurrent": 4}
    assert t["methods"][BASELINE]["trials_per_study"] == 5  # the baseline: exactly its samples
    assert 5 <= t["methods"]["tpe+asha"]["trials_per_study"] <= 20  # the others: up to 4x under the cap
    recorded = load_table(TINY).search.config.budget
    assert (recorded.num_samples, recorded.max_concurrent) != (5, 4)
    with pytest.raises(SystemExit):
        main(["benchmark", "--curves", str(TINY), "--max-concurrent", "0"])
    assert "--max-concurrent" in capsys.readouterr().err


def test_benchmark_set_reaches_a_scheduler_the_shipped_config_does_not_run():
    """``--set scheduler.freeze_thaw.*`` / ``scheduler.plateau.*`` reach those methods on a table whose shipped
    config runs ASHA (they were silently dropped: the methods took the table's recorded search, ASHA, and the
    defaults); ASHA keeps the shipped settings, and without --set the defaults hold."""
    from dataclasses import replace

    from search.bench.methods import method_study
    from search.config import FreezeThawConfig, load_search_config

    table = load_table(TINY)
    shipped = load_search_config(REPO / "configs/search/paper5x10.yaml",
                                 ["scheduler.freeze_thaw.probe_every=3", "scheduler.freeze_thaw.first_rung=0.4",
                                  "scheduler.plateau.click_slack=2"]).config
    assert shipped.scheduler.kind == "asha"

    def scheduler_of(method, shipped):
        search, _, _ = method_study(table, method, 0, 4, None, shipped, optuna_storage="sqlite://", path="/nonexistent/x")
        return search.config.scheduler

    ft = scheduler_of("tpe+freeze_thaw", shipped)
    assert ft.kind == "freeze_thaw" and ft.freeze_thaw.probe_every == 3 and ft.freeze_thaw.first_rung == 0.4
    assert ft.grace_episodes == round(0.15 * table.search.max_episodes)
    assert scheduler_of("tpe+plateau", shipped).plateau.click_slack == 2
    assert scheduler_of("tpe+asha", shipped).grace_episodes == shipped.scheduler.grace_episodes
    # without --set, or without a shipped config: today's defaults, not a section the table's header recorded
    # (the defaults of the day it was recorded: three recorded tables say min_clicked 2)
    header = json.loads(json.dumps(table.header))
    header["search"]["scheduler"]["freeze_thaw"] = {"min_clicked": 2}
    table = replace(table, header=header)
    plain = scheduler_of("tpe+freeze_thaw", load_search_config(REPO / "configs/search/paper5x10.yaml").config)
    assert plain.freeze_thaw.to_dict() == FreezeThawConfig().to_dict()
    assert scheduler_of("tpe+freeze_thaw", None).freeze_thaw.to_dict() == FreezeThawConfig().to_dict()


def test_benchmark_set_reaches_every_methods_sampler_settings_and_refuses_what_it_does_not_read(capsys):
    """``--set sampler.n_startup_trials`` / ``sampler.constant_liar`` reach every method's sampler (the baseline's
    too; they were silently dropped: the methods took the table's recorded sampler), ``sampler.startup`` every
    method's but the baseline's (Ray's plain TPE); the sampler's kind stays the method's and its seed the
    repetition's; a key the benchmark does not read is refused by name."""
    from search.bench.methods import method_study
    from search.cli import main
    from search.config import load_search_config
    from search.space import make_sampler

    table = load_table(TINY)

    def sampler_of(method, sets):
        shipped = load_search_config(REPO / "configs/search/quickstart.yaml", sets).config
        search, _, _ = method_study(table, method, 7, 4, None, shipped, optuna_storage="sqlite://", path="/nonexistent/x")
        return search.config.sampler, make_sampler(search)

    cfg, sampler = sampler_of("tpe+freeze_thaw", [])
    assert cfg.kind == "tpe" and cfg.seed == 7 and cfg.n_startup_trials == 6 and cfg.start == "qmc"
    assert sampler.model._constant_liar and sampler.n_startup == 6  # TPE after a Sobol start (the default)
    cfg, sampler = sampler_of("tpe+freeze_thaw", ["sampler.constant_liar=false", "sampler.n_startup_trials=9",
                                                  "sampler.startup=random"])
    assert not sampler._constant_liar and cfg.n_startup_trials == 9 and cfg.start == "random"
    cfg, sampler = sampler_of(BASELINE, ["sampler.n_startup_trials=9", "sampler.kind=random"])
    # the baseline is Ray's plain TPE: the shipped start does not reach it
    assert cfg.kind == "tpe" and cfg.n_startup_trials == 9 and cfg.start == "random" and sampler._constant_liar
    assert sampler_of("random", [])[0].kind == "random"
    for key, hint in (("budget.num_samples=3", "--num-samples"), ("sampler.kind=random", "sampler kind"),
                      ("sampler.seed=3", "seed")):
        assert main(["benchmark", "--curves", str(TINY), "--config", str(REPO / "configs/search/quickstart.yaml"),
                     "--set", key]) == 2
        err = capsys.readouterr().err
        assert f"--set {key.split('=')[0]}" in err and hint in err


def test_oracle_screen_hand_computed():
    """Three configurations of the tiny table, one curve each: the best is the only one at target 0. The oracle
    draws configurations uniformly and stops at the first good one: P(first draw good) = 1/3, P(one bad draw
    first) = 2/9, so the median of the episodes spent is the good curve's click plus the dearer bad curve's
    episodes up to that deadline (the cumulative chance passes 1/2 between 1/3 + 1/9 and 1/3 + 2/9). With all
    three at the target, the first draw ends it: the median of the three curves' clicks."""
    from dataclasses import replace

    from search.bench.bound import click_episodes, oracle_screen

    full = load_table(TINY)
    keep = [int(np.argmax(full.value)), *[i for i in np.argsort(full.value)[:2]]]
    t = replace(full, points=[full.points[i] for i in keep], curves=[full.curves[i][:1] for i in keep],
                value=full.value[keep], vectors=full.vectors[keep])
    clicks = [c[0] for c in click_episodes(t)]
    good = clicks[0]
    expected = good + max(min(clicks[1], good), min(clicks[2], good))
    o = oracle_screen(t, target_regret=0.0, draws=4000, seed=3)
    assert o["good_configs"] == 1 and o["deadline"] == pytest.approx(good / t.search.max_episodes, abs=1e-3)
    assert o["episodes_to_target"] == pytest.approx(expected)
    # every configuration at the target: the first draw ends the screen, at its curve's click (or full budget)
    loose = oracle_screen(t, target_regret=100.0 * (t.best - t.value.min()), draws=4000, seed=3)
    assert loose["good_configs"] == 3 and loose["episodes_to_target"] == pytest.approx(sorted(clicks)[1])


# --- statistics ----------------------------------------------------------------------------------------------


def test_bootstrap_interval_of_the_median_hand_computed():
    # x = 1..7: a resample's median is <= 1 when at least 4 of its 7 draws are 1 (p = 1/7):
    #   (35*6^3 + 21*6^2 + 7*6 + 1) / 7^7 = 8359 / 823543 = 1.0 % < 2.5 %,
    # and <= 2 when at least 4 draws are 1 or 2 (p = 2/7):
    #   (35*2^4*5^3 + 21*2^5*5^2 + 7*2^6*5 + 2^7) / 7^7 = 89168 / 823543 = 10.8 % >= 2.5 %;
    # by symmetry the 97.5 % point is 6: the 95 % interval is [2, 6].
    x = np.arange(1, 8)
    med, lo, hi = stats.median_ci(x, exact=True)
    assert (med, lo, hi) == (4.0, 2.0, 6.0)
    reps = np.median(x[stats.resample_index(7, 0, None, exact=True)], axis=1)
    assert np.mean(reps <= 1) == pytest.approx(8359 / 823543) and np.mean(reps <= 2) == pytest.approx(89168 / 823543)
    assert stats.median_ci(x, n_boot=20000, seed=3)[1:] == (2.0, 6.0)  # Monte Carlo agrees
    # a wider sample gives a wider interval
    assert stats.median_ci(np.arange(1, 8) * 2.0, exact=True)[1:] == (4.0, 12.0)


def test_speedup_to_target_and_geometric_mean():
    base = np.array([10.0, 20.0, 30.0])
    assert stats.speedup(base, [5.0, 10.0, math.inf]) == 2.0  # 20 / 10
    assert stats.speedup(base, [math.inf, math.inf, 5.0]) == 0.0  # the median never reaches it
    s, lo, hi = stats.speedup_ci(base, base, n_boot=500)
    assert s == 1.0 and lo < 1.0 < hi
    assert stats.geomean([2.0, 8.0]) == pytest.approx(4.0) and stats.geomean([2.0, 0.0]) == 0.0
    g, lo, hi = stats.geomean_ci([(base, base / 2), (base, base / 8)], n_boot=500)
    assert g == pytest.approx(4.0) and lo <= 4.0 <= hi
    xs, ys = np.array([100.0, 200.0, 300.0]), np.array([5.0, 2.0, 0.5])
    assert stats.first_reach(xs, ys, 2.0) == 200.0 and stats.first_reach(xs, ys, 0.1) == math.inf
    assert list(stats.value_at(xs, ys, np.array([50.0, 100.0, 250.0, 1e6]), 9.0)) == [9.0, 5.0, 2.0, 0.5]


def test_paired_ratio_of_two_variants_cancels_what_their_seeds_share():
    """B's speed-up over A, paired study by study: where B is A halved on every study the ratio is exactly 2 in
    every resample (an unpaired interval would be wide); never reaching the target counts as in speedup()."""
    rng = np.random.default_rng(0)
    a = rng.uniform(1e4, 1e5, 40)  # studies that differ a lot by seed
    r, lo, hi = stats.paired_ratio_ci(a, a / 2, n_boot=500)
    assert r == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    _, ulo, uhi = stats.speedup_ci(a, a / 2, n_boot=500)  # the same figures resampled independently
    assert uhi - ulo > 0.5
    inf = np.full(3, math.inf)
    assert stats.paired_ratio_ci([1.0, 2.0, 3.0], inf, n_boot=50)[0] == 0.0  # B never reaches it
    assert stats.paired_ratio_ci(inf, [1.0, 2.0, 3.0], n_boot=50)[0] == math.inf
    assert stats.paired_ratio_ci(inf, inf, n_boot=50) == (1.0, 1.0, 1.0)  # neither does: level
    g, glo, ghi = stats.paired_geomean_ci([(a, a / 2), (a, a / 8)], n_boot=500)
    assert g == pytest.approx(4.0) and glo == pytest.approx(4.0) and ghi == pytest.approx(4.0)
    with pytest.raises(ValueError):
        stats.paired_ratio_ci([1.0, 2.0], [1.0], n_boot=10)


def test_compare_two_saved_runs_from_the_command_line(tmp_path, capsys):
    """`mann-search compare`: two saved runs of freeze_thaw on the tiny table (the defaults, and defer_at), paired
    by study: the ratio is A's median episodes to the target over B's, a run against itself is 1 exactly, and a
    file that cannot be paired is refused naming it."""
    from search.cli import main

    def bench(name, *extra):
        assert main(["benchmark", "--curves", str(TINY), "--repeats", "6", "--json", "--n-boot", "50", "--methods",
                     "tpe+freeze_thaw", "--config", str(REPO / "configs/search/quickstart.yaml"), "--plot",
                     str(tmp_path / f"{name}.png"), "--save", str(tmp_path / f"{name}.json"), *extra]) == 0
        capsys.readouterr()
        return tmp_path / f"{name}.json"

    a, b = bench("a"), bench("b", "--set", "scheduler.freeze_thaw.defer_at=0.3")
    assert main(["compare", "--a", str(a), "--b", str(b), "--json", "--n-boot", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    t = out["tables"]["tiny"]

    def med(f):
        v = json.loads(f.read_text())["tables"]["tiny"]["methods"]["tpe+freeze_thaw"]["episodes_to_target_by_study"]
        assert len(v) == 6
        return float(np.median([math.inf if x is None else x for x in v]))

    expected = stats.paired_ratio_ci(*[[math.inf if x is None else x for x in json.loads(f.read_text())["tables"]
                                        ["tiny"]["methods"]["tpe+freeze_thaw"]["episodes_to_target_by_study"]]
                                       for f in (a, b)], n_boot=10)[0]
    assert t["b_over_a"]["median"] == pytest.approx(expected, abs=1e-3)
    if math.isfinite(med(a)) and math.isfinite(med(b)):
        assert expected == pytest.approx(med(a) / med(b))
    assert main(["compare", "--a", str(a), "--b", str(a), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["tables"]["tiny"]["b_over_a"] == {"median": 1.0, "ci95": [1.0, 1.0]}
    assert same["across_tables"] == {"b_over_a_geomean": 1.0, "ci95": [1.0, 1.0]}
    old = json.loads(a.read_text())  # saved before per-study figures existed
    old["tables"]["tiny"]["methods"]["tpe+freeze_thaw"].pop("episodes_to_target_by_study")
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["compare", "--a", str(tmp_path / "old.json"), "--b", str(b)]) != 0
    assert "old.json" in capsys.readouterr().err
    assert main(["compare", "--a", str(a), "--b", str(tmp_path / "a.png")]) != 0
    assert "a.png" in capsys.readouterr().err


def test_mean_band_contains_the_mean_and_narrows_with_more_repetitions():
    rng = np.random.default_rng(0)
    few, many = rng.normal(size=(10, 3)), rng.normal(size=(400, 3))
    m, lo, hi = stats.mean_band(few, 1000)
    assert np.all(lo <= m) and np.all(m <= hi)
    m2, lo2, hi2 = stats.mean_band(many, 1000)
    assert np.all(hi2 - lo2 < hi - lo)
    assert np.allclose(hi2 - lo2, 2 * 1.96 / math.sqrt(400), rtol=0.25)  # the normal theory's width


def test_trajectory_of_a_sim_run_is_monotone_in_budget():
    table = load_table(TINY)
    xs, ys = trajectory(table, run_study_sim(table, "tpe+plateau", 0, num_samples=6, cap=None))
    assert np.all(np.diff(xs) >= 0) and np.all(ys >= 0)


def test_shift_curves_delays_every_series_and_keeps_the_table_loadable(tmp_path, capsys):
    """scripts/shift_curves.py (the later-click stress tables of README "later clicks"): each curve holds its
    first value for the first share of its evaluations, then its recorded values follow, cut at the budget."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("shift_curves", REPO / "scripts" / "shift_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tiny = Path(__file__).parent / "data" / "curves-tiny.jsonl"
    out = tmp_path / "late.jsonl"
    assert mod.main([str(tiny), "--by", "0.25", "--out", str(out)]) == 0
    before, after = load_table(tiny), load_table(out)
    assert after.header["name"].endswith("-shift25") and after.n_curves == before.n_curves
    old = json.loads(tiny.read_text().splitlines()[1])
    new = json.loads(out.read_text().splitlines()[1])
    n, k = len(old["episodes"]), round(0.25 * len(old["episodes"]))
    assert k > 0 and new["episodes"] == old["episodes"] and new["train_s"] == old["train_s"]
    assert new["objective"][: k + 1] == [old["objective"][0]] * (k + 1)
    assert new["objective"][k:] == old["objective"][: n - k]
    early = tmp_path / "early.jsonl"  # advanced: the first share dropped, the last value held to the budget
    assert mod.main([str(tiny), "--by", "-0.25", "--out", str(early)]) == 0
    assert load_table(early).header["name"].endswith("-shift-25")
    new = json.loads(early.read_text().splitlines()[1])
    assert new["episodes"] == old["episodes"] and new["objective"][: n - k] == old["objective"][k:]
    assert new["objective"][n - k:] == [old["objective"][-1]] * k
    assert mod.main([str(tiny), "--by", "1.5", "--out", str(out)]) == 2
    assert "--by" in capsys.readouterr().err
    smooth = tmp_path / "smooth.jsonl"  # no click: a rise ** P from the first to the last value, the rest as recorded
    assert mod.main([str(tiny), "--smooth", "0.5", "--out", str(smooth)]) == 0
    assert load_table(smooth).header["name"].endswith("-smooth50")
    new = json.loads(smooth.read_text().splitlines()[1])
    first, last = old["objective"][0], old["objective"][-1]
    assert new["objective"] == pytest.approx([first + (last - first) * ((i + 1) / n) ** 0.5 for i in range(n)])
    assert new["episodes"] == old["episodes"] and new.get("train_loss") == old.get("train_loss")
    assert new["objective"][-1] == pytest.approx(last) and new["objective"] != old["objective"]
    assert mod.main([str(tiny), "--smooth", "0", "--out", str(smooth)]) == 2
    assert "--smooth" in capsys.readouterr().err
    ranked = tmp_path / "rank.jsonl"  # the click's order turned round: the higher a curve ends, the later it starts
    assert mod.main([str(tiny), "--by-rank", "0.5", "--out", str(ranked)]) == 0
    assert load_table(ranked).header["name"].endswith("-rank50")
    rows = [json.loads(x) for x in tiny.read_text().splitlines()[1:] if x.strip()]
    out_rows = [json.loads(x) for x in ranked.read_text().splitlines()[1:] if x.strip()]
    q = mod.final_quantiles(rows)
    top, low = q.index(max(q)), q.index(min(q))
    assert out_rows[top] == mod.shift_row(rows[top], 0.5) and out_rows[low] == rows[low]  # the best: a full half
    assert sorted(q) == [k / (len(rows) - 1) for k in range(len(rows))]
    assert mod.main([str(tiny), "--by-rank", "1", "--out", str(ranked)]) == 2


def test_sampler_first_good_counts_the_draws_until_a_good_configuration():
    """scripts/sampler_first_good.py (an instrument: docs/freeze-thaw.md): with every configuration at the target
    the first draw ends it; with only the best one, random sampling needs exactly the draws a RandomSampler of the
    same seed makes until one maps to it (replayed here by hand), and TPE told the click or the final value needs
    at least one."""
    import importlib.util

    import optuna

    from search import DefineByRun

    spec = importlib.util.spec_from_file_location("sampler_first_good", REPO / "scripts" / "sampler_first_good.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = load_table(TINY)
    everything = 100.0 * (table.best - float(table.value.min()))
    for told in ("random", "qmc", "click", "final"):
        assert mod.trials_to_first_good(table, everything, told, seed=0, n_startup=2) == 1
    best = int(np.argmax(table.value))
    for seed in range(3):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        define, k = DefineByRun(table.search), 0
        while True:
            k += 1
            trial = study.ask()
            define(trial)
            if table.curve_of(trial.params, seed)[0] == best:
                break
            study.tell(trial, 0.0)
        assert mod.trials_to_first_good(table, 0.0, "random", seed, n_startup=2) == k
        assert 1 <= mod.trials_to_first_good(table, 0.0, "click", seed, n_startup=2) <= 200
    # the oracle screen over the same draws: every curve watched to its click or the deadline, until the best
    # configuration's curve clicks by the deadline; none among the draws: inf
    from search.bench.bound import click_episodes

    clicks, max_t = click_episodes(table), float(table.search.max_episodes)
    drawn = list(mod.draws(table, "random", 0, 0, limit=60))
    first = next(i for i, (c, _) in enumerate(drawn) if c == best)
    for deadline in (0.5 * max_t, max_t):
        want = sum(min(clicks[c][v], deadline) for c, v in drawn[:first])
        if clicks[best][drawn[first][1]] <= deadline:
            assert mod.screen_episodes(table, 0.0, drawn, deadline) == want + clicks[best][drawn[first][1]]
    assert mod.screen_episodes(table, everything, drawn, max_t) == clicks[drawn[0][0]][drawn[0][1]]
    assert mod.screen_episodes(table, 0.0, drawn[:first], max_t) == float("inf")


def test_the_target_is_a_regret_most_baseline_studies_reach():
    """With an even number of baseline studies the target is the upper of the two middle final regrets (their
    mean, 2.5 here, is reached by only half the studies: the baseline's median episodes to it would be infinite
    and its own speed-up 0), so the baseline's median episodes to its target are finite."""
    from search.bench import stats
    from search.bench.replay import target_regret

    table = load_table(TINY)
    finals = [1.0, 2.0, 3.0, 4.0]
    baseline = [(np.array([10.0, 20.0 * (k + 1)]), np.array([9.0, f])) for k, f in enumerate(finals)]
    target = target_regret(table, baseline)
    assert target == 3.0
    to_target = [float(xs[np.argmax(ys <= target)]) if (ys <= target).any() else math.inf for xs, ys in baseline]
    assert math.isfinite(float(np.median(to_target))) and stats.speedup(to_target, to_target) == 1.0
    assert target_regret(table, baseline[:3]) == 2.0  # odd: the median itself


def test_a_table_of_seed_noise_is_flagged_as_unable_to_tell_methods_apart(tmp_path, capsys):
    """``config_share`` (the share of the final values' variance between configurations rather than between seeds)
    is high on a recorded table and near 0 on curves of noise around one level; the benchmark saves it and warns
    below ``NOISE_SHARE``, where its speed-ups would rank luck."""
    from search.bench.table import NOISE_SHARE, load_table
    from search.cli import main

    rng = np.random.default_rng(0)
    lines = TINY.read_text().splitlines()
    rows = [json.loads(x) for x in lines[1:]]
    for r in rows:
        r["objective"] = [0.2 + 0.01 * float(x) for x in rng.standard_normal(len(r["objective"]))]
    noise = tmp_path / "noise.jsonl"
    noise.write_text("\n".join([lines[0], *(json.dumps(r) for r in rows)]) + "\n")
    real, flat = load_table(REPO / "results" / "curves" / "quickstart.jsonl"), load_table(noise)
    assert real.config_share() > 0.9 and flat.config_share() < NOISE_SHARE
    for path, warned in ((noise, True), (TINY, False)):
        assert main(["benchmark", "--curves", str(path), "--repeats", "3", "--markdown", "--plot",
                     str(tmp_path / "p.png"), "--n-boot", "50", "--methods", "random",
                     "--save", str(tmp_path / "out.json")]) == 0
        assert ("warning: only" in capsys.readouterr().out) == warned
        saved = json.loads((tmp_path / "out.json").read_text())
        assert (saved["tables"]["tiny"]["config_share"] < NOISE_SHARE) == warned
        for fmt in ("--markdown", "--json"):  # `curves signals` says so too (and saves the share)
            assert main(["curves", "signals", str(path), fmt]) == 0
            out = capsys.readouterr().out
            assert ("warning: only" in out) == (warned and fmt == "--markdown")
        assert main(["curves", "signals", str(path)]) == 0
        assert ("warning: only" in capsys.readouterr().out) == warned


def test_freeze_thaws_spend_before_the_target_is_split_by_its_last_word_on_each_trial():
    """``spend_to_target``: a study's episodes until it reached the target, in full runs, on configurations at
    the target (``good``) and on the others by freeze_thaw's last word on each trial (schedulers.WHY): with a
    target never reached they add up to the study's whole spend; with one reached at the first result, to that
    result's episodes."""
    from search.bench.replay import spend_to_target
    from search.bench.table import load_table
    from search.config import load_search_config
    from search.schedulers import WHY

    table = load_table(TINY)
    shipped = load_search_config(REPO / "configs/search/quickstart.yaml").config
    max_t = float(table.search.max_episodes)
    none_good = np.zeros(len(table.value), dtype=bool)
    for seed in range(3):
        run = run_study_sim(table, "tpe+freeze_thaw", seed, num_samples=12, cap=None, shipped=shipped)
        assert run.why and set(run.why.values()) <= set(WHY)
        last: dict[str, float] = {}
        for trial, e, *_ in run.results:
            last[trial] = e
        never = spend_to_target(table, run, -1.0, none_good)
        assert set(never) <= set(WHY) | {"other"}
        assert sum(never.values()) == pytest.approx(sum(last.values()) / max_t)
        first = spend_to_target(table, run, 1e9, none_good)
        assert sum(first.values()) == pytest.approx(run.results[0][1] / max_t)
        assert set(spend_to_target(table, run, -1.0, ~none_good)) == {"good"}
