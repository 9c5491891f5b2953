"""Tune-to-MLflow lineage: a thin Tune callback that turns trial events into StudyTracker records."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from mann import metrics

from . import plots
from .protocol import (TRIAL_NUMBER_KEY, BudgetWatch, Ending, TrialOutcome, TrialReport, decide, is_probe,
                       outcome_counts, sampled_point, trial_name)
from .ray_cluster import ray_job_id
from .searcher import LOST_REASON, PAUSED_WHY_ATTR, pause_reason, storage_url
from .study import Study, git_commit, versions
from .tracking import StudyTracker, redact


def make_callback(tracker: StudyTracker, study: Study, fresh: bool, interrupted=None):
    """The callback of one driver process (a resumed study gets a new one: see ``__reduce__``).
    ``interrupted``: an Event set when the user stopped the driver (the study is left for ``mann-search
    resume``: its trials are not finished at the experiment's end)."""
    from ray import tune

    class MlflowLineage(tune.Callback):
        """Parent run per study, nested child run per trial. Keeps training going when MLflow is down.

        Every trial run ends with its outcome (:func:`search.protocol.decide`), whatever ended it: a trial the
        study ended without a trial-complete event (the episode cap, the time budget, the driver's end) is
        finished at the experiment's end."""

        def __init__(self):
            self.watch = BudgetWatch.of(study.search)
            self.outcomes: dict[str, TrialOutcome] = {}  # trials this driver finished
            self.paused: dict[str, int] = {}  # trials the scheduler has paused now -> episodes when paused
            self.best: float | None = None

        def setup(self, **info):
            if fresh:
                tracker.start_study(*study_record(study))
            tracker.flush()

        def on_trial_start(self, iteration, trials, trial, **info):
            tracker.trial_started(trial.trial_id, trial_name(trial.config, str(trial)),
                                  {**sampled_point(trial.config), **study.search.fixed_params()})
            if is_probe(study.search.config.scheduler, trial.config.get(TRIAL_NUMBER_KEY)):
                tracker.trial_tags(trial.trial_id, {"mann.probe": "true"})  # freeze_thaw runs it to its click
            tracker.flush()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.watch.observe(trial.trial_id, TrialReport.from_result(result))
            found = metrics.loggable(result)
            if metrics.EPISODES in found:
                tracker.trial_result(trial.trial_id, found, step=int(found[metrics.EPISODES]))
            tracker.flush()

        def on_step_begin(self, iteration, trials, **info):
            self._watch_pauses(trials)

        def on_step_end(self, iteration, trials, **info):
            self._watch_pauses(trials)

        def _watch_pauses(self, trials) -> None:
            """Tag a trial's run ``mann.paused`` while the scheduler has it PAUSED (its checkpoint kept)."""
            changed = False
            for t in trials:
                if t.status == "PAUSED" and t.trial_id not in self.paused and t.trial_id in tracker.trials:
                    self.paused[t.trial_id] = int((t.last_result or {}).get(metrics.EPISODES, 0))
                    tracker.trial_tags(t.trial_id, {"mann.paused": "true",
                                                    "mann.paused_at": str(self.paused[t.trial_id]),
                                                    PAUSED_WHY_ATTR: pause_reason(study, t)})
                    changed = True
                elif t.status in ("PENDING", "RUNNING") and t.trial_id in self.paused:
                    del self.paused[t.trial_id]
                    tracker.trial_tags(t.trial_id, {"mann.paused": "false", PAUSED_WHY_ATTR: ""})
                    changed = True
            if changed:
                self._progress(trials)
                tracker.flush()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trials, trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            text = ""
            if trial.error_file and Path(trial.error_file).is_file():
                text = ANSI.sub("", Path(trial.error_file).read_text())
            lines = [x.strip() for x in text.splitlines() if x.strip()]
            self._finish(trials, trial, lines[-1][:1000] if lines else "the trial raised", text[-20000:])

        def _finish(self, trials, trial, error: str | None, traceback: str = "", study_ended: bool = False) -> None:
            report = TrialReport.from_result(trial.last_result)
            paused = self.paused.pop(trial.trial_id, None) is not None
            outcome = decide(report, self.watch.facts(study_ended), error, paused=paused)
            if paused:
                tracker.trial_tags(trial.trial_id, {"mann.paused": "false"})
            self.outcomes[trial.trial_id] = outcome
            finish_trial(tracker, study, trial, outcome, traceback)
            self._progress(trials)
            tracker.flush()

        def _progress(self, trials) -> None:
            """Best objective so far, trial counts by outcome and episodes spent, on the parent run; each
            metric on one step axis (``*_by_trial``: trials finished, ``*_by_episodes``: episodes spent)."""
            primary = study.primary
            counts = outcome_counts([self.outcomes.get(t.trial_id) for t in trials])
            finished = sum(1 for t in trials if t.trial_id in self.outcomes)
            for t in trials:
                o, report = self.outcomes.get(t.trial_id), TrialReport.from_result(t.last_result)
                value = report.value(primary.metric) if o is not None and o.selectable and report else None
                if value is not None and (self.best is None or (value > self.best if primary.mode == "max"
                                                                else value < self.best)):
                    self.best = value
            best = {} if self.best is None else {"search/best_objective": self.best}
            by_trial = {f"search/trials_{k}": v for k, v in counts.items()}
            by_trial["search/trials_paused_by_trial"] = len(self.paused)
            by_trial.update({f"{k}_by_trial": v for k, v in best.items()})
            by_episodes = {f"{k}_by_episodes": v for k, v in best.items()}
            by_episodes["search/episodes_spent"] = self.watch.episodes
            by_episodes["search/trials_paused_by_episodes"] = len(self.paused)
            tracker.study_progress(by_trial, finished, by_episodes, self.watch.episodes)

        def on_experiment_end(self, trials, **info):
            if interrupted is not None and interrupted.is_set():  # a leg ends, not the study
                tracker.flush()
                return
            for t in trials:  # ended by the study (cap, time budget, driver end) without a complete event
                if t.trial_id not in self.outcomes and t.trial_id in tracker.trials:
                    self._finish(trials, t, None, study_ended=True)
            end_lost_runs(tracker, {t.trial_id for t in trials})
            finish_study(tracker, study, trials, self.outcomes)
            tracker.flush()

        def __reduce__(self):  # Tune pickles callbacks into its state; a resumed study gets a fresh one
            return (_no_callback, ())

    return MlflowLineage()


log = logging.getLogger(__name__)
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its worker logs


def _no_callback():
    from ray import tune

    return tune.Callback()


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


def finish_trial(tracker: StudyTracker, study: Study, trial, outcome: TrialOutcome, traceback: str = "") -> None:
    history = tracker.history(trial.trial_id)
    acc = metrics.by_instance(trial.last_result or {}, study.split)
    name = trial_name(trial.config, str(trial))
    files = {
        "accuracy_by_instance.json": json.dumps({"split": study.split, "instance": list(range(1, len(acc) + 1)),
                                                 "accuracy": acc}),
        "trial_config.json": json.dumps(trial.config, indent=2, default=str),
    }
    if traceback:
        files["error.txt"] = traceback
    figures = {}
    if history:
        figures["learning_curve.png"] = lambda p: plots.learning_curve(history, p, name, study.split)
    if acc:
        figures["accuracy_by_instance.png"] = lambda p: plots.accuracy_by_instance({name: acc}, p)
    checkpoint = None
    if trial.checkpoint is not None:
        candidate = Path(trial.checkpoint.path) / "checkpoint.pt"
        checkpoint = candidate if candidate.is_file() else None
    tracker.trial_finished(trial.trial_id, outcome.ending.value, outcome.reason, checkpoint, files, figures,
                           outcome.mlflow_status)


def end_lost_runs(tracker: StudyTracker, tune_trials: set[str]) -> int:
    """End the study's trial runs that MLflow still has as RUNNING and no Tune trial of this study owns: trials
    lost with a killed driver (asked after Tune's last snapshot; the searcher asked their configurations again,
    ``search.searcher.LOST_REASON``). Returns how many; MLflow unreachable: none, with a warning."""
    try:
        lost = {trial: run for trial, run in tracker.open_trial_runs().items() if trial not in tune_trials}
    except Exception as exc:  # the study's record goes on; the runs stay RUNNING until a later leg
        log.warning("mlflow: could not look for runs of trials lost with a killed driver: %s", exc)
        return 0
    outcome = TrialOutcome(Ending.FAILED, LOST_REASON, 0)
    for trial in sorted(lost):
        tracker.trial_finished(trial, outcome.ending.value, outcome.reason, None, status=outcome.mlflow_status)
    return len(lost)


def finish_study(tracker: StudyTracker, study: Study, trials, outcomes: dict[str, TrialOutcome]) -> None:
    primary = study.primary
    order = {trial_id: i for i, trial_id in enumerate(outcomes)}  # completion order (dicts keep insertion order)
    done = sorted((t for t in trials if t.last_result and primary.metric in t.last_result),
                  key=lambda t: order.get(t.trial_id, len(order)))
    values = [float(t.last_result[primary.metric]) for t in done]
    points = [sampled_point(t.config) for t in done]
    figures = {}
    if values:
        figures["search_history.png"] = lambda p: plots.search_history(values, primary.mode, p, primary.metric)
        figures["parallel_coordinates.png"] = lambda p: plots.parallel_coordinates(points, values, p,
                                                                                  primary.metric)
    rows = [{"trial": trial_name(t.config, str(t)), "tune_trial_id": t.trial_id,
             "outcome": outcomes[t.trial_id].ending.value if t.trial_id in outcomes else None,
             **sampled_point(t.config), primary.metric: t.last_result.get(primary.metric),
             metrics.EPISODES: t.last_result.get(metrics.EPISODES)} for t in done]
    counts = {k: v for k, v in outcome_counts([outcomes.get(t.trial_id) for t in trials]).items() if v}
    tags = {"mann.trials": str(len(trials)), "mann.trial_outcomes": json.dumps(counts)}
    tracker.study_finished({"trials.json": json.dumps(rows, indent=2, default=str)}, figures, tags)
