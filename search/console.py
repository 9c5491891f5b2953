"""What a search prints while it runs: one line as each trial starts and one as it ends (its readable name, how
it ended, the objective, the best so far, the episodes spent, an estimate of the time left).

A Tune callback, so it sees the same trial events as the MLflow lineage; Ray's own reporter is off unless
``--verbose`` (``quiet_libraries`` below turns the libraries' informational chatter down at the same time).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import IO, Any

from mann import metrics

from .protocol import TRIAL_NUMBER_KEY, BudgetWatch, TrialReport, decide, is_probe, trial_label, trial_name
from .study import Study
from .tracking import ui_link


def print_start(study: Study, fresh: bool, out: IO[str] | None = None) -> None:
    """The first lines of a run: the study, its budget, where its results go, how to watch it in MLflow."""
    budget = study.search.config.budget
    at_once = f", {budget.max_concurrent} at a time" if budget.max_concurrent else ""
    print(f"{'study' if fresh else 'resuming study'} {study.key}: {budget.num_samples} trials{at_once}; "
          f"results in {study.path}", file=out or sys.stdout)
    _, command = ui_link(study.tracking_uri, None, study_path=study.local_dir)
    where = f"serve the UI with {command}" if command else f"{study.tracking_uri}, experiment '{study.experiment}'"
    print(f"  MLflow: {where}", file=out or sys.stdout, flush=True)


def trial_lines(study: Study, out: IO[str] | None = None, interrupted=None):
    """The Tune callback printing a study's trial lines (to ``out``, default stdout); ``interrupted``: an Event
    set when the user stopped the driver (its running trials go on at ``mann-search resume``: no end line)."""
    from ray import tune

    from .searcher import pause_reason

    class TrialLines(tune.Callback):
        def __init__(self):
            self.started = time.monotonic()
            self.progress = _Progress(study)
            self.out = out
            self.seen: set[str] = set()  # trials this driver saw run (a resumed study's earlier ones ended before)
            # trials the scheduler has paused (freeze_thaw), until Tune runs them again: a paused trial the study
            # ends (cap, time budget) is terminated as it is, and ends paused_at_end as in Optuna and MLflow
            self.paused: set[str] = set()
            self.was_paused: set[str] = set()  # trials paused at some time in this driver

        def on_trial_start(self, iteration, trials, trial, **info):
            self.seen.add(trial.trial_id)
            if trial.trial_id in self.was_paused and trial.status != "PAUSED":
                self._print(f"{_name(trial)}  resumed at {_episodes(trial)} episodes")
            elif is_probe(study.search.config.scheduler, trial.config.get(TRIAL_NUMBER_KEY)):
                self._print(f"{_name(trial)}  started (a probe: never paused)")
            else:
                self._print(f"{_name(trial)}  started")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.seen.add(trial.trial_id)
            self.progress.watch.observe(trial.trial_id, TrialReport.from_result(result))

        def on_step_end(self, iteration, trials, **info):
            now = {t.trial_id: t for t in trials if t.status == "PAUSED"}
            for key in sorted(set(now) - self.paused):
                why = pause_reason(study, now[key])
                self._print(f"{_name(now[key])}  {self.progress.paused(now[key])}" + (f": {why}" if why else ""))
            self.paused = (self.paused | set(now)) - {t.trial_id for t in trials if t.status in ("PENDING", "RUNNING")}
            self.was_paused |= self.paused

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trials, trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trials, trial, error=True)

        def on_experiment_end(self, trials, **info):
            if interrupted is not None and interrupted.is_set():
                return
            for t in trials:  # ended by the study (cap, time budget) without a complete event, in this driver
                if t.trial_id in self.seen and t.trial_id not in self.progress.finished:
                    self._ended(trials, t, error=False, study_ended=True)

        def _ended(self, trials, trial, error: bool, study_ended: bool = False) -> None:
            name = trial_label(trial.config, str(trial))
            paused = trial.trial_id in self.paused or trial.status == "PAUSED"
            self.paused.discard(trial.trial_id)
            line = self.progress.ended(trials, trial, name, error, time.monotonic() - self.started, study_ended,
                                       paused=paused)
            self._print(f"{name}  {line}")

        def _print(self, text: str) -> None:
            elapsed = int(time.monotonic() - self.started)
            print(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {text}", file=self.out or sys.stdout, flush=True)

        def __reduce__(self):  # Tune pickles callbacks into its state; a resumed study gets a fresh one
            return (_no_callback, ())

    return TrialLines()


def _no_callback():
    from ray import tune

    return tune.Callback()


def _episodes(trial) -> int:
    return int((trial.last_result or {}).get(metrics.EPISODES, 0))


def _name(trial) -> str:
    """The trial's one name (MLflow run, Optuna attribute, Ray folder): its Optuna number and sampled values."""
    return trial_name(trial.config, str(trial))


