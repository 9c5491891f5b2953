"""The study's Optuna searcher: Ray's OptunaSearch with truthful reporting and a real Optuna storage.

Ray 2.60's ``OptunaSearch`` reports intermediate values at Tune's ``training_iteration`` and tells Optuna that a
trial stopped by the scheduler is COMPLETE with its truncated value, so TPE learns from values measured at
different budgets as if they were final. Here every evaluation reaches the Optuna trial as an intermediate
value at its episode count; a trial the scheduler stopped is told PRUNED (Optuna's samplers weigh a pruned
trial by its intermediate values), a diverged or failed one FAIL, and only a trial that ran its full budget
COMPLETE. The Optuna study lives in an RDB storage (SQLite beside the study, or the cluster's PostgreSQL), so
``optuna.load_study`` and optuna-dashboard read it, and a resumed study continues it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from mann import metrics

from .storage import open_storage
from .study import Study
from .tracking import redact

log = logging.getLogger("mann_search")

STORAGE_ENV = "MANN_OPTUNA_STORAGE"
TUNE_TRIAL_ATTR = "tune_trial_id"


def storage_url(study: Study) -> str:
    """``optuna.storage`` of the search config, else MANN_OPTUNA_STORAGE, else SQLite beside the study."""
    configured = study.search.config.optuna.storage or os.environ.get(STORAGE_ENV)
    return configured or f"sqlite:///{(study.local_dir / 'optuna.db').resolve()}"


def state_for(result: dict[str, Any] | None, error: bool, max_episodes: int) -> optuna.trial.TrialState:
    """How a finished Tune trial ends in Optuna."""
    State = optuna.trial.TrialState
    if error or not result or result.get("diverged"):
        return State.FAIL
    if float(result.get(metrics.EPISODES, 0)) < max_episodes:
        return State.PRUNED
    return State.COMPLETE


class StudySearch(OptunaSearch):
    """OptunaSearch over a study's define-by-run space, told the truth about every trial (see module doc)."""

    def __init__(self, study: Study, space, sampler: optuna.samplers.BaseSampler, metric, mode):
        url = storage_url(study)
        self.max_episodes = study.search.max_episodes
        self.storage_display = redact("uri", url)
        self.reported: dict[str, set[int]] = {}  # trial id -> episode counts told as intermediate values
        storage = open_storage(url)  # Optuna's RDB storage, retried through database outages
        super().__init__(space=space, metric=metric, mode=mode, sampler=sampler, study_name=study.key,
                         storage=storage)

    def suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and TUNE_TRIAL_ATTR not in ot_trial.user_attrs:
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return  # Optuna keeps no intermediate values for multi-objective studies
        value, step = result.get(self.metric), result.get(metrics.EPISODES)
        if value is None or step is None or result.get("diverged"):
            return
        steps = self.reported.setdefault(trial_id, set())
        if int(step) not in steps:  # a retried trial re-reports from its checkpoint
            steps.add(int(step))
            try:
                self._ot_trials[trial_id].report(float(value), int(step))
            except optuna.exceptions.UpdateFinishedTrialError:
                # told before the driver died, after the searcher's last checkpoint: the storage keeps its state
                log.warning("optuna: trial %s was already finished in the storage; its later results are not "
                            "reported", trial_id)
                self._completed_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if result:
            self.on_trial_result(trial_id, result)  # Tune hands the last evaluation to on_trial_complete only
        state = state_for(result, error, self.max_episodes)
        values = None
        if state == optuna.trial.TrialState.COMPLETE:
            values = ([result.get(m) for m in self.metric] if isinstance(self.metric, list)
                      else result.get(self.metric))
        try:
            self._ot_study.tell(self._ot_trials[trial_id], values, state=state)
        except Exception as exc:  # e.g. already told before a driver restart, or a NaN value
            log.warning("optuna: trial %s not told %s: %s", trial_id, state.name, exc)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """After a driver restart: trials the storage already has as finished (told after the searcher's last
        checkpoint) are not reported to again, and trials the storage has as RUNNING that no Tune trial owns
        (asked just before the driver died) are marked FAIL, so the Optuna study holds no phantom running
        trial."""
        super().restore(checkpoint_path)
        stored = {f.number: f.state for f in self._ot_study.get_trials(deepcopy=False)}
        for trial_id, ot_trial in self._ot_trials.items():
            if stored.get(ot_trial.number, optuna.trial.TrialState.RUNNING).is_finished():
                self._completed_trials.add(trial_id)  # told after the searcher's last checkpoint
        owned = {t.number for t in self._ot_trials.values()}
        for number, state in stored.items():
            if state == optuna.trial.TrialState.RUNNING and number not in owned:
                self._ot_study.tell(number, state=optuna.trial.TrialState.FAIL)
