"""Build, run and resume the Tune study; the Tune callback that feeds MLflow lineage.

All Ray Tune API use of the driver is here (the trial side is in ``trainable.py``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from . import plots
from .config import LoadedSearch, load_search_config
from .space import DefineByRun, make_sampler
from .tracking import StudyTracker, check_tracking_uri, redact, resolve_tracking_uri
from .trainable import METRIC_PREFIXES, run_trial

log = logging.getLogger("mann_search")

STUDY_FILE = "study.json"
REPLAY_FILE = "mlflow-replay.jsonl"


class SearchError(RuntimeError):
    """A search cannot start or continue; the message says why and names the culprit."""


# ---------------------------------------------------------------------------------------------------------------
# Study metadata: where it lives and what it is


@dataclass
class Study:
    key: str  # unique, tags every MLflow run of the study
    name: str
    path: str  # the Tune experiment folder (storage/name-time)
    config_file: str
    overrides: list[str]
    tracking_uri: str
    experiment: str
    created: float

    @property
    def local_dir(self) -> Path:
        """Local folder for study.json, MLflow staging and replay files."""
        if "://" in self.path:
            return Path.home() / ".mann-search" / Path(urlparse(self.path).path).name
        return Path(self.path)

    def save(self) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        (self.local_dir / STUDY_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Study":
        p = Path(path)
        f = p / STUDY_FILE if p.is_dir() else p
        if not f.is_file():
            raise SearchError(f"{path}: no study here (missing {STUDY_FILE}); give the folder `mann-search run` "
                              "printed")
        try:
            return cls(**json.loads(f.read_text()))
        except (ValueError, TypeError) as exc:
            raise SearchError(f"{f}: damaged study file ({exc})") from None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    import mlflow
    import optuna
    import ray
    import torch

    return {"torch": torch.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "mlflow": mlflow.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------------------------
# Ray connection


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast when RAY_ADDRESS points nowhere (ray.init would otherwise wait for a long time)."""
    if address in ("auto", "local"):
        return
    target = address if "://" in address else f"ray://{address}"
    parsed = urlparse(target)
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise SearchError(f"RAY_ADDRESS {address!r}: expected host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise SearchError(f"RAY_ADDRESS {address}: Ray cluster not reachable ({exc.strerror or exc})") from None


_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job's driver


def ray_job_id() -> str | None:
    """The submission id when running as a `ray job submit` entrypoint."""
    try:
        return json.loads(os.environ.get(_JOB_ENV, "{}")).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


def connect_ray(num_cpus: int | None = None) -> str:
    """Join the cluster in RAY_ADDRESS, or start a local one on 127.0.0.1 with token authentication on."""
    import ray

    if ray.is_initialized():
        return "existing"
    import search

    if search.RAY_IMPORTED_FIRST:
        raise SearchError("Ray was imported before mann-search with RAY_AUTH_MODE unset: import search first, or "
                          "export RAY_AUTH_MODE=token before starting Python")
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        log.warning("RAY_AUTH_MODE=%s: Ray token authentication is OFF", os.environ["RAY_AUTH_MODE"])
    address = os.environ.get("RAY_ADDRESS")
    env = {"MANN_DATA_DIR": os.environ["MANN_DATA_DIR"]} if os.environ.get("MANN_DATA_DIR") else {}
    runtime_env = {"env_vars": env} if env else None
    if address:
        check_ray_address(address)
        if os.environ.get(_JOB_ENV):
            runtime_env = None  # a `ray job submit` driver: the job's runtime env already applies
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, AuthenticationError...
            raise SearchError(f"RAY_ADDRESS {address}: cannot join the cluster ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        return address
    try:
        # address="local": always a new cluster of our own, never one that `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=runtime_env)
    except Exception as exc:
        raise SearchError(f"cannot start a local Ray ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return "local"


# ---------------------------------------------------------------------------------------------------------------
# The Tune callback: a thin adapter from Tune events to StudyTracker


def _trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {k: v for k, v in result.items() if k.startswith(METRIC_PREFIXES) or k in ("episodes", "diverged")}
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _make_callback(tracker: StudyTracker, loaded: LoadedSearch, max_episodes: int, fresh: bool):
    from ray import tune

    class MlflowLineage(tune.Callback):
        """Parent run per study, nested child run per trial. Keeps training going when MLflow is down."""

        def setup(self, **info):
            if fresh:
                params, tags, files = _study_record(loaded)
                tracker.start_study(params, tags, files)
            tracker.flush()

        def on_trial_start(self, iteration, trials, trial, **info):
            tracker.trial_started(trial.trial_id, str(trial), {**trial.config, **_fixed_params(loaded)})
            tracker.flush()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            metrics = _trial_metrics(result)
            if "episodes" in metrics:
                tracker.trial_result(trial.trial_id, metrics, step=int(metrics["episodes"]))
            tracker.flush()

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            episodes = int(last.get("episodes", 0))
            if last.get("diverged"):
                outcome, reason, status = "diverged", str(last.get("failure", "training diverged")), "FAILED"
            elif episodes < max_episodes:
                outcome, status = "early_stopped", "FINISHED"
                reason = f"stopped by the {loaded.config.scheduler.kind} scheduler at {episodes} episodes"
            else:
                outcome, reason, status = "completed", None, "FINISHED"
            _finish_trial(tracker, trial, outcome, reason, status)
            tracker.flush()

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = "trial failed"
            if trial.error_file and Path(trial.error_file).is_file():
                reason = Path(trial.error_file).read_text()[-2000:]
            _finish_trial(tracker, trial, "error", reason, "FAILED")
            tracker.flush()

        def on_experiment_end(self, trials, **info):
            _finish_study(tracker, loaded, trials)
            tracker.flush()

        def __reduce__(self):  # Tune pickles callbacks into its state; a resumed study gets a fresh one
            return (_no_callback, ())

    return MlflowLineage()


def _no_callback():
    from ray import tune

    return tune.Callback()


def _fixed_params(loaded: LoadedSearch) -> dict[str, Any]:
    """Every MANN setting of the base config, flattened, so each child run shows what was fixed too."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    from mann.config import from_dict, TrainConfig

    walk("", from_dict(TrainConfig, loaded.base_tree).to_dict())
    return {k: v for k, v in out.items() if k not in loaded.config.space}


def _study_record(loaded: LoadedSearch) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    cfg = loaded.config
    params = {
        "study.name": cfg.name, "study.base": cfg.base, "sampler.kind": cfg.sampler.kind,
        "sampler.seed": cfg.sampler.seed, "scheduler.kind": cfg.scheduler.kind,
        "scheduler.grace_episodes": cfg.scheduler.grace_episodes, "budget.num_samples": cfg.budget.num_samples,
        "objectives": ",".join(f"{o.metric}:{o.mode}" for o in cfg.objectives),
        "resources.cpus_per_trial": cfg.resources.cpus_per_trial,
        "resources.gpus_per_trial": cfg.resources.gpus_per_trial,
        "space": ",".join(cfg.space),
    }
    tags = {"mann.git_commit": _git_commit(), **{f"mann.version.{k}": v for k, v in _versions().items()}}
    job = ray_job_id()
    if job:
        tags["mann.ray_job_id"] = job
    try:
        from mann.config import TrainConfig, from_dict
        from mann.omniglot import load_omniglot

        tags["mann.data_digest"] = load_omniglot(from_dict(TrainConfig, loaded.base_tree).data).digest
    except Exception as exc:  # the study record must not stop the study
        tags["mann.data_digest"] = f"unavailable ({exc.__class__.__name__})"
    search_yaml = Path(loaded.source).read_text() if Path(loaded.source).is_file() else ""
    files = {"search.yaml": search_yaml, "base_resolved.yaml": yaml.safe_dump(loaded.base_tree, sort_keys=False)}
    return params, tags, files


def _finish_trial(tracker: StudyTracker, trial, outcome: str, reason: str | None, status: str) -> None:
    rec = tracker.trials.get(trial.trial_id)
    history = rec.history if rec else []
    final = {k: v for k, v in (trial.last_result or {}).items() if k.startswith("val/acc_")}
    acc = [final[f"val/acc_{k}"] for k in range(1, 100) if f"val/acc_{k}" in final]
    files = {
        "accuracy_by_instance.json": json.dumps({"instance": list(range(1, len(acc) + 1)), "val_accuracy": acc}),
        "trial_config.json": json.dumps(trial.config, indent=2, default=str),
    }
    figures = {}
    if history:
        figures["learning_curve.png"] = lambda p: plots.learning_curve(history, p, str(trial))
    if acc:
        figures["accuracy_by_instance.png"] = lambda p: plots.accuracy_by_instance({str(trial): acc}, p)
    checkpoint = None
    if trial.checkpoint is not None:
        candidate = Path(trial.checkpoint.path) / "checkpoint.pt"
        checkpoint = candidate if candidate.is_file() else None
    tracker.trial_finished(trial.trial_id, outcome, reason, checkpoint, files, figures, status)


def _finish_study(tracker: StudyTracker, loaded: LoadedSearch, trials) -> None:
    primary = loaded.config.primary
    done = [t for t in trials if t.last_result and primary.metric in t.last_result]
    values = [float(t.last_result[primary.metric]) for t in done]
    points = [{k: v for k, v in t.config.items()} for t in done]
    figures = {}
    if values:
        figures["search_history.png"] = lambda p: plots.search_history(values, primary.mode, p, primary.metric)
        figures["parallel_coordinates.png"] = lambda p: plots.parallel_coordinates(points, values, p,
                                                                                  primary.metric)
    rows = [{"trial": str(t), "status": t.status, **t.config,
             primary.metric: t.last_result.get(primary.metric), "episodes": t.last_result.get("episodes")}
            for t in done]
    states = {}
    for t in trials:
        states[t.status] = states.get(t.status, 0) + 1
    tags = {"mann.trials": str(len(trials)), "mann.trial_states": json.dumps(states)}
    tracker.study_finished({"trials.json": json.dumps(rows, indent=2, default=str)}, figures, tags)


# ---------------------------------------------------------------------------------------------------------------
# Building and running


def _scheduler(loaded: LoadedSearch, max_episodes: int):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    s, primary = loaded.config.scheduler, loaded.config.primary
    if s.kind == "asha":
        return ASHAScheduler(time_attr="episodes", metric=primary.metric, mode=primary.mode, max_t=max_episodes,
                             grace_period=min(s.grace_episodes, max_episodes), reduction_factor=s.reduction_factor)
    if s.kind == "median":
        return MedianStoppingRule(time_attr="episodes", metric=primary.metric, mode=primary.mode,
                                  grace_period=s.grace_episodes, min_samples_required=3)
    return None


def _trainable(loaded: LoadedSearch):
    from ray import tune

    r = loaded.config.resources
    threads = max(1, int(r.cpus_per_trial))
    objectives = [(o.metric, o.mode) for o in loaded.config.objectives]
    fn = tune.with_parameters(run_trial, base_tree=loaded.base_tree, threads=threads, objectives=objectives)
    return tune.with_resources(fn, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})


def _max_episodes(loaded: LoadedSearch) -> int:
    from mann.config import TrainConfig, from_dict

    return from_dict(TrainConfig, loaded.base_tree).train.episodes


def _run_config(loaded: LoadedSearch, study: Study, callback):
    from ray import tune

    storage, name = study.path.rsplit("/", 1)
    return tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=loaded.config.budget.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[callback],
        verbose=1,
    )


def prepare(config_file: str, overrides: list[str]) -> tuple[LoadedSearch, str]:
    """Validate the config, the data and the MLflow URI before anything starts."""
    loaded = load_search_config(config_file, overrides)
    from mann.config import TrainConfig, from_dict

    base = from_dict(TrainConfig, loaded.base_tree)
    base.data.resolved_data_dir()  # data setting present (raises ConfigError naming it)
    storage = loaded.config.resolved_storage()
    local = Path(storage) if "://" not in storage else Path.home() / ".mann-search"
    uri = resolve_tracking_uri(loaded.config.mlflow.tracking_uri, local)
    try:
        check_tracking_uri(uri)
    except ConnectionError as exc:
        raise SearchError(str(exc)) from None
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])
    return loaded, uri


def run(config_file: str, overrides: list[str] | None = None) -> "StudyOutcome":
    overrides = overrides or []
    loaded, uri = prepare(config_file, overrides)
    from mann.omniglot import load_omniglot
    from mann.config import TrainConfig, from_dict

    load_omniglot(from_dict(TrainConfig, loaded.base_tree).data)  # data present and cached before trials start
    cfg = loaded.config
    stamp = time.strftime("%Y%m%d-%H%M%S")
    storage = cfg.resolved_storage()
    study = Study(key=f"{cfg.name}-{stamp}-{uuid.uuid4().hex[:6]}", name=cfg.name,
                  path=f"{storage.rstrip('/')}/{cfg.name}-{stamp}", config_file=str(Path(config_file).resolve()),
                  overrides=overrides, tracking_uri=uri, experiment=cfg.mlflow.experiment, created=time.time())
    study.save()
    return _fit(loaded, study, fresh=True)


def resume(path: str) -> "StudyOutcome":
    study = Study.load(path)
    loaded, _ = prepare(study.config_file, study.overrides)
    return _fit(loaded, study, fresh=False)


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


def _fit(loaded: LoadedSearch, study: Study, fresh: bool) -> StudyOutcome:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    t0 = time.perf_counter()
    cfg = loaded.config
    # Our outbox retries; MLflow's own HTTP retries (minutes by default) would stall Tune's event loop.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    connect_ray()
    tracker = StudyTracker(study.tracking_uri, study.experiment, study.key, study.local_dir / "mlflow-staging",
                           artifact_root=_artifact_root(study))
    max_episodes = _max_episodes(loaded)
    callback = _make_callback(tracker, loaded, max_episodes, fresh)
    if fresh:
        objectives = cfg.objectives
        metric = objectives[0].metric if len(objectives) == 1 else [o.metric for o in objectives]
        mode = objectives[0].mode if len(objectives) == 1 else [o.mode for o in objectives]
        searcher = OptunaSearch(space=DefineByRun(loaded), metric=metric, mode=mode, sampler=make_sampler(loaded))
        tuner = tune.Tuner(
            _trainable(loaded),
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=_scheduler(loaded, max_episodes), num_samples=cfg.budget.num_samples,
                max_concurrent_trials=cfg.budget.max_concurrent, time_budget_s=cfg.budget.time_budget_s,
            ),
            run_config=_run_config(loaded, study, callback),
        )
    else:
        if not tune.Tuner.can_restore(study.path):
            raise SearchError(f"{study.path}: no Tune state to resume (the study never started?)")
        tuner = tune.Tuner.restore(study.path, _trainable(loaded), resume_unfinished=True, resume_errored=True)
        # Tune restores the RunConfig it pickled; give it a live tracker instead of the pickled placeholder.
        tuner._local_tuner.get_run_config().callbacks = [callback]
    grid = tuner.fit()
    wall = time.perf_counter() - t0

    trials, train_s, trial_wall = [], 0.0, 0.0
    for res in grid:
        m = res.metrics or {}
        train_s += float(m.get("time/train_s", 0.0))
        trial_wall += float(m.get("time_total_s", 0.0))
        trials.append({"config": res.config, "metrics": _trial_metrics(m), "error": str(res.error) if res.error else None,
                       "path": res.path, "checkpoint": res.checkpoint.path if res.checkpoint else None})
    selection = None
    if cfg.selection.enabled:
        from .selection import select

        try:
            selection = select(study, loaded, tracker)
        except Exception as exc:  # selection failing must not lose the study: say so, keep going
            log.error("model selection failed: %s", exc)
            selection = {"error": str(exc)}
    for _ in range(3):
        if tracker.flush(force=True):
            break
        time.sleep(2)
    replay = None
    if tracker.outbox:
        replay = str(tracker.write_replay(study.local_dir / REPLAY_FILE))
    parent = tracker._runs.get(None)
    return StudyOutcome(study, trials, wall, train_s, trial_wall, tracker.pending_points(), replay, parent,
                        selection)


def _artifact_root(study: Study) -> str | None:
    if study.tracking_uri.startswith("sqlite:///"):
        return (Path(study.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def replay(path: str, tracking_uri: str | None = None) -> tuple[int, int]:
    """Deliver a replay file written when MLflow stayed down; returns (delivered points, still pending)."""
    tracker = StudyTracker.from_replay(Path(path), tracking_uri)
    tracker.flush()
    if tracker.outbox:
        tracker.write_replay(Path(path))
    else:
        Path(path).unlink()
    return tracker.delivered_points, tracker.pending_points()


def status(path: str) -> dict[str, Any]:
    """Progress of a study from its Tune state (works while it runs, after a crash, or when done)."""
    study = Study.load(path)
    from ray.tune import ExperimentAnalysis

    try:
        ea = ExperimentAnalysis(study.path)
    except Exception as exc:
        raise SearchError(f"{study.path}: no readable Tune state yet ({exc.__class__.__name__})") from None
    loaded = load_search_config(study.config_file, study.overrides)
    primary = loaded.config.primary
    states: dict[str, int] = {}
    best = None
    for t in ea.trials:
        states[t.status] = states.get(t.status, 0) + 1
        v = (t.last_result or {}).get(primary.metric)
        if v is not None and (best is None or (v > best[0] if primary.mode == "max" else v < best[0])):
            best = (v, t.config, str(t))
    return {"study": study.key, "path": study.path, "num_samples": loaded.config.budget.num_samples,
            "trials": len(ea.trials), "states": states, "metric": primary.metric,
            "best": {"value": best[0], "trial": best[2], "config": best[1]} if best else None,
            "tracking_uri": redact("uri", study.tracking_uri), "experiment": study.experiment}
