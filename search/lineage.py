"""Tune-to-MLflow lineage: a thin Tune callback that turns trial events into StudyTracker records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mann import metrics

from . import plots
from .ray_cluster import ray_job_id
from .study import Study, git_commit, versions
from .tracking import StudyTracker, redact


def make_callback(tracker: StudyTracker, study: Study, fresh: bool):
    """The callback of one driver process (a resumed study gets a new one: see ``__reduce__``)."""
    from ray import tune

    max_episodes = study.search.max_episodes
    scheduler = study.search.config.scheduler.kind

    class MlflowLineage(tune.Callback):
        """Parent run per study, nested child run per trial. Keeps training going when MLflow is down."""

        def setup(self, **info):
            if fresh:
                tracker.start_study(*study_record(study))
            tracker.flush()

        def on_trial_start(self, iteration, trials, trial, **info):
            number = next((i for i, t in enumerate(trials, 1) if t is trial), len(trials))  # creation order
            tracker.trial_started(trial.trial_id, trial_name(number, trial.config),
                                  {**trial.config, **study.search.fixed_params()})
            tracker.flush()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            found = metrics.loggable(result)
            if metrics.EPISODES in found:
                tracker.trial_result(trial.trial_id, found, step=int(found[metrics.EPISODES]))
            tracker.flush()

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            episodes = int(last.get(metrics.EPISODES, 0))
            if last.get("diverged"):
                outcome, reason, status = "diverged", str(last.get("failure", "training diverged")), "FAILED"
            elif episodes < max_episodes:
                outcome, status = "early_stopped", "FINISHED"
                reason = f"stopped by the {scheduler} scheduler at {episodes} episodes"
            else:
                outcome, reason, status = "completed", None, "FINISHED"
            finish_trial(tracker, study, trial, outcome, reason, status)
            report_progress(tracker, study, trials, trial, outcome)
            tracker.flush()

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = "trial failed"
            if trial.error_file and Path(trial.error_file).is_file():
                reason = Path(trial.error_file).read_text()[-2000:]
            finish_trial(tracker, study, trial, "error", reason, "FAILED")
            report_progress(tracker, study, trials, trial, "error")
            tracker.flush()

        def on_experiment_end(self, trials, **info):
            finish_study(tracker, study, trials)
            tracker.flush()

        def __reduce__(self):  # Tune pickles callbacks into its state; a resumed study gets a fresh one
            return (_no_callback, ())

    return MlflowLineage()


def _no_callback():
    from ray import tune

    return tune.Callback()


NAME_LIMIT = 250  # MLflow's run name limit


def trial_name(number: int, point: dict[str, Any]) -> str:
    """``t07 slots=35 read_heads=4 gamma=0.98``: the trial's number in the study (1-based, in the order Tune
    created the trials, which a resumed study keeps) and its sampled values, by the last part of each path."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
             for k, v in point.items()]
    return " ".join([f"t{number:02d}", *parts])[:NAME_LIMIT]


def _outcome_of(trial, max_episodes: int) -> str | None:
    """completed | stopped | failed for a finished Tune trial, None while it runs or waits."""
    last = trial.last_result or {}
    if trial.status == "ERROR":
        return "failed"
    if trial.status != "TERMINATED":
        return None
    if last.get("diverged"):
        return "failed"
    return "completed" if last.get(metrics.EPISODES, 0) >= max_episodes else "stopped"


def report_progress(tracker: StudyTracker, study: Study, trials, current, outcome: str) -> None:
    """Best objective so far, trial counts by state and episodes spent, on the parent run."""
    primary, max_episodes = study.primary, study.search.max_episodes
    counts = {"running": 0, "stopped": 0, "completed": 0, "failed": 0}
    values, episodes = [], 0
    for t in trials:
        state = {"early_stopped": "stopped", "diverged": "failed", "error": "failed"}.get(outcome, outcome) \
            if t is current else _outcome_of(t, max_episodes)
        counts[state or "running"] += 1
        last = t.last_result or {}
        episodes += int(last.get(metrics.EPISODES, 0))
        if state in ("completed", "stopped") and primary.metric in last:
            values.append(float(last[primary.metric]))
    finished = counts["stopped"] + counts["completed"] + counts["failed"]
    progress = {f"search/trials_{k}": v for k, v in counts.items()}
    best = {}
    if values:
        best = {"search/best_objective": max(values) if primary.mode == "max" else min(values)}
    tracker.study_progress({**progress, **best}, finished,
                           {**best, "search/episodes_spent": episodes}, episodes)


