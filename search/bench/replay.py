"""``mann-search benchmark``: search methods compared on a table of recorded learning curves, through the real
search path (the Tuner, searcher, sampler and scheduler that ``mann-search run`` builds), without training.

* **Replay.** A trial's sampled point is mapped to the *nearest recorded configuration* (:mod:`search.bench.table`)
  in a normalised space (numbers scaled to [0, 1] over their range, on a log scale where the space says ``log``; a
  categorical or an inactive conditional parameter adds 1 to the squared distance when it differs). The trial then
  serves one recorded seed of that configuration (chosen per repetition and point), reporting each evaluation
  through ``tune.report`` after sleeping the recorded training time between evaluations times ``compress``, so
  asynchronous trials reach their rungs in a realistic order. Nearest neighbour works on any table in the documented
  format, random draws included, and never invents a curve; its leave-one-out check (the final accuracy of each
  configuration predicted by its nearest other one) is printed as ``mapping_loo``; ``config_share``, the share of
  the final values' variance between configurations rather than between seeds (:meth:`Table.config_share`), says
  whether the table has anything to find: near 0 it ranks seeds, and the CLI warns (below
  :data:`search.bench.table.NOISE_SHARE`).
* **Scores.** The table's value of a configuration is the mean over its seeds of the final objective. At any point
  of a study the selected configuration is the trial with the best latest reported objective (what selection
  ranks by); its regret is the table's best value minus the selected configuration's, in points.
  ``episodes_to_1pt``: episodes spent until the regret is at most 1 point. ``kill_before_click``: the share of
  the trials the scheduler stopped (before the full budget and before the study's episode cap) whose recorded
  curve ends in the table's top quartile of curves.
* **Budget.** The baseline (today's TPE + ASHA: Ray's plain OptunaSearch) runs its full study first: the
  config's ``num_samples`` trials, no cap. Its spend (median over repeats) is the budget unit of ``regret_at``;
  its largest spend is the episode cap (``budget.max_episodes``) every other method then gets, with up to
  ``4 x num_samples`` trials to spend it on, so early stopping buys more trials, as in a capped study.
* **Methods.** Each is the table's recorded search config with a few overrides (:mod:`search.bench.methods`):
  sampler and scheduler kind; ASHA and median stopping keep the recorded settings, the plateau rule and freeze_thaw
  take the shipped config's when it uses them (else a grace of 15 % of the budget and the shipped config's
  ``scheduler.plateau`` / ``scheduler.freeze_thaw`` section, never the table's recorded one: that holds the defaults
  of the day it was recorded). Trials report every ``every``-th recorded evaluation (the CLI matches the shipped
  config's ``eval_every``).

One Ray instance runs every study (``parallel`` at once, each its own Tuner in a thread); no MLflow callback;
Optuna storage: a SQLite file per study in /dev/shm (Ray's OptunaSearch for the baseline: in memory).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mann.config import ConfigError
from search import BudgetWatch, Ending, LoadedSearch, SearchConfig, TrialReport, build_tuner, connect_ray, decide

from . import bound, stats
from .methods import BASELINE, METHODS, Run, method_searcher, method_study
from .sim import SIM_ONLY, run_study_sim
from .table import Table, finite, final_objective, load_table, recorded_values, with_shape

FRACTIONS = (0.25, 0.5, 1.0)


# --- the replay trainable ------------------------------------------------------------------------------------


def replay_trial(config: dict[str, Any], table: Table, compress: float, salt: int, every: int = 1,
                 checkpoints: bool = False) -> None:
    """Tune entry point: serve the recorded curve of the configuration nearest to ``config`` (every ``every``-th
    evaluation, and the last). With ``checkpoints`` every report carries a checkpoint (the evaluation's index),
    and a trial resumed from one (paused, then resumed) goes on after it."""
    from ray import tune

    metric = table.search.config.primary.metric
    idx, c = table.curve_of(config, salt)
    curve = table.curves[idx][c]
    prev, start = 0.0, 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "replay.json").read_text())["next"]
        prev = float(curve["train_s"][start - 1]) if start else 0.0
    n = len(curve["episodes"])
    for i, (episodes, value, train_s) in enumerate(zip(curve["episodes"], curve["objective"], curve["train_s"])):
        if i < start or ((i + 1) % every and i + 1 < n and finite(value)):
            continue
        time.sleep(max(0.0, (float(train_s) - prev) * compress))
        prev = float(train_s)
        if not finite(value):
            tune.report(TrialReport(int(episodes), {metric: 0.0 if table.sign > 0 else 1e9}, diverged=True,
                                    failure="the recorded curve diverged").to_result())
            return
        result = TrialReport(int(episodes), recorded_values(curve, i, metric)).to_result()
        if not checkpoints:
            tune.report(result)
            continue
        with tempfile.TemporaryDirectory(prefix="replay-ckpt-") as d:
            (Path(d) / "replay.json").write_text(json.dumps({"next": i + 1}))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))


# --- one study -----------------------------------------------------------------------------------------------


def _recorder(run: Run, table: Table, search: LoadedSearch, salt: int):
    from ray.tune import Callback

    metric = search.config.primary.metric

    class Recorder(Callback):
        def __init__(self):
            self.watch = BudgetWatch.of(search)
            self.paused_now: set[str] = set()

        def on_trial_start(self, iteration, trials, trial, **info):
            if trial.trial_id not in run.started:
                run.started.append(trial.trial_id)

        def on_step_begin(self, iteration, trials, **info):
            self._pauses(trials)

        def on_step_end(self, iteration, trials, **info):
            self._pauses(trials)

        def _pauses(self, trials) -> None:
            for t in trials:
                if t.status == "PAUSED" and t.trial_id not in self.paused_now:
                    self.paused_now.add(t.trial_id)
                elif t.status in ("PENDING", "RUNNING") and t.trial_id in self.paused_now:
                    self.paused_now.discard(t.trial_id)
                    run.resumed[t.trial_id] = run.resumed.get(t.trial_id, 0) + 1

        def on_trial_result(self, iteration, trials, trial, result, **info):
            report = TrialReport.from_result(result)
            self.watch.observe(trial.trial_id, report)
            if report is not None and report.value(metric) is not None:
                cfg, c = table.curve_of(trial.config, salt)
                run.results.append((trial.trial_id, float(report.episodes), report.value(metric), cfg, c))

        def on_trial_complete(self, iteration, trials, trial, **info):
            run.ended[trial.trial_id] = decide(TrialReport.from_result(trial.last_result), self.watch.facts())

        def on_trial_error(self, iteration, trials, trial, **info):
            run.ended[trial.trial_id] = decide(TrialReport.from_result(trial.last_result), self.watch.facts(),
                                               "the replay raised")

        def on_experiment_end(self, trials, **info):
            run.paused = sorted(self.paused_now)  # paused and never resumed
            for t in trials:
                if t.trial_id not in run.ended and t.last_result:
                    run.ended[t.trial_id] = decide(TrialReport.from_result(t.last_result),
                                                   self.watch.facts(study_ended=True),
                                                   paused=t.trial_id in self.paused_now)

    return Recorder()


def run_study(table: Table, method: str, repeat: int, workdir: Path, compress: float,
              num_samples: int, cap: int | None, every: int = 1, shipped: SearchConfig | None = None) -> Run:
    """One study of ``method`` through a real Tuner (the ``tune`` engine)."""
    from ray import tune

    search, study, flavour = method_study(
        table, method, repeat, num_samples, cap, shipped,
        optuna_storage=f"sqlite:///{workdir / f'optuna-{abs(hash((method, repeat)))}.db'}",
        path=str(workdir / "tune" / f"{method.replace(' ', '_')}-{repeat}"))
    run = Run()
    searcher = method_searcher(search, study, flavour)
    trainable = tune.with_resources(
        tune.with_parameters(replay_trial, table=table, compress=compress, salt=repeat, every=every,
                             checkpoints=search.config.scheduler.kind == "freeze_thaw"),
        {"cpu": 1})
    t0 = time.perf_counter()
    build_tuner(study, _recorder(run, table, search, repeat), trainable=trainable, search_alg=searcher,
                verbose=0, reuse_actors=True).fit()
    run.wall_s = time.perf_counter() - t0
    shutil.rmtree(study.path, ignore_errors=True)
    return run


# --- scoring -------------------------------------------------------------------------------------------------


def trajectory(table: Table, run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(episodes spent, regret in points of the selected configuration) after each result."""
    latest: dict[str, tuple[float, int]] = {}
    spent: dict[str, float] = {}
    xs, ys = [], []
    for trial, e, v, cfg, _ in run.results:
        latest[trial] = (table.sign * v, cfg)
        spent[trial] = e
        chosen = max(latest.values(), key=lambda x: x[0])[1]
        xs.append(sum(spent.values()))
        ys.append(100.0 * (table.best - table.value[chosen]))
    return np.array(xs), np.array(ys)


def regret_at(xs: np.ndarray, ys: np.ndarray, budget: float, blind: float) -> float:
    i = np.searchsorted(xs, budget, side="right") - 1
    return float(ys[i]) if i >= 0 else blind


def full_study_episodes(run: Run, num_samples: int) -> float:
    """Episodes of the first ``num_samples`` trials (what a study of that many samples spends)."""
    last: dict[str, float] = {}
    for trial, e, *_ in run.results:
        last[trial] = e
    return float(sum(last.get(t, 0.0) for t in run.started[:num_samples]))


def spend_to_target(table: Table, run: Run, target: float, good: np.ndarray) -> dict[str, float]:
    """Where a study's episodes went until it reached ``target`` (its whole spend if it never did), in full
    runs: ``good`` for trials of configurations at the target, else by the scheduler's last word on the trial
    (``Run.why``, :data:`search.schedulers.WHY`; ``other`` where it has none)."""
    xs, ys = trajectory(table, run)
    until = stats.first_reach(xs, ys, target)
    spent: dict[str, float] = {}
    cfg_of: dict[str, int] = {}
    for trial, e, _, cfg, _ in run.results:
        if sum(spent.values()) >= until:
            break
        spent[trial], cfg_of[trial] = e, cfg
    out: dict[str, float] = {}
    for trial, e in spent.items():
        key = "good" if good[cfg_of[trial]] else run.why.get(trial, "other")
        out[key] = out.get(key, 0.0) + e / float(table.search.max_episodes)
    return out


def kills(table: Table, run: Run) -> tuple[int, int, int, int]:
    """(stopped for good by the scheduler, of which the curve ends in the top quartile; paused and never
    resumed, of which the curve ends in the top quartile)."""
    curve_of = {t: (cfg, c) for t, _, _, cfg, c in run.results}
    paused = set(run.paused)
    stopped = top = held = held_top = 0
    for trial, (cfg, c) in curve_of.items():
        final = final_objective(table.curves[cfg][c], table.sign)
        good = final is not None and final >= table.top_quartile
        if trial in paused:
            held += 1
            held_top += good
        elif trial in run.ended and run.ended[trial].ending == Ending.EARLY_STOPPED:
            stopped += 1  # completed, ended by the study's cap, or failed: not the scheduler's kill
            top += good
    return stopped, top, held, held_top


def _run_tune(table: Table, methods: list[str], repeats: int, compress: float, shipped, every: int,
              parallel: int, progress, t0: float) -> dict[str, list[Run]]:
    """Every method's studies through real Tuners (``parallel`` at once, one Ray instance)."""
    import logging
    import os
    from concurrent.futures import ThreadPoolExecutor

    saved_env = {k: os.environ.get(k) for k in ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_AIR_NEW_OUTPUT")}
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no result files: nobody reads them
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    budget = table.search.config.budget
    started = connect_ray(num_cpus=parallel * (budget.max_concurrent or 2)) == "local"
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="mann-bench-", dir=shm if shm.is_dir() else None))
    runs: dict[str, list[Run]] = {}
    try:
        with serialised_tune_registry(), ThreadPoolExecutor(parallel) as pool:
            cap = None
            for m in methods:
                n = budget.num_samples if cap is None else 4 * budget.num_samples
                futures = [pool.submit(run_study, table, m, r, work, compress, n, cap, every, shipped)
                           for r in range(repeats)]
                runs[m] = [f.result() for f in futures]
                if cap is None:
                    cap = int(max(full_study_episodes(x, budget.num_samples) for x in runs[m]))
                progress(f"{m}: {repeats} studies, {time.perf_counter() - t0:.0f} s so far")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if started:  # the Ray we started goes with us (its dashboard agent holds a port other clusters need)
            import ray

            ray.shutdown()
        for k, v in saved_env.items():  # and so do our settings (a caller's later `mann-search run` needs them)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return runs