class _Progress:
    """Best objective, episodes spent and a time-left estimate from the trials Tune holds."""

    def __init__(self, study: Study):
        self.study = study
        self.finished: set[str] = set()
        self.best: tuple[float, str] | None = None
        self.watch = BudgetWatch.of(study.search)

    def paused(self, trial) -> str:
        """The line of a trial the scheduler paused: where, its objective, and that its checkpoint is kept."""
        metric = self.study.primary.metric
        value = (trial.last_result or {}).get(metric)
        at = f", {metric} {float(value):.4f}" if value is not None else ""
        return f"paused at {_episodes(trial)} episodes{at} (checkpoint kept; resumes when its turn comes)"

    def ended(self, trials, trial, name: str, error: bool, elapsed_s: float, study_ended: bool = False,
              paused: bool = False) -> str:
        primary, cfg = self.study.primary, self.study.search.config
        last = trial.last_result or {}
        report = TrialReport.from_result(last)
        outcome = decide(report, self.watch.facts(study_ended), "the trial raised" if error else None,
                         paused=paused)
        episodes = outcome.episodes
        self.finished.add(trial.trial_id)
        value = report.value(primary.metric) if report else None
        parts = [f"{outcome.ending.value} at {episodes} episodes"]
        if value is not None and outcome.selectable:
            value = float(value)
            better = self.best is None or (value > self.best[0] if primary.mode == "max" else value < self.best[0])
            if better:
                self.best = (value, name)
            parts.append(f"{primary.metric} {value:.4f}")
        if self.best:
            parts.append(f"best {self.best[0]:.4f} ({self.best[1]})")
        spent = sum(_episodes(t) for t in trials)
        parts.append(f"{len(self.finished)}/{cfg.budget.num_samples} trials, {spent} episodes")
        left = self.time_left(spent, elapsed_s)
        if left is not None:
            parts.append(f"~{_duration(left)} left")
        return "  ".join(parts)

    def time_left(self, spent: int, elapsed_s: float) -> float | None:
        """Seconds left at the pace so far: trials finished per second (early stops included), capped by the
        episode and time budgets."""
        budget, done = self.study.search.config.budget, len(self.finished)
        if done == 0 or done >= budget.num_samples or elapsed_s <= 0:
            return None
        estimates = [(budget.num_samples - done) * elapsed_s / done]
        if budget.max_episodes and spent:
            estimates.append(max(0, budget.max_episodes - spent) * elapsed_s / spent)
        if budget.time_budget_s:
            estimates.append(max(0.0, budget.time_budget_s - elapsed_s))
        return max(0.0, min(estimates))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class _DropStarting(logging.Filter):
    """Drops a logger's records whose message starts with ``starts``."""

    def __init__(self, starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


# After Ctrl-C Tune advises `Tuner.restore(...)` (mann-search says `mann-search resume DIR` instead), and the
# analysis it returns warns once per trial that had reported nothing yet
_TUNE_NOISE = {"ray.tune.tune": _DropStarting("Experiment has been interrupted"),
               "ray.tune.analysis.experiment_analysis": _DropStarting("Failed to fetch metrics")}


def quiet_libraries(verbose: bool) -> None:
    """Turn the libraries' informational output down for a driver that prints its own trial lines; warnings
    and errors still show. Call before Ray starts (the variables reach its processes)."""
    # Ray Tune adds a TensorBoard logger by default, writing event files nobody reads here and printing
    # "To visualize your results with TensorBoard"; the CSV and JSON loggers are passed by the runner instead.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune forces an experiment-state snapshot whenever a trial has written CheckpointConfig.num_to_keep
    # checkpoints since the last one: that snapshot is what keeps a resumed study consistent with the pruned
    # checkpoints, it takes ~10-20 ms on local storage, and with an evaluation every few seconds it fires often,
    # each time with a 3-line "may become a bottleneck" warning. A slow snapshot (over 30 s) still warns.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if verbose:
        return
    # Tune's reporter at verbose=0 still prints its configuration table and results folder (the new output
    # engine's experiment_started ignores the verbosity); the legacy engine at verbose=0 prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # tqdm bars of artifact downloads (selection reads checkpoints back from MLflow)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow sets its loggers' level when first imported ("Creating initial MLflow database tables...")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # "🏃 View run ... at: URL" and "🧪 View experiment" on stdout whenever a run on a tracking server ends
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow", "optuna", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, drop in _TUNE_NOISE.items():
        logging.getLogger(name).addFilter(drop)  # the same filter object is added once, however often called
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in RDB ..."
    except ImportError:
        pass
