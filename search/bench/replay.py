"""``mann-search benchmark``: search methods compared on a table of recorded learning curves, through the real
search path (the Tuner, searcher, sampler and scheduler that ``mann-search run`` builds), without training.

* **Replay.** A trial's sampled point is mapped to the *nearest recorded configuration* in a normalised space
  (numbers scaled to [0, 1] over their range, on a log scale where the space says ``log``; a categorical or an
  inactive conditional parameter adds 1 to the squared distance when it differs). The trial then serves one
  recorded seed of that configuration (chosen per repetition and point), reporting each evaluation through
  ``tune.report`` after sleeping the recorded training time between evaluations times ``compress``, so
  asynchronous trials reach their rungs in a realistic order. Nearest neighbour works on any table in the
  documented format, random draws included, and never invents a curve; its leave-one-out check (the final
  accuracy of each configuration predicted by its nearest other one) is printed as ``mapping_loo``.
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
* **Methods.** Each is the table's recorded search config with a few overrides (``METHODS``): sampler and
  scheduler kind; ASHA and median stopping keep the recorded settings, the plateau rule takes the shipped
  config's when it uses it (else a grace of 15 % of the budget). Trials report every ``every``-th recorded
  evaluation (the CLI matches the shipped config's ``eval_every``).

One Ray instance runs every study (``parallel`` at once, each its own Tuner in a thread); no MLflow callback;
Optuna storage: a SQLite file per study in /dev/shm (Ray's OptunaSearch for the baseline: in memory).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mann import metrics
from mann.config import ConfigError
from search import (BudgetWatch, DefineByRun, Ending, LoadedSearch, SearchConfig, Study, TrialOutcome, TrialReport,
                    build_tuner, connect_ray, decide, make_sampler, make_searcher, sampled_point)

from .curves import read_table

BASELINE = "tpe+asha (ray optuna)"
# name -> (search-config overrides, searcher flavour: "study" = StudySearch, "ray" = Ray's plain OptunaSearch)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "random": ({"sampler.kind": "random", "scheduler.kind": "none"}, "study"),
    "tpe": ({"sampler.kind": "tpe", "scheduler.kind": "none"}, "study"),
    BASELINE: ({"sampler.kind": "tpe", "scheduler.kind": "asha"}, "ray"),
    "tpe+asha": ({"sampler.kind": "tpe", "scheduler.kind": "asha"}, "study"),
    "tpe+median": ({"sampler.kind": "tpe", "scheduler.kind": "median"}, "study"),
    "tpe+plateau": ({"sampler.kind": "tpe", "scheduler.kind": "plateau"}, "study"),
    "tpe+freeze_thaw": ({"sampler.kind": "tpe", "scheduler.kind": "freeze_thaw"}, "study"),
}
FRACTIONS = (0.25, 0.5, 1.0)


# --- the table -----------------------------------------------------------------------------------------------


@dataclass
class Table:
    header: dict[str, Any]
    search: LoadedSearch
    points: list[dict[str, Any]]  # one per recorded configuration
    curves: list[list[dict[str, Any]]]  # per configuration, its usable seeds' curves
    value: np.ndarray  # per configuration: mean over seeds of the final objective (larger = better)
    vectors: np.ndarray  # per configuration: its normalised coordinates
    top_quartile: float  # of the curves' final objectives
    sign: float = 1.0  # -1 for a "min" objective: every value here is larger = better

    @property
    def best(self) -> float:
        return float(self.value.max())

    @property
    def n_curves(self) -> int:
        return sum(len(c) for c in self.curves)

    def curve_of(self, config: dict[str, Any], salt: int) -> tuple[int, int]:
        """(configuration, seed) a trial with this Tune config replays in repetition ``salt``."""
        point = sampled_point(config)
        idx = self.nearest(point)
        return idx, pick_seed(len(self.curves[idx]), point, salt)

    def nearest(self, point: dict[str, Any]) -> int:
        d = ((self.vectors - coordinates(self.search, point)) ** 2).sum(axis=1)
        return int(np.argmin(d))

    def mapping_loo(self) -> float:
        """Correlation of each configuration's value with its nearest other configuration's."""
        if len(self.points) < 3:
            return float("nan")
        d = ((self.vectors[:, None, :] - self.vectors[None, :, :]) ** 2).sum(axis=2)
        np.fill_diagonal(d, np.inf)
        return float(np.corrcoef(self.value, self.value[d.argmin(axis=1)])[0, 1])


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def search_from_header(header: dict[str, Any], overrides: dict[str, Any] | None = None) -> LoadedSearch:
    """The table's search (config and base MANN tree, both in its header), with search-config overrides."""
    return LoadedSearch.from_trees(header["search"], header["base"], overrides)