def _run_sim(table: Table, methods: list[str], repeats: int, shipped, every: int, progress,
             t0: float) -> dict[str, list[Run]]:
    """Every method's studies on the simulated engine, one after another in this process."""
    num_samples = table.search.config.budget.num_samples
    runs: dict[str, list[Run]] = {}
    cap = target = None
    for m in methods:
        n = num_samples if cap is None else 4 * num_samples
        t1 = time.perf_counter()
        runs[m] = []
        for r in range(repeats):
            runs[m].append(run_study_sim(table, m, r, n, cap, every, shipped, target=target))
            runs[m][-1].wall_s = time.perf_counter() - t1 - sum(x.wall_s for x in runs[m][:-1])
        if cap is None:
            cap = int(max(full_study_episodes(x, num_samples) for x in runs[m]))
            target = target_regret(table, [trajectory(table, x) for x in runs[m]])
        progress(f"{m}: {repeats} studies, {time.perf_counter() - t0:.0f} s so far")
    return runs


def blind_regret(table: Table) -> float:
    """The regret before anything was reported: a configuration at random (points)."""
    return 100.0 * (table.best - float(table.value.mean()))


def target_regret(table: Table, baseline: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The benchmark's target: the median over the baseline's studies (their :func:`trajectory`) of their final
    regret; for an even number of studies the upper of the two middle ones, a regret the baseline reaches in more
    than half of its studies (their mean, ``np.median``'s, may be reached by exactly half: the baseline's own
    median episodes to it were then infinite, and every speed-up undefined; seen with 10 repeats)."""
    finals = sorted(float(ys[-1]) if len(ys) else blind_regret(table) for _, ys in baseline)
    return finals[len(finals) // 2]


ENGINES = ("sim", "tune")


def benchmark(curves: str | Path, repeats: int = 100, methods: list[str] | None = None, compress: float = 0.005,
              plot: str | Path | None = None, shipped: SearchConfig | None = None, every: int = 1,
              parallel: int = 3, progress=print, engine: str = "sim", n_boot: int = 2000,
              keep_runs: bool = False, table: Table | None = None, num_samples: int | None = None,
              max_concurrent: int | None = None) -> dict[str, Any]:
    """Run every method ``repeats`` times on the table with ``engine`` ("sim": :mod:`search.bench.sim`;
    "tune": real Tuners, ``parallel`` at once in one Ray instance); the table's summary (see module doc and
    ``docs/benchmark.md``). ``num_samples``/``max_concurrent``: the baseline's study shape (:func:`with_shape`;
    default: the table's recorded search). ``keep_runs``: the studies too (under ``"_runs"``, not JSON)."""
    import optuna

    if engine not in ENGINES:
        raise ConfigError(f"--engine: {engine!r}; known: {list(ENGINES)}")
    table = with_shape(table if table is not None else load_table(curves), num_samples, max_concurrent)
    known = list(METHODS) + (list(SIM_ONLY) if engine == "sim" else [])
    methods = list(methods or known)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"--methods: unknown for the {engine} engine: {unknown}; known: {known}")
    methods = [BASELINE, *[m for m in methods if m != BASELINE]]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    if engine == "sim":
        runs = _run_sim(table, methods, repeats, shipped, every, progress, t0)
    else:
        runs = _run_tune(table, methods, repeats, compress, shipped, every, parallel, progress, t0)
    out = score(table, runs, shipped, n_boot)
    out.update(engine=engine, repeats=repeats, report_every=every, wall_s=round(time.perf_counter() - t0, 1))
    plot = Path(plot) if plot else Path(curves).with_suffix(".benchmark.png")
    _plot(out.pop("_bands"), out.pop("_grid"), plot, table, repeats, engine)
    out["plot"] = str(plot)
    if keep_runs:
        out["_runs"] = runs
    return out


