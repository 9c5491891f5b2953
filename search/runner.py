"""Build, run and resume a study's Tune experiment; its status; replay of undelivered MLflow records.

Every Ray Tune call of the driver is here (the Ray connection is in ``ray_cluster.py``, the trial side in
``trainable.py``, the Tune-to-MLflow callback in ``lineage.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback, Stopper

from mann import metrics

from .config import LoadedSearch, load_search_config, storage_url_problem
from .console import print_start, quiet_libraries, trial_lines
from .lineage import make_callback
from .ray_cluster import check_ray_address, connect_ray
from .schedulers import StudyEvidence
from .protocol import sampled_point, trial_dirname, trial_name
from .searcher import (STORAGE_ENV, LostTrials, OptunaStudy, StudySearch, close_open_trials, paused_reasons,
                       storage_url, trial_outcomes, warm_sources, warm_start)
from .space import make_sampler
from .study import SearchError, Study
from .tracking import StudyTracker, check_tracking_uri, redact, resolve_tracking_uri, ui_link
from .trainable import KEEP_CHECKPOINTS, run_trial, trainable_class

log = logging.getLogger("mann_search")

REPLAY_FILE = "mlflow-replay.jsonl"


@dataclass
class StudyOutcome:
    study: Study
    trials: list[dict[str, Any]]
    wall_s: float
    train_s: float
    trial_wall_s: float
    undelivered_points: int
    replay_file: str | None
    parent_run_id: str | None
    selection: dict[str, Any] | None = None
    mlflow_link: str | None = None  # the study's runs in the MLflow UI's Model-training view
    mlflow_command: str | None = None  # what serves that UI for an embedded SQLite store
    optuna_storage: str | None = None  # the Optuna study's storage URL (credentials masked)
    outcomes: dict[str, str] | None = None  # trial name -> how it ended (search.protocol), from Optuna
    resumed: bool = False  # ``wall_s`` is then this leg's time, not the study's


def make_scheduler(study: Study):
    """The study's Tune scheduler (None for ``scheduler.kind: none``)."""
    from ray.tune.schedulers import MedianStoppingRule

    search = study.search
    s, primary, max_t = search.config.scheduler, search.config.primary, search.max_episodes
    if s.kind == "asha":
        from .schedulers import StoredASHA

        return StoredASHA(time_attr=metrics.EPISODES, metric=primary.metric, mode=primary.mode, max_t=max_t,
                          grace_period=min(s.grace_episodes, max_t), reduction_factor=s.reduction_factor,
                          evidence=StudyEvidence(study))
    if s.kind == "median":
        return MedianStoppingRule(time_attr=metrics.EPISODES, metric=primary.metric, mode=primary.mode,
                                  grace_period=s.grace_episodes, min_samples_required=3)
    if s.kind == "plateau":
        from .schedulers import PlateauStopping

        return PlateauStopping(time_attr=metrics.EPISODES, metric=primary.metric, mode=primary.mode, max_t=max_t,
                               grace=min(s.grace_episodes, max_t), evidence=StudyEvidence(study),
                               **s.plateau.to_dict())
    if s.kind == "freeze_thaw":
        from .schedulers import FreezeThaw

        ft = s.freeze_thaw.to_dict()
        run = ft.pop("min_run_episodes")
        grace = min(s.grace_episodes, max_t)
        return FreezeThaw(time_attr=metrics.EPISODES, metric=primary.metric, mode=primary.mode, max_t=max_t,
                          max_concurrent=_slots(search), num_samples=search.config.budget.num_samples,
                          evidence=StudyEvidence(study), grace=grace, min_run=grace if run is None else run, **ft)
    return None