def coordinates(search: LoadedSearch, point: dict[str, Any]) -> np.ndarray:
    out: list[float] = []
    for path, spec in search.config.space.items():
        v = point.get(path)
        if spec.type == "categorical":
            out.extend(math.sqrt(0.5) * float(v == c) for c in spec.choices)
            out.append(math.sqrt(0.5) * float(v is None and path not in point))
            continue
        if v is None:
            out.extend([0.0, 1.0])  # inactive: 1 away from any active value
            continue
        lo, hi, x = float(spec.low), float(spec.high), float(v)
        if spec.log:
            lo, hi, x = math.log(lo), math.log(hi), math.log(x)
        out.extend([(x - lo) / (hi - lo) if hi > lo else 0.0, 0.0])
    return np.array(out)


def load_table(path: str | Path) -> Table:
    header, rows = read_table(path)
    search = search_from_header(header)
    sign = 1.0 if header["objective"]["mode"] == "max" else -1.0
    by_key: dict[str, list[dict[str, Any]]] = {}
    points: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = json.dumps(row["point"], sort_keys=True)
        points.setdefault(key, row["point"])
        by_key.setdefault(key, []).append(row)
    keys = sorted(by_key, key=lambda k: min(r["config_id"] for r in by_key[k]))
    if len(keys) < 2:
        raise ConfigError(f"{path}: a benchmark needs curves of at least 2 configurations, the table has {len(keys)}")
    finals = []
    value = []
    for k in keys:
        f = [sign * _last(r) for r in by_key[k]]
        finals.extend(f)
        value.append(float(np.mean(f)))
    return Table(header, search, [points[k] for k in keys], [by_key[k] for k in keys], np.array(value),
                 np.stack([coordinates(search, points[k]) for k in keys]), float(np.quantile(finals, 0.75)), sign)


def _last(row: dict[str, Any]) -> float:
    """A curve's final objective; a diverged or cut curve counts as the worst value it reached (or chance 0)."""
    vals = [v for v in row["objective"] if _finite(v)]
    if row.get("diverged") or not vals or len(vals) < len(row["objective"]):
        return min(vals) if vals else 0.0
    return float(vals[-1])


# --- the replay trainable ------------------------------------------------------------------------------------


def pick_seed(n: int, point: dict[str, Any], salt: int) -> int:
    h = hashlib.sha256(f"{salt}:{json.dumps(point, sort_keys=True)}".encode()).digest()
    return int.from_bytes(h[:4], "little") % n


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
        if i < start or ((i + 1) % every and i + 1 < n and _finite(value)):
            continue
        time.sleep(max(0.0, (float(train_s) - prev) * compress))
        prev = float(train_s)
        if not _finite(value):
            tune.report(TrialReport(int(episodes), {metric: 0.0 if table.sign > 0 else 1e9}, diverged=True,
                                    failure="the recorded curve diverged").to_result())
            return
        result = TrialReport(int(episodes), {metric: float(value)}).to_result()
        if not checkpoints:
            tune.report(result)
            continue
        with tempfile.TemporaryDirectory(prefix="replay-ckpt-") as d:
            (Path(d) / "replay.json").write_text(json.dumps({"next": i + 1}))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))


# --- one study -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one study did: its results in arrival order and how its trials ended."""

    results: list[tuple[str, float, float, int, int]] = field(default_factory=list)  # trial, episodes, value, cfg, curve
    ended: dict[str, TrialOutcome] = field(default_factory=dict)  # trial -> how it ended (search.decide)
    started: list[str] = field(default_factory=list)  # trial ids in the order the searcher created them
    paused: dict[str, int] = field(default_factory=dict)  # trial -> times the scheduler paused it
    resumed: dict[str, int] = field(default_factory=dict)  # trial -> times it was resumed
    wall_s: float = 0.0


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
                    run.paused[t.trial_id] = run.paused.get(t.trial_id, 0) + 1
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
            for t in trials:
                if t.trial_id not in run.ended and t.last_result:
                    run.ended[t.trial_id] = decide(TrialReport.from_result(t.last_result),
                                                   self.watch.facts(study_ended=True),
                                                   paused=t.trial_id in self.paused_now)

    return Recorder()