def score(table: Table, runs: dict[str, list[Run]], shipped: SearchConfig | None = None,
          n_boot: int = 2000) -> dict[str, Any]:
    """The figures of every method's studies (the same for both engines; ``docs/benchmark.md``, Statistics)."""
    num_samples = table.search.config.budget.num_samples
    max_t = float(table.search.max_episodes)
    full = float(np.median([full_study_episodes(x, num_samples) for x in runs[BASELINE]]))
    cap = int(max(full_study_episodes(x, num_samples) for x in runs[BASELINE]))
    blind = blind_regret(table)
    scale = 100.0 * (table.best - float(np.median(table.value)))  # normalised regret: 1 = the median config
    if scale <= 0:  # more than half the configurations tie at the best: 1 = the mean configuration instead
        scale = 100.0 * (table.best - float(np.mean(table.value)))  # > 0: load_table refuses a flat table
    trajs = {m: [trajectory(table, x) for x in rs] for m, rs in runs.items()}
    target = target_regret(table, trajs[BASELINE])
    share = table.config_share()
    to_target = {m: np.array([stats.first_reach(xs, ys, target) for xs, ys in tr]) for m, tr in trajs.items()}
    grid = stats.log_grid(0.1 * max_t, max(cap, max_t), 100)
    out: dict[str, Any] = {
        "curves": table.n_curves, "configs": len(table.points), "baseline": BASELINE,
        "default": _method_of(shipped or table.search.config), "full_study_episodes": full, "episode_cap": cap,
        "study_shape": {"num_samples": num_samples, "max_concurrent": table.search.config.budget.max_concurrent},
        "full_run_episodes": max_t, "table_best": table.best * table.sign, "target_regret": round(target, 3),
        "normalisation_points": round(scale, 3), "mapping_loo": round(table.mapping_loo(), 3),
        "config_share": None if share is None else round(share, 3), "methods": {}}
    oracle = bound.oracle_screen(table, target)
    base_median = float(np.median(to_target[BASELINE]))
    out["oracle_screen"] = {**oracle, "speedup_bound": stats.finite_or_none(base_median / oracle["episodes_to_target"])}
    bands = {}
    for k, (m, tr) in enumerate(trajs.items()):
        seed = 1000 * k
        at = {}
        for f in FRACTIONS:
            med, lo, hi = stats.median_ci([regret_at(xs, ys, f * full, blind) for xs, ys in tr], n_boot, seed + 1)
            at[str(f)] = {"median": round(med, 3), "ci95": [round(lo, 3), round(hi, 3)]}
        s, lo, hi = stats.speedup_ci(to_target[BASELINE], to_target[m], n_boot, seed + 2)
        curves = np.array([stats.value_at(xs, ys, grid, blind) for xs, ys in tr]) / scale
        bands[m] = stats.mean_band(curves, min(n_boot, 1000), seed + 3)
        k4 = np.array([kills(table, x) for x in runs[m]]).reshape(-1, 4).sum(axis=0)
        reached = float(np.mean(np.isfinite(to_target[m])))
        out["methods"][m] = {
            "regret_at": at,
            "speedup": {"median": stats.finite_or_none(s), "ci95": [stats.finite_or_none(lo),
                                                                    stats.finite_or_none(hi)]},
            "reached": round(reached, 3),
            "episodes_to_target": stats.finite_or_none(float(np.median(to_target[m])), 0),
            # per study, seed order (null: never reached): `mann-search compare` pairs two runs' studies by it
            "episodes_to_target_by_study": [stats.finite_or_none(float(x), 0) for x in to_target[m]],
            "kill_before_click": {"stopped": round(k4[1] / k4[0], 4) if k4[0] else 0.0,
                                  "paused_never_resumed": round(k4[3] / k4[2], 4) if k4[2] else 0.0,
                                  "stopped_trials": int(k4[0]), "paused_trials": int(k4[2])},
            "normalized_regret_at": {str(f): round(float(np.mean([stats.value_at(xs, ys, f * full, blind)
                                                                 for xs, ys in tr])) / scale, 3) for f in FRACTIONS},
            "trials_per_study": round(float(np.mean([len(x.started) for x in runs[m]])), 1),
            **({"spend_to_target": _mean_spend(table, runs[m], target)} if any(x.why for x in runs[m]) else {}),
            "wall_s": round(sum(x.wall_s for x in runs[m]), 1)}
        out["methods"][m]["_to_target"] = to_target[m]
    out["_bands"], out["_grid"] = bands, grid / max_t
    return out