def _slots(search: LoadedSearch) -> int:
    """Trials at once: ``budget.max_concurrent``, else as many as the Ray cluster's CPUs hold."""
    if search.config.budget.max_concurrent:
        return search.config.budget.max_concurrent
    import ray

    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count() or 1
    return max(1, int(cpus // search.config.resources.cpus_per_trial))


def make_searcher(study: Study) -> StudySearch:
    """The study's searcher: its sampler over its define-by-run space, its Optuna study in its storage."""
    objectives = study.search.config.objectives
    metric = objectives[0].metric if len(objectives) == 1 else [o.metric for o in objectives]
    mode = objectives[0].mode if len(objectives) == 1 else [o.mode for o in objectives]
    return StudySearch(study, make_sampler(study.search), metric, mode)


def _trainable(search: LoadedSearch):
    from ray import tune

    r = search.config.resources
    fn = tune.with_parameters(run_trial, search=search, threads=max(1, int(r.cpus_per_trial)))
    return trainable_class(tune.with_resources(fn, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial}))


class EpisodeBudget(Stopper):
    """A Tune stopper for ``budget.max_episodes``: the study ends once its trials together trained that many
    episodes (each trial counts its latest reported episodes, so a retried trial is not counted twice)."""

    def __init__(self, max_episodes: int):
        self.max_episodes = max_episodes
        self.spent: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.spent[trial_id] = int(result.get(metrics.EPISODES, 0))
        return self.stop_all()

    def stop_all(self) -> bool:
        return sum(self.spent.values()) >= self.max_episodes


def _callbacks(callback) -> list:
    """The driver's Tune callbacks: ours (one, or a list) and the CSV and JSON result loggers, passed here so
    that Tune's default TensorBoard logger can stay off (``console.quiet_libraries``)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    ours = list(callback) if isinstance(callback, (list, tuple)) else [callback]
    return [*ours, CSVLoggerCallback(), JsonLoggerCallback()]


def _run_config(study: Study, callback, verbose: int = 1):
    from ray import tune

    storage, name = study.path.rsplit("/", 1)
    cap = study.search.config.budget.max_episodes
    return tune.RunConfig(
        name=name,
        storage_path=storage,
        stop=EpisodeBudget(cap) if cap else None,
        failure_config=tune.FailureConfig(max_failures=study.search.config.budget.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        callbacks=_callbacks(callback),
        verbose=verbose,
    )


def build_tuner(study: Study, callback, trainable=None, search_alg=None, verbose: int = 1,
                reuse_actors: bool | None = None):
    """The Tuner of a new study: OptunaSearch over the snapshot's space, its scheduler and budget.

    ``trainable`` and ``search_alg`` replace the study's (``mann-search benchmark`` replays recorded curves and
    compares searchers through the very same Tuner)."""
    from ray import tune

    from .schedulers import FreezeThaw, SlotLimiter

    search = study.search
    budget = search.config.budget
    scheduler = make_scheduler(study)
    search_alg = search_alg if search_alg is not None else make_searcher(study)
    if isinstance(search_alg, StudySearch):
        search_alg.tell_on_save = True  # Tune saves it with its experiment state
    concurrent = budget.max_concurrent
    if isinstance(scheduler, FreezeThaw):  # a paused trial frees its slot: the scheduler counts the slots
        search_alg, concurrent = SlotLimiter(search_alg, scheduler), None
    return tune.Tuner(
        trainable if trainable is not None else _trainable(search),
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler, trial_name_creator=_ray_trial_name,
            trial_dirname_creator=_ray_trial_dirname,
            num_samples=budget.num_samples, max_concurrent_trials=concurrent,
            time_budget_s=budget.time_budget_s,
            reuse_actors=search.config.resources.reuse_actors if reuse_actors is None else reuse_actors,
        ),
        run_config=_run_config(study, callback, verbose),
    )


def _ray_trial_name(trial) -> str:
    return trial_name(trial.config, f"trial_{trial.trial_id}")


def _ray_trial_dirname(trial) -> str:
    return f"{trial_dirname(trial.config, 'trial')}_{trial.trial_id}"


def restore_tuner(study: Study, callback, verbose: int = 1):
    """The Tuner of an interrupted study, from its Tune state, with this driver's callback(s) and verbosity."""
    from ray import tune

    _check_restorable(study)
    tuner = tune.Tuner.restore(study.path, _trainable(study.search), resume_unfinished=True, resume_errored=True)
    set_restored_callbacks(tuner, _callbacks(callback))
    tuner._local_tuner.get_run_config().verbose = verbose  # checked by set_restored_callbacks just above
    return tuner