def study_record(study: Study) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """Params, tags and files of the study's parent run."""
    cfg = study.search.config
    params = {
        "study.name": cfg.name, "study.base": cfg.base, "sampler.kind": cfg.sampler.kind,
        "sampler.seed": cfg.sampler.seed, "scheduler.kind": cfg.scheduler.kind,
        "scheduler.grace_episodes": cfg.scheduler.grace_episodes, "budget.num_samples": cfg.budget.num_samples,
        "objectives": ",".join(f"{o.metric}:{o.mode}" for o in cfg.objectives),
        "resources.cpus_per_trial": cfg.resources.cpus_per_trial,
        "resources.gpus_per_trial": cfg.resources.gpus_per_trial,
        "space": ",".join(cfg.space),
    }
    from .searcher import storage_url

    tags = {"mann.git_commit": git_commit(), **{f"mann.version.{k}": v for k, v in versions().items()},
            "mann.optuna.study_name": study.key, "mann.optuna.storage": redact("uri", storage_url(study))}
    job = ray_job_id()
    if job:
        tags["mann.ray_job_id"] = job
    try:
        from mann.omniglot import load_omniglot

        tags["mann.data_digest"] = load_omniglot(study.search.base.data).digest
    except Exception as exc:  # the study record must not stop the study
        tags["mann.data_digest"] = f"unavailable ({exc.__class__.__name__})"
    files = {"search.yaml": yaml.safe_dump(study.search.config.to_dict(), sort_keys=False),
             "base_resolved.yaml": yaml.safe_dump(study.search.base_tree, sort_keys=False),
             "study.json": study.model_dump_json(indent=2)}
    return params, tags, files


def finish_trial(tracker: StudyTracker, study: Study, trial, outcome: str, reason: str | None, status: str) -> None:
    history = tracker.history(trial.trial_id)
    acc = metrics.by_instance(trial.last_result or {}, study.split)
    files = {
        "accuracy_by_instance.json": json.dumps({"split": study.split, "instance": list(range(1, len(acc) + 1)),
                                                 "accuracy": acc}),
        "trial_config.json": json.dumps(trial.config, indent=2, default=str),
    }
    figures = {}
    if history:
        figures["learning_curve.png"] = lambda p: plots.learning_curve(history, p, str(trial), study.split)
    if acc:
        figures["accuracy_by_instance.png"] = lambda p: plots.accuracy_by_instance({str(trial): acc}, p)
    checkpoint = None
    if trial.checkpoint is not None:
        candidate = Path(trial.checkpoint.path) / "checkpoint.pt"
        checkpoint = candidate if candidate.is_file() else None
    tracker.trial_finished(trial.trial_id, outcome, reason, checkpoint, files, figures, status)


def finish_study(tracker: StudyTracker, study: Study, trials) -> None:
    primary = study.primary
    done = [t for t in trials if t.last_result and primary.metric in t.last_result]
    values = [float(t.last_result[primary.metric]) for t in done]
    points = [dict(t.config) for t in done]
    figures = {}
    if values:
        figures["search_history.png"] = lambda p: plots.search_history(values, primary.mode, p, primary.metric)
        figures["parallel_coordinates.png"] = lambda p: plots.parallel_coordinates(points, values, p,
                                                                                  primary.metric)
    rows = [{"trial": str(t), "status": t.status, **t.config, primary.metric: t.last_result.get(primary.metric),
             metrics.EPISODES: t.last_result.get(metrics.EPISODES)} for t in done]
    states: dict[str, int] = {}
    for t in trials:
        states[t.status] = states.get(t.status, 0) + 1
    tags = {"mann.trials": str(len(trials)), "mann.trial_states": json.dumps(states)}
    tracker.study_finished({"trials.json": json.dumps(rows, indent=2, default=str)}, figures, tags)