def _mean_spend(table: Table, runs: list[Run], target: float) -> dict[str, float]:
    """:func:`spend_to_target`, the mean over a method's studies, largest first (full runs per study)."""
    good = bound.good_configurations(table, target)
    total: dict[str, float] = {}
    for run in runs:
        for k, v in spend_to_target(table, run, target, good).items():
            total[k] = total.get(k, 0.0) + v / len(runs)
    return {k: round(v, 2) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def benchmark_tables(tables: list[str | Path], per_table: list[dict[str, Any]] | None = None,
                     **kwargs) -> dict[str, Any]:
    """:func:`benchmark` on each table; one object: the tables' summaries by table name and, per method, the
    geometric mean of its speed-ups across tables with a stratified bootstrap interval. ``per_table``: for each
    table, keyword arguments of its own (its shipped config and report interval: a table of another task has its
    own shipped study)."""
    t0 = time.perf_counter()
    plot = kwargs.pop("plot", None)
    n_boot = kwargs.get("n_boot", 2000)
    out: dict[str, Any] = {"engine": kwargs.get("engine", "sim"), "repeats": kwargs.get("repeats", 100),
                           "tables": {}, "across_tables": {}}
    used: set[str] = set()
    loaded = [load_table(path) for path in tables]  # every table checked before the first is run
    for i, (path, table) in enumerate(zip(tables, loaded)):
        name = table.header.get("name") or Path(path).stem
        if plot and len(tables) > 1:  # one plot per table: PLOT's name with the table's (or its position)
            tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            tag = f"{tag}-{i}" if tag in used else tag
            used.add(tag)
            p = Path(plot).with_name(f"{Path(plot).stem}-{tag}{Path(plot).suffix or '.png'}")
        else:
            p = plot
        own = dict(per_table[i]) if per_table else {}
        shipped_file = own.pop("shipped_file", None)
        res = benchmark(path, plot=p, table=table, **{**kwargs, **own})
        res["shipped_config"] = shipped_file
        if name in out["tables"]:  # two tables of one name: the second by its file too
            name = f"{name} ({path})"
        out["tables"][name] = res
    methods = set.intersection(*(set(t["methods"]) for t in out["tables"].values()))
    for m in sorted(methods, key=lambda m: (m != BASELINE, m)):
        pairs = [(t["methods"][BASELINE]["_to_target"], t["methods"][m]["_to_target"])
                 for t in out["tables"].values()]
        g, lo, hi = stats.geomean_ci(pairs, n_boot)
        out["across_tables"][m] = {"speedup_geomean": stats.finite_or_none(g),
                                   "ci95": [stats.finite_or_none(lo), stats.finite_or_none(hi)]}
    bounds = [t["oracle_screen"]["speedup_bound"] for t in out["tables"].values()]
    out["oracle_screen_bound_geomean"] = (stats.finite_or_none(stats.geomean(bounds))
                                          if all(b is not None for b in bounds) else None)
    for t in out["tables"].values():
        for v in t["methods"].values():
            v.pop("_to_target")
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def _saved_tables(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """The tables of saved benchmark JSON files (``--save``; a folder: every ``*.json`` in it, as
    ``scripts/bench_later_clicks.sh`` writes them), by table name."""
    files: list[Path] = []
    for p in map(Path, paths):
        found = sorted(p.glob("*.json")) if p.is_dir() else [p]
        if not found:
            raise ConfigError(f"{p}: no benchmark JSON files in this folder")
        files += found
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            saved = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{f}: not a saved benchmark ({e})") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("tables"), dict):
            raise ConfigError(f"{f}: not a saved benchmark (no 'tables'; write one with `mann-search benchmark "
                              f"... --save FILE`)")
        for name, t in saved["tables"].items():
            if name in out:
                raise ConfigError(f"{f}: table {name!r} is in two of the files on one side")
            out[name] = {**t, "_file": str(f)}
    return out


def compare_saved(a: list[str | Path], b: list[str | Path], method: str, n_boot: int = 2000) -> dict[str, Any]:
    """Two saved benchmark runs of ``method`` (A: e.g. the defaults; B: a variant, ``--set``), paired study by
    study on each table both hold: per table B's speed-up over A (A's median episodes to the benchmark's target
    over B's) with a paired bootstrap interval, and across tables the geometric mean with a stratified one. Both
    runs must share the tables' target and repeats (the same baseline studies: same seeds, same install)."""
    ta, tb = _saved_tables(a), _saved_tables(b)
    common = [n for n in ta if n in tb]
    if not common:
        raise ConfigError(f"no table in both runs (A: {sorted(ta)}; B: {sorted(tb)})")
    out: dict[str, Any] = {"method": method, "tables": {}, "only_in_one": sorted(set(ta) ^ set(tb))}
    pairs = []
    for k, name in enumerate(common):
        x, y = ta[name], tb[name]
        for t in (x, y):
            if method not in t["methods"]:
                raise ConfigError(f"{t['_file']}: table {name!r} has no {method!r} (it has {sorted(t['methods'])})")
            if "episodes_to_target_by_study" not in t["methods"][method]:
                raise ConfigError(f"{t['_file']}: no per-study figures (saved before 2026-12-07); run the benchmark "
                                  f"again to compare")
        if x["target_regret"] != y["target_regret"] or x.get("repeats") != y.get("repeats"):
            raise ConfigError(f"table {name!r}: the runs are not paired (target {x['target_regret']} against "
                              f"{y['target_regret']}, repeats {x.get('repeats')} against {y.get('repeats')}): "
                              f"run both with the same repeats on the same install")
        ea, eb = ([math.inf if v is None else float(v) for v in t["methods"][method]["episodes_to_target_by_study"]]
                  for t in (x, y))
        r, lo, hi = stats.paired_ratio_ci(ea, eb, n_boot, seed=7 + k)
        pairs.append((ea, eb))
        out["tables"][name] = {"a": {"speedup": x["methods"][method]["speedup"]["median"],
                                     "reached": x["methods"][method]["reached"], "file": x["_file"]},
                               "b": {"speedup": y["methods"][method]["speedup"]["median"],
                                     "reached": y["methods"][method]["reached"], "file": y["_file"]},
                               "b_over_a": {"median": stats.finite_or_none(r),
                                            "ci95": [stats.finite_or_none(lo), stats.finite_or_none(hi)]}}
    g, lo, hi = stats.paired_geomean_ci(pairs, n_boot, seed=3)
    out["across_tables"] = {"b_over_a_geomean": stats.finite_or_none(g),
                            "ci95": [stats.finite_or_none(lo), stats.finite_or_none(hi)]}
    return out


@contextmanager
def serialised_tune_registry():
    """Within the block, Tune's process-global trainable registry takes one registration at a time; undone
    after. Tune registers each Tuner's trainable there and the registry is not thread-safe (Ray 2.60:
    "dictionary changed size during iteration" when two Tuners start at once); studies run in threads here.
    The one Ray private name the instruments touch (``ray.tune.registry._Registry``)."""
    import threading

    from ray.tune import registry

    cls = getattr(registry, "_Registry")
    register, lock = cls.register, threading.Lock()

    def locked(self, *args, **kwargs):
        with lock:
            return register(self, *args, **kwargs)

    cls.register = locked
    try:
        yield
    finally:
        cls.register = register


def _method_of(cfg: SearchConfig) -> str:
    kind, sampler = cfg.scheduler.kind, cfg.sampler.kind
    if kind == "asha":
        return "tpe+asha" if sampler == "tpe" else f"{sampler}+asha"
    return sampler if kind == "none" else f"{sampler}+{kind}"


def _plot(bands: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], x: np.ndarray, path: Path, table: Table,
          repeats: int, engine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, (mean, lo, hi) in bands.items():
        (line,) = ax.plot(x, mean, label=m)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("episodes spent / episodes of one full run (log)")
    ax.set_ylabel("normalised regret (1 = the median configuration)")
    ax.set_title(f"{table.header.get('name')}: {len(table.points)} configs, {table.n_curves} curves, "
                 f"{repeats} repeats, {engine} engine (mean, 95 % bootstrap interval)", fontsize=9)
    ax.set_xlim(float(x[0]), float(x[-1]))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