def set_restored_callbacks(tuner, callbacks: list) -> None:
    """Give a restored Tuner live callbacks instead of the placeholders it unpickled.

    The one private Ray API mann-search uses: ``Tuner.restore`` takes no RunConfig, and the pickled one holds our
    callback's ``__reduce__`` placeholder. Ray 2.60 keeps the run config on ``tuner._local_tuner``
    (tests/test_search_e2e.py checks this against the installed Ray, so an upgrade breaks here, visibly).
    """
    local = getattr(tuner, "_local_tuner", None)
    if local is None or not hasattr(local, "get_run_config"):
        raise SearchError(f"this Ray ({_ray_version()}) has no Tuner._local_tuner.get_run_config(); mann-search "
                          "cannot resume with it (see search/runner.py: set_restored_callbacks)")
    local.get_run_config().callbacks = list(callbacks)


def _ray_version() -> str:
    import ray

    return ray.__version__


def _preflight(search: LoadedSearch, tracking_uri: str | None = None) -> str:
    """Check the data setting, the MLflow URI and RAY_ADDRESS before anything starts; the tracking URI."""
    search.base.data.resolved_data_dir()  # data setting present (raises ConfigError naming it)
    if tracking_uri is None:
        storage = search.config.resolved_storage()
        local = Path(storage) if "://" not in storage else Path.home() / ".mann-search"
        tracking_uri = resolve_tracking_uri(search.config.mlflow.tracking_uri, local)
    try:
        check_tracking_uri(tracking_uri)
    except ConnectionError as exc:
        raise SearchError(str(exc)) from None
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])
    env = os.environ.get(STORAGE_ENV)
    if not search.config.optuna.storage and env and storage_url_problem(env):
        raise SearchError(f"{STORAGE_ENV}: {storage_url_problem(env)}")
    return tracking_uri


def run(config_file: str, overrides: list[str] | None = None, verbose: bool = False) -> StudyOutcome:
    """Start a new study: load and snapshot the config, then fit (``verbose``: Ray's own reporter and the
    libraries' informational logs besides the trial lines)."""
    overrides = list(overrides or [])
    search = load_search_config(config_file, overrides)
    uri = _preflight(search)
    from mann.omniglot import load_omniglot

    load_omniglot(search.base.data)  # data present and cached before trials start
    sources = warm_sources(search)  # checked before anything is created
    study = Study.create(search, overrides, uri)
    study.save()
    if sources:
        quiet_libraries(verbose)  # Optuna's "A new study created" lines
        for key, n in warm_start(study, sources).items():
            print(f"warm start: {n} finished trials of {key} seed the sampler")
    return _fit(study, fresh=True, verbose=verbose)


def _check_restorable(study: Study) -> None:
    from ray import tune

    if not tune.Tuner.can_restore(study.path):
        raise SearchError(f"{study.path}: no Tune state to resume (the study never started?)")


def resume(path: str, verbose: bool = False) -> StudyOutcome:
    """Continue an interrupted study from its snapshot (never its YAML)."""
    study = Study.load(path)
    _check_restorable(study)  # before Ray starts
    _preflight(study.search, study.tracking_uri)
    return _fit(study, fresh=False, verbose=verbose)


def tracker_for(study: Study) -> StudyTracker:
    return StudyTracker(study.tracking_uri, study.experiment, study.key, study.local_dir / "mlflow-staging",
                        artifact_root=study.artifact_root, study_path=study.local_dir)