def scheduler_overrides(table: Table, kind: str, shipped: SearchConfig | None) -> dict[str, Any]:
    """A method's scheduler settings: the shipped config's when it uses that kind, else the table's recorded
    search's (ASHA and median as recorded); the plateau rule without either waits 15 % of the budget."""
    for cfg in (shipped, table.search.config):
        if cfg is not None and cfg.scheduler.kind == kind:
            return {"scheduler": cfg.scheduler.to_dict()}
    if kind in ("plateau", "freeze_thaw"):
        return {"scheduler.grace_episodes": max(1, round(0.15 * table.search.max_episodes))}
    return {}


def run_study(table: Table, method: str, repeat: int, workdir: Path, compress: float,
              num_samples: int, cap: int | None, every: int = 1, shipped: SearchConfig | None = None) -> Run:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    overrides, flavour = METHODS[method]
    search = search_from_header(table.header, {
        **overrides, **scheduler_overrides(table, overrides["scheduler.kind"], shipped), "sampler.seed": repeat, "budget.num_samples": num_samples, "budget.max_episodes": cap,
        "budget.time_budget_s": None, "budget.max_failures": 0, "resources.cpus_per_trial": 1,
        "resources.gpus_per_trial": 0, "storage": str(workdir / "tune"),
        "optuna.storage": f"sqlite:///{workdir / f'optuna-{abs(hash((method, repeat)))}.db'}"})
    study = Study.create(search, path=str(workdir / "tune" / f"{method.replace(' ', '_')}-{repeat}"))
    run = Run()
    primary = search.config.primary
    if flavour == "ray":
        searcher = OptunaSearch(space=DefineByRun(search), metric=primary.metric, mode=primary.mode,
                                sampler=make_sampler(search))
    else:
        searcher = make_searcher(study)
    trainable = tune.with_resources(
        tune.with_parameters(replay_trial, table=table, compress=compress, salt=repeat, every=every,
                             checkpoints=overrides["scheduler.kind"] == "freeze_thaw"),
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


def kills(table: Table, run: Run) -> tuple[int, int]:
    """(stopped by the scheduler, of which the curve ends in the top quartile)."""
    curve_of = {t: (cfg, c) for t, _, _, cfg, c in run.results}
    stopped = top = 0
    for trial, outcome in run.ended.items():
        if outcome.ending != Ending.EARLY_STOPPED or trial not in curve_of:
            continue  # completed, ended by the study's cap, or failed: not the scheduler's kill
        cfg, c = curve_of[trial]
        stopped += 1
        top += table.sign * _last(table.curves[cfg][c]) >= table.top_quartile
    return stopped, top


def pauses(table: Table, run: Run) -> tuple[int, int, int, int]:
    """(pauses, resumes, trials paused and never resumed, of which the curve ends in the top quartile)."""
    curve_of = {t: (cfg, c) for t, _, _, cfg, c in run.results}
    never = top = 0
    for trial, outcome in run.ended.items():
        if outcome.ending == Ending.PAUSED_AT_END and trial in curve_of:
            cfg, c = curve_of[trial]
            never += 1
            top += table.sign * _last(table.curves[cfg][c]) >= table.top_quartile
    return sum(run.paused.values()), sum(run.resumed.values()), never, top


def benchmark(curves: str | Path, repeats: int = 20, methods: list[str] | None = None, compress: float = 0.005,
              plot: str | Path | None = None, shipped: SearchConfig | None = None, every: int = 1,
              parallel: int = 3, progress=print) -> dict[str, Any]:
    """Run every method ``repeats`` times on the table (``parallel`` studies at a time, each with its own
    Tuner, in one Ray instance); the summary (see module doc)."""
    import logging
    import os
    from concurrent.futures import ThreadPoolExecutor

    saved_env = {k: os.environ.get(k) for k in ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_AIR_NEW_OUTPUT")}
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no result files: nobody reads them
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.ERROR)

    table = load_table(curves)
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; known: {list(METHODS)}")
    if BASELINE not in methods:
        methods.insert(0, BASELINE)
    budget = table.search.config.budget
    num_samples = budget.num_samples
    started = connect_ray(num_cpus=parallel * (budget.max_concurrent or 2)) == "local"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="mann-bench-", dir=shm if shm.is_dir() else None))
    runs: dict[str, list[Run]] = {}
    methods.remove(BASELINE)
    try:
        with serialised_tune_registry(), ThreadPoolExecutor(parallel) as pool:
            # The baseline's full study first (the config's num_samples, no cap): it sets the budget axis and
            # the cap every other method gets (its largest spend), with up to 4 x num_samples trials.
            cap = None
            for m in [BASELINE, *methods]:
                n = num_samples if cap is None else 4 * num_samples
                futures = [pool.submit(run_study, table, m, r, work, compress, n, cap, every, shipped)
                           for r in range(repeats)]
                runs[m] = [f.result() for f in futures]
                if cap is None:
                    cap = int(max(full_study_episodes(x, num_samples) for x in runs[m]))
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
    methods.insert(0, BASELINE)
    full = float(np.median([full_study_episodes(x, num_samples) for x in runs[BASELINE]]))
    blind = 100.0 * (table.best - float(table.value.mean()))
    grid = np.linspace(0, cap, 201)
    out: dict[str, Any] = {
        "curves": table.n_curves, "configs": len(table.points), "repeats": repeats, "baseline": BASELINE,
        "default": _method_of(shipped or table.search.config), "full_study_episodes": full, "episode_cap": cap,
        "table_best": table.best * table.sign, "mapping_loo": round(table.mapping_loo(), 3), "methods": {}}
    bands: dict[str, np.ndarray] = {}
    for m in methods:
        trajs = [trajectory(table, x) for x in runs[m]]
        at = {f: [regret_at(xs, ys, f * full, blind) for xs, ys in trajs] for f in FRACTIONS}
        to1 = [float(xs[np.argmax(ys <= 1.0)]) if (ys <= 1.0).any() else math.inf for xs, ys in trajs]
        k = np.array([kills(table, x) for x in runs[m]])
        curve = np.array([[regret_at(xs, ys, g, blind) for g in grid] for xs, ys in trajs])
        bands[m] = np.percentile(curve, [2.5, 50, 97.5], axis=0)
        med_to1 = float(np.median(to1))
        out["methods"][m] = {
            "regret_at": {str(f): round(float(np.median(v)), 2) for f, v in at.items()},
            "regret_at_95": {str(f): [round(float(np.percentile(v, 2.5)), 2), round(float(np.percentile(v, 97.5)), 2)]
                             for f, v in at.items()},
            "episodes_to_1pt": None if math.isinf(med_to1) else med_to1,
            "reached_1pt": round(float(np.mean([not math.isinf(x) for x in to1])), 3),
            "kill_before_click": round(float(k[:, 1].sum() / k[:, 0].sum()), 4) if k[:, 0].sum() else 0.0,
            "stopped_trials": int(k[:, 0].sum()),
            **_pause_figures(table, runs[m]),
            "trials_per_study": round(float(np.mean([len(x.ended) for x in runs[m]])), 1),
            "wall_s": round(sum(x.wall_s for x in runs[m]), 1)}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    plot = Path(plot) if plot else Path(curves).with_suffix(".benchmark.png")
    _plot(bands, grid / full, plot, table, repeats)
    out["plot"] = str(plot)
    return out


def _pause_figures(table: Table, runs: list[Run]) -> dict[str, Any]:
    p = np.array([pauses(table, x) for x in runs])
    if not p[:, 0].sum():
        return {}
    return {"pauses": int(p[:, 0].sum()), "resumes": int(p[:, 1].sum()), "paused_never_resumed": int(p[:, 2].sum()),
            "paused_never_resumed_top_quartile": int(p[:, 3].sum())}


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


def _plot(bands: dict[str, np.ndarray], x: np.ndarray, path: Path, table: Table, repeats: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, (lo, med, hi) in bands.items():
        (line,) = ax.plot(x, med, label=m)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("episodes spent / episodes of the baseline's full study")
    ax.set_ylabel("regret (accuracy points)")
    ax.set_title(f"{table.header.get('name')}: {len(table.points)} configs, {table.n_curves} curves, "
                 f"{repeats} repeats (median, 95 % interval)", fontsize=9)
    ax.set_xlim(0, float(x[-1]))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