class Interruption(Callback):
    """Knows whether the user stopped the driver (Ctrl-C, SIGINT or SIGUSR1). Tune's own handler then ends the
    run gracefully, its state saved, and ``fit`` returns as if the study had ended; with ``event`` set the driver
    instead leaves the study to ``mann-search resume``: its trials stay RUNNING in Optuna and MLflow, and no
    selection runs. (A second Ctrl-C is Python's own: KeyboardInterrupt at once.)"""

    def __init__(self):
        self.event = threading.Event()

    def setup(self, **info):  # Tune installed its handler by now (in tune.run, before the controller)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, getattr(signal, "SIGUSR1", None)):
            tune_handler = signal.getsignal(sig) if sig is not None else None
            if callable(tune_handler):
                signal.signal(sig, functools.partial(self._note, tune_handler))

    def _note(self, tune_handler, signum, frame):
        self.event.set()
        tune_handler(signum, frame)

    def __reduce__(self):  # Tune pickles callbacks into its state: a resumed driver makes its own
        return (Interruption, ())


def _fit(study: Study, fresh: bool, verbose: bool = False) -> StudyOutcome:
    t0 = time.perf_counter()
    # Our outbox retries; MLflow's own HTTP retries (minutes by default) would stall Tune's event loop.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    quiet_libraries(verbose)
    connect_ray(quiet=not verbose)
    tracker = tracker_for(study)
    stop = Interruption()
    callbacks = [stop, make_callback(tracker, study, fresh, stop.event), trial_lines(study, interrupted=stop.event)]
    if not fresh:  # before Tune asks for new trials: the ones a killed driver lost are asked again
        callbacks.insert(0, LostTrials(study))
    print_start(study, fresh)
    level = 1 if verbose else 0  # Ray's own reporter (trial tables, configs, results) only when asked for
    tuner = build_tuner(study, callbacks, verbose=level) if fresh else restore_tuner(study, callbacks, level)
    started = time.monotonic()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    if stop.event.is_set():
        tracker.flush(force=True)
        if tracker.outbox:
            tracker.write_replay(study.local_dir / REPLAY_FILE)
        raise KeyboardInterrupt(f"stopped after {wall:.0f} s, the study's state saved; continue with "
                                f"`mann-search resume {study.path}`")
    try:  # trials the study ended without telling the searcher (cap, time budget, the driver's end)
        close_open_trials(study, started, [{**(r.metrics or {}), "config": r.config or {}} for r in grid])
    except Exception as exc:  # the storage down at the very end: resume or the next leg closes them
        log.error("optuna: could not close the study's open trials: %s", exc)

    trials, train_s, trial_wall = [], 0.0, 0.0
    for res in grid:
        m = res.metrics or {}
        train_s += float(m.get("time/train_s", 0.0))
        trial_wall += float(m.get("time_total_s", 0.0))
        trials.append({"config": res.config, "metrics": metrics.loggable(m),
                       "error": str(res.error) if res.error else None, "path": res.path,
                       "checkpoint": res.checkpoint.path if res.checkpoint else None})
    selection = None
    if study.search.config.selection.enabled:
        from .selection import select

        try:
            selection = select(study, tracker)
        except Exception as exc:  # selection failing must not lose the study: say so, keep going
            log.error("model selection failed: %s", exc)
            selection = {"error": str(exc)}
    for _ in range(3):
        if tracker.flush(force=True):
            break
        time.sleep(2)
    replay_file = str(tracker.write_replay(study.local_dir / REPLAY_FILE)) if tracker.outbox else None
    link, command = mlflow_link(study, tracker)
    try:
        outcomes = trial_outcomes(study)
    except Exception as exc:
        log.error("optuna: could not read the trials' outcomes: %s", exc)
        outcomes = None
    return StudyOutcome(study, trials, wall, train_s, trial_wall, tracker.pending_points(), replay_file,
                        tracker.known_run_id(None), selection, link, command,
                        redact("uri", storage_url(study)), outcomes, resumed=not fresh)


def mlflow_link(study: Study, tracker: StudyTracker | None = None) -> tuple[str | None, str | None]:
    """The study's experiment in the MLflow UI (Model-training view) and, for a local store, the
    `mann-search ui STUDY_DIR` command that serves it; (None, None) when MLflow cannot be asked for the
    experiment's id."""
    tracker = tracker or tracker_for(study)
    try:
        return ui_link(study.tracking_uri, tracker.experiment_id(), study_path=study.local_dir)
    except Exception as exc:  # MLflow down: the summary says where the runs are without the link
        log.warning("no MLflow link: %s", exc)
        return None, None


def replay(path: str, tracking_uri: str | None = None) -> tuple[int, int]:
    """Deliver a replay file written when MLflow stayed down; returns (delivered points, still pending)."""
    tracker = StudyTracker.from_replay(Path(path), tracking_uri)
    tracker.flush()
    if tracker.outbox:
        tracker.write_replay(Path(path))
    else:
        Path(path).unlink()
    return tracker.delivered_points, tracker.pending_points()


def scheduler_settings(s) -> dict[str, Any]:
    """A scheduler config's kind with the settings that kind uses (``status``: from the study's snapshot, which
    a resumed study keeps whatever the YAML or the defaults say now)."""
    d = s.to_dict()
    out = {"kind": d["kind"]}
    if d["kind"] != "none":
        out["grace_episodes"] = d["grace_episodes"]
    if d["kind"] == "asha":
        out["reduction_factor"] = d["reduction_factor"]
    if d["kind"] in ("plateau", "freeze_thaw"):
        out[d["kind"]] = d[d["kind"]]
    return out


def status(path: str) -> dict[str, Any]:
    """Progress of a study from its snapshot and Tune state (works while it runs, after a crash, or when done)."""
    study = Study.load(path)
    from ray.tune import ExperimentAnalysis

    try:
        ea = ExperimentAnalysis(study.path)
    except Exception as exc:
        raise SearchError(f"{study.path}: no readable Tune state yet ({exc.__class__.__name__})") from None
    primary = study.primary
    states: dict[str, int] = {}
    best = None
    for t in ea.trials:
        states[t.status] = states.get(t.status, 0) + 1
        v = (t.last_result or {}).get(primary.metric)
        if v is not None and (best is None or (v > best[0] if primary.mode == "max" else v < best[0])):
            best = (v, sampled_point(t.config), trial_name(t.config, str(t)))
    try:
        trials = OptunaStudy(study).study.get_trials(deepcopy=False)  # read once for both
        by_trial, why = trial_outcomes(study, trials), paused_reasons(study, trials)
    except Exception as exc:  # the Optuna storage unreachable: Tune's states still say something
        log.warning("optuna: no outcomes (%s)", exc)
        by_trial, why = {}, {}
    outcomes: dict[str, int] = {}
    for o in by_trial.values():
        outcomes[o] = outcomes.get(o, 0) + 1
    link, command = mlflow_link(study)
    cfg = study.search.config
    return {"study": study.key, "path": study.path, "num_samples": cfg.budget.num_samples,
            "scheduler": scheduler_settings(cfg.scheduler), "budget": cfg.budget.to_dict(),
            "trials": len(ea.trials), "states": states, "outcomes": outcomes, "trial_outcomes": by_trial,
            "paused": sorted(n for n, o in by_trial.items() if o == "paused"), "paused_why": why,
            "metric": primary.metric,
            "best": {"value": best[0], "trial": best[2], "config": best[1]} if best else None,
            "tracking_uri": redact("uri", study.tracking_uri), "experiment": study.experiment,
            "mlflow_link": link, "mlflow_command": command, "optuna_storage": redact("uri", storage_url(study)),
            "optuna_study": study.key}
