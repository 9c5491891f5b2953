"""The study's Optuna searcher: Ray's public ``Searcher`` interface over Optuna's ask-and-tell, told the truth.

Ray 2.60's ``OptunaSearch`` reports intermediate values at Tune's ``training_iteration`` and tells Optuna that a
trial stopped by the scheduler is COMPLETE with its truncated value, so TPE learns from values measured at
different budgets as if they were final. Here every evaluation reaches the Optuna trial as an intermediate
value at its episode count, and a finished trial is told the state :func:`search.protocol.decide` gives it:
COMPLETE (with its value) only for a trial that ran its full budget, PRUNED for one ended early (Optuna's
samplers weigh a pruned trial by its intermediate values), FAIL for a diverged or failed one; the reason goes
into the trial's user attributes. The Optuna study lives in an RDB storage (SQLite beside the study, or the
cluster's PostgreSQL), so ``optuna.load_study`` and optuna-dashboard read it, and a resumed study continues it.

Every Tune trial carries its Optuna trial number in its config (``search.protocol.TRIAL_NUMBER_KEY``), so the
trial has one name everywhere (``t07 slots=35 ...``: Ray's trial name and folder, the MLflow run, the Optuna
``name`` attribute; see :func:`search.protocol.trial_name`).
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
import weakref
from typing import Any

import optuna
from ray.tune import Callback
from ray.tune.search import Searcher

from mann.config import ConfigError

from .config import MEMORY_SCHEME, base_value
from .protocol import RESUME_KEY, TRIAL_NUMBER_KEY, BudgetWatch, Ending, TrialOutcome, TrialReport, decide, trial_name
from .space import suggest
from .storage import open_storage as open_rdb_storage
from .study import SearchError, Study
from .tracking import redact

log = logging.getLogger("mann_search")

STORAGE_ENV = "MANN_OPTUNA_STORAGE"
PAUSED_ATTR = "mann.paused_at"  # set by the freeze_thaw scheduler while it has a trial paused (search/schedulers.py)
PAUSED_WHY_ATTR = "mann.paused_why"  # ... and why it paused it (a sentence; "" once resumed)
TUNE_TRIAL_ATTR = "tune_trial_id"
REASKED_ATTR = "mann.reasked_from"  # on a trial asked again for one lost with a killed driver: that trial's number
RESUME_ATTR = "mann.resume_from"  # ... and the lost trial's newest checkpoint, if it left one (its config's RESUME_KEY)
# A trial asked (and maybe trained) after Tune's last experiment snapshot is unknown to a resumed study
LOST_REASON = ("lost with the driver: asked after Tune's last experiment snapshot, so the resumed study has no "
               "trial of it; its configuration is asked again")
NAME_ATTR = "name"


def storage_url(study: Study) -> str:
    """``optuna.storage`` of the search config, else MANN_OPTUNA_STORAGE, else SQLite beside the study."""
    configured = study.search.config.optuna.storage or os.environ.get(STORAGE_ENV)
    return configured or f"sqlite:///{(study.local_dir / 'optuna.db').resolve()}"


_memory_storages: "weakref.WeakValueDictionary[str, optuna.storages.BaseStorage]" = weakref.WeakValueDictionary()


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage of an SQLAlchemy URL, or for ``memory://NAME`` the process's in-memory storage of that name
    (the same object while anything holds it, so a scheduler's :class:`StudyEvidence` reads what the searcher
    wrote; gone with its last holder)."""
    if url.startswith(MEMORY_SCHEME):
        storage = _memory_storages.get(url)
        if storage is None:
            storage = _memory_storages[url] = optuna.storages.InMemoryStorage()
        return storage
    return open_rdb_storage(url)  # retried through database outages (search/storage.py)


def open_study(study: Study, sampler: optuna.samplers.BaseSampler | None = None,
               storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """The study's Optuna study in its storage (created on first use)."""
    directions = ["maximize" if o.mode == "max" else "minimize" for o in study.search.config.objectives]
    return optuna.create_study(storage=storage or open_storage(storage_url(study)), study_name=study.key,
                               sampler=sampler, directions=directions, load_if_exists=True)


class OptunaStudy:
    """A study's Optuna study in its storage, its trials addressed by number (what survives a driver restart)."""

    def __init__(self, study: Study, sampler: optuna.samplers.BaseSampler | None = None):
        self.metrics = [o.metric for o in study.search.config.objectives]
        self.storage = open_storage(storage_url(study))
        self.study = open_study(study, sampler, self.storage)
        self.study_id = self.storage.get_study_id_from_name(study.key)

    def trial(self, number: int) -> optuna.Trial:
        return optuna.trial.Trial(self.study, self.storage.get_trial_id_from_study_id_trial_number(
            self.study_id, number))

    def tell(self, number: int, report: TrialReport | None, outcome: TrialOutcome) -> TrialOutcome:
        """Tell the trial its outcome (a COMPLETE trial its objective values), with the outcome's attributes;
        a COMPLETE trial without a finite objective is told FAIL. Returns what was told."""
        values = None
        if outcome.state == optuna.trial.TrialState.COMPLETE:
            values = [report.value(m) if report else None for m in self.metrics]
            if any(v is None for v in values):
                outcome, values = TrialOutcome(Ending.FAILED, "no finite objective", outcome.episodes), None
        trial = self.trial(number)
        for k, v in outcome.as_tags().items():
            trial.set_user_attr(k if k == "outcome" else f"outcome.{k}", v)
        self.study.tell(number, values if values is None or len(values) > 1 else values[0], state=outcome.state)
        return outcome

    def running(self) -> set[int]:
        return {t.number for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}


def reask_lost(ot: OptunaStudy, numbers, checkpoints: dict[int, str] | None = None) -> list[int]:
    """Trials lost with a killed driver (RUNNING in the storage, no trial of the resumed Tune study): each is told
    FAIL (:data:`LOST_REASON`), so the study holds no phantom running trial, and its configuration is enqueued
    (:data:`REASKED_ATTR` on the new trial): Tune asks for as many new trials as its snapshot lacks, so the next
    one trains that configuration again instead of a new sample, from the lost trial's newest checkpoint where
    ``checkpoints`` has one (:data:`RESUME_ATTR`, its config's ``RESUME_KEY``), else from the start. Returns the
    numbers told."""
    trials = {t.number: t for t in ot.study.get_trials(deepcopy=False)}
    checkpoints = checkpoints or {}
    told = []
    for number in sorted(numbers):
        ot.tell(number, None, TrialOutcome(Ending.FAILED, LOST_REASON, 0))
        told.append(number)
        resume = checkpoints.get(number)
        if trials[number].params:
            ot.study.enqueue_trial(trials[number].params,
                                   user_attrs={REASKED_ATTR: number, **({RESUME_ATTR: resume} if resume else {})})
        log.warning("optuna: trial %s was lost with the driver (asked after Tune's last snapshot); %s", number,
                    ("its configuration is asked again" + (f", from its checkpoint {resume}" if resume else ""))
                    if trials[number].params else "it had no configuration yet")
    return told


class LostTrials(Callback):
    """A Tune callback for a resumed study: at its first step, before Tune asks for new trials, the Optuna trials
    still RUNNING whose Tune trial is not in the restored study are lost (:func:`reask_lost`). Tune's snapshot of
    its trials and the searcher's can disagree: a trial the searcher gave Tune after Tune's last snapshot is in
    the searcher's but not Tune's (seen with reused worker processes, where a new trial starts and reports at
    once)."""

    def __init__(self, study: Study):
        self.study = study
        self.done = False

    def on_step_begin(self, iteration, trials, **info):
        if self.done:
            return
        self.done = True
        try:
            ot = OptunaStudy(self.study)
            tune_ids = {t.trial_id for t in trials}
            lost = [t for t in ot.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING
                    and t.user_attrs.get(TUNE_TRIAL_ATTR) not in tune_ids]
            reask_lost(ot, [t.number for t in lost], self.checkpoints(lost))
        except Exception as exc:  # the storage down: close_open_trials ends them at the study's end
            log.error("optuna: could not look for trials lost with the driver: %s", exc)

    def checkpoints(self, lost) -> dict[int, str]:
        """The newest checkpoint each lost trial left in the study's folder (trained after Tune's snapshot)."""
        from .trainable import lost_checkpoint

        out = {}
        for t in lost:
            tune_id = t.user_attrs.get(TUNE_TRIAL_ATTR)
            try:
                found = lost_checkpoint(self.study.path, tune_id) if tune_id else None
            except Exception as exc:  # storage unreadable: the configuration is trained from the start
                log.warning("could not look for trial %s's checkpoints: %s", t.number, exc)
                found = None
            if found:
                out[t.number] = found
        return out

    def __reduce__(self):  # Tune pickles callbacks into its state; a resumed driver makes its own
        return (Callback, ())


class StudySearch(Searcher):
    """Ray ``Searcher`` over an Optuna study's ask-and-tell (see the module doc)."""

    def __init__(self, study: Study, sampler: optuna.samplers.BaseSampler, metric, mode):
        super().__init__(metric=metric, mode=mode)
        self.study = study
        self.sampler = sampler
        self.watch = BudgetWatch.of(study.search)
        self.numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self.reported: dict[str, set[int]] = {}  # Tune trial id -> episode counts told as intermediate values
        self.finished: set[str] = set()
        # Tell Optuna how a trial ended only when Tune saves its experiment state (``save``), which by then
        # records the trial as ended: a driver killed in between resumes with the trial RUNNING in both, so Tune
        # runs it on and Optuna gets its real end (told at once, a trial Tune resumes would train on in MLflow
        # while Optuna kept the end told before the kill). Set for the Tune path by ``build_tuner``.
        self.tell_on_save = False
        self._connect()

    # --- the Optuna study (reopened after unpickling: Tune pickles the searcher) ----------------------------

    def _connect(self) -> None:
        self.optuna = OptunaStudy(self.study, self.sampler)
        self.storage_display = redact("uri", storage_url(self.study))
        self.watch.restart()
        self._live: dict[str, optuna.Trial] = {}
        self._ends: list[tuple[str, TrialReport | None, TrialOutcome]] = []  # decided, not told yet

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("optuna", "_live", "_ends"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("tell_on_save", False)  # pickled before it existed
        self._connect()
        self._adopt()

    def _adopt(self) -> None:
        """Find the study's trials again by their ``tune_trial_id`` attribute: a searcher unpickled from an older
        state (Tune restores the one pickled when the experiment started) still reports to and tells them."""
        for t in self.optuna.study.get_trials(deepcopy=False):
            tune_id = t.user_attrs.get(TUNE_TRIAL_ATTR)
            if tune_id and tune_id not in self.numbers:
                self.numbers[tune_id] = t.number
                self.reported[tune_id] = {int(k) for k in t.intermediate_values}
                if t.state.is_finished():
                    self.finished.add(tune_id)

    def _trial(self, trial_id: str) -> optuna.Trial:
        """The live Optuna trial of a Tune trial (rebuilt from its number after a driver restart)."""
        if trial_id not in self._live:
            self._live[trial_id] = self.optuna.trial(self.numbers[trial_id])
        return self._live[trial_id]

    # --- Ray's Searcher interface ---------------------------------------------------------------------------

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric, mode and space come from the study

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        ot = self.optuna.study.ask()
        point = suggest(ot, self.study.search)
        config = {**point, TRIAL_NUMBER_KEY: ot.number}
        resume = ot.user_attrs.get(RESUME_ATTR)  # a lost trial's configuration, asked again with its checkpoint
        if resume:
            config[RESUME_KEY] = resume
        ot.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        ot.set_user_attr(NAME_ATTR, trial_name(config))
        self.numbers[trial_id] = ot.number
        self._live[trial_id] = ot
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        report = TrialReport.from_result(result)
        if report is None or trial_id not in self.numbers or trial_id in self.finished:
            return
        self.watch.observe(trial_id, report)
        if isinstance(self.metric, list) or report.diverged:
            return  # Optuna keeps no intermediate values for multi-objective studies
        value = report.value(self.metric)
        steps = self.reported.setdefault(trial_id, set())
        if value is None or report.episodes in steps:  # a retried trial re-reports from its checkpoint
            return
        steps.add(report.episodes)
        try:
            self._trial(trial_id).report(value, report.episodes)
        except optuna.exceptions.UpdateFinishedTrialError:
            # told before the driver died, after the searcher's last checkpoint: the storage keeps its state
            log.warning("optuna: trial %s was already finished in the storage; its later results are not "
                        "reported", trial_id)
            self.finished.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.finished or trial_id not in self.numbers:
            return
        if result:
            self.on_trial_result(trial_id, result)  # Tune hands the last evaluation to on_trial_complete only
        report = TrialReport.from_result(result)
        self._ends.append((trial_id, report, decide(report, self.watch.facts(), "the trial raised" if error else None)))
        self.finished.add(trial_id)
        if not self.tell_on_save:
            self.tell_ends()

    def tell_ends(self) -> None:
        """Tell Optuna the ends decided since the last call."""
        while self._ends:
            trial_id, report, outcome = self._ends.pop(0)
            try:
                self.optuna.tell(self.numbers[trial_id], report, outcome)
            except Exception as exc:  # e.g. already told before a driver restart
                log.warning("optuna: trial %s not told %s: %s", trial_id, outcome.state.name, exc)

    def save(self, checkpoint_path: str) -> None:
        """Tune saves the searcher right after its experiment state (see ``tell_on_save``)."""
        self.tell_ends()
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        """After a driver restart: trials asked after the searcher's last checkpoint are found again by their
        ``tune_trial_id`` attribute, trials the storage already has as finished (told after that checkpoint) are
        not reported to again, and trials the storage has as RUNNING that the searcher never gave Tune (asked
        just before the driver died) are lost (:func:`reask_lost`). (Trials the searcher gave Tune after Tune's
        last snapshot: :class:`LostTrials`.)"""
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))
        trials = self.optuna.study.get_trials(deepcopy=False)
        running = self.optuna.running()
        stored = {t.number for t in trials}
        for trial_id, number in self.numbers.items():
            if number in stored and number not in running:
                self.finished.add(trial_id)  # told after the searcher's last checkpoint
        reask_lost(self.optuna, running - set(self.numbers.values()))


def close_open_trials(study: Study, started: float, last_results: list[dict[str, Any] | None] = ()) -> int:
    """At the end of a study: tell Optuna how every trial its storage still has RUNNING ended (the episode
    cap, the time budget or the driver's end stop trials without a trial-complete event, and a trial asked but
    never started has none). Each is judged from its last report: Tune's ``last_results`` where it has them
    (Tune does not show the searcher a result it stops a trial on), else its last intermediate value;
    ``started``: ``time.monotonic()`` when this driver started. A trial still WAITING (a lost trial's
    configuration enqueued by :func:`reask_lost` that the study never started) ends ``study_ended`` at 0 episodes
    rather than waiting forever. Returns how many were told."""
    ot = OptunaStudy(study)
    watch = BudgetWatch.of(study.search)
    watch.started = started
    trials = ot.study.get_trials(deepcopy=False)
    reports = {t.number: _last_report(t, ot.metrics[0]) for t in trials}
    for result in last_results:
        number, report = (result or {}).get("config", {}).get(TRIAL_NUMBER_KEY), TrialReport.from_result(result)
        if isinstance(number, int) and report and (reports.get(number) is None
                                                   or report.episodes >= reports[number].episodes):
            reports[number] = report
    for number, report in reports.items():
        watch.observe(str(number), report)
    running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    paused = {t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING
              and t.user_attrs.get(PAUSED_ATTR) not in (None, "")}  # the freeze_thaw scheduler's mark
    stored = {t.number: t for t in trials}
    for number in running:
        report = reports.get(number)
        value = report.value(ot.metrics[0]) if report is not None and len(ot.metrics) == 1 else None
        if value is not None and report.episodes not in stored[number].intermediate_values:
            # Tune stopped the trial on this result (the searcher is not shown it) and the driver ended before
            # the trial-complete event: Optuna gets the evaluation MLflow has
            ot.trial(number).report(value, report.episodes)
        ot.tell(number, report, decide(report, watch.facts(study_ended=True), paused=number in paused))
    waiting = [t.number for t in trials if t.state == optuna.trial.TrialState.WAITING]
    for _ in waiting:  # enqueued (a lost trial's configuration asked again) and never started: the study ended
        number = ot.study.ask().number  # first (Optuna has no tell for a WAITING trial), in enqueue order
        ot.tell(number, None, decide(None, watch.facts(study_ended=True)))
    return len(running) + len(waiting)


WARM_ATTR = "mann.warm_start_from"  # a trial copied from an earlier study (its key), never run in this one


def warm_sources(search, sources: list[str] | None = None) -> list[Study]:
    """The earlier studies of ``optuna.warm_start`` (checked before a study is created): each must be a study
    folder whose objectives are ``search``'s; the error names the entry."""
    objectives = [(o.metric, o.mode) for o in search.config.objectives]
    out = []
    for i, source in enumerate(sources if sources is not None else search.config.optuna.warm_start):
        where = f"optuna.warm_start[{i}]: {source}"
        try:
            old = Study.load(source, note_changes=False)
        except SearchError as exc:  # its message starts with the folder or file already
            raise SearchError(f"optuna.warm_start[{i}]: {exc}") from None
        if [(o.metric, o.mode) for o in old.search.config.objectives] != objectives:
            raise SearchError(f"{where}: its objectives {[o.metric for o in old.search.config.objectives]} are "
                              f"not this study's {[m for m, _ in objectives]}")
        out.append(old)
    return out


def warm_start(study: Study, sources: list[Study] | None = None) -> dict[str, int]:
    """Seed a new study's Optuna study with the finished trials of earlier studies (``optuna.warm_start``; see
    :func:`warm_sources`), so its sampler starts from their evidence instead of from random points: each
    COMPLETE trial with its value and each PRUNED one with its intermediate values, marked with
    :data:`WARM_ATTR`. A trial is copied only when the configuration it trained is a point of this study's
    space: a parameter this space searches and the earlier study fixed takes the earlier base's value, one this
    space fixes must have had that value, and every value must lie in this space's ranges. Copied trials are
    never trained and are not trials of this study (status, outcomes and selection leave them out); this
    study's own trials are numbered after them. Returns ``{source study key: trials copied}``."""
    ot = OptunaStudy(study)
    if ot.study.get_trials(deepcopy=False):
        raise SearchError(f"study {study.key}: a warm start goes into a new study only")
    copied = {}
    for old in sources if sources is not None else warm_sources(study.search):
        try:
            trials = OptunaStudy(old).study.get_trials(deepcopy=False, states=(
                optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
        except KeyError:
            trials = []
        n = 0
        for t in trials:
            if WARM_ATTR in t.user_attrs:
                continue  # copied into that study from another: copy from its own source
            point = _point_in(study, old, t.params)
            if point is None:
                continue
            fixed = optuna.trial.FixedTrial(point)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # out-of-range values are checked just below
                    values = suggest(fixed, study.search)
            except (ValueError, ConfigError):
                continue
            if any(point.get(k) != v for k, v in values.items()) or not all(
                    _contains(d, values[k]) for k, d in fixed.distributions.items()):
                continue
            ot.study.add_trial(optuna.trial.create_trial(
                state=t.state, params=values, distributions=fixed.distributions,
                values=t.values if t.state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values=dict(t.intermediate_values),
                user_attrs={WARM_ATTR: old.key, NAME_ATTR: t.user_attrs.get(NAME_ATTR, f"t{t.number:02d}"),
                            **{k: v for k, v in t.user_attrs.items() if k.startswith("outcome")}}))
            n += 1
        copied[old.key] = n
    return copied


def _point_in(study: Study, old: Study, params: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier trial's configuration as a point of ``study``'s space, or None if it is not one."""
    point = {}
    for path in study.search.config.space:
        if path in params:
            point[path] = params[path]
            continue
        try:
            point[path] = base_value(old.search.base_tree, path)  # fixed in the earlier study
        except KeyError:
            pass  # not in that base: only a parameter inactive here (a condition) may lack it
    for path, value in params.items():
        if path not in study.search.config.space:
            try:
                if base_value(study.search.base_tree, path) != value:
                    return None  # this study fixes it elsewhere
            except KeyError:
                return None
    return point


def _contains(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(dist, (optuna.distributions.IntDistribution, optuna.distributions.FloatDistribution)):
        return dist.low <= value <= dist.high
    return True  # categorical: FixedTrial refused a value outside the choices


def trial_recipe(study: Study, name: str | None = None) -> tuple[str, Any, str]:
    """A trial of the study as a complete MANN config (``mann train --config``): the study's base with its
    overrides and the trial's sampled point. ``name``: ``t08`` or ``8`` (a trial of this study, not one copied by
    a warm start); None: the best COMPLETE trial by the study's first objective. Returns ``(trial name, the
    TrainConfig, a one-line description)``."""
    ot = OptunaStudy(study)
    own = [t for t in ot.study.get_trials(deepcopy=False) if WARM_ATTR not in t.user_attrs]
    if name is None:
        done = [t for t in own if t.state == optuna.trial.TrialState.COMPLETE and t.values]
        if not done:
            raise SearchError(f"study {study.key}: no trial ran its full budget yet; name one with --trial")
        sign = 1 if study.search.config.objectives[0].mode == "max" else -1
        trial = max(done, key=lambda t: sign * t.values[0])
    else:
        digits = name[1:] if name[:1] in ("t", "T") else name
        trial = next((t for t in own if digits.isdigit() and t.number == int(digits)), None)
        if trial is None:
            raise SearchError(f"--trial {name}: no such trial in study {study.key} (its trials: "
                              f"{', '.join(f't{t.number:02d}' for t in own) or 'none'})")
    label = f"t{trial.number:02d}"
    point = dict(trial.params)
    steps = trial.intermediate_values
    got = (f"{study.search.config.objectives[0].metric} {trial.values[0]:.4f}" if trial.values else
           f"last {study.search.config.objectives[0].metric} {steps[max(steps)]:.4f}" if steps else "no evaluation")
    outcome = trial.user_attrs.get("outcome", trial.state.name.lower())
    return label, study.search.trial_config(point), f"trial {label} of study {study.key} ({outcome}; {got})"


def _last_report(trial: optuna.trial.FrozenTrial, metric: str) -> TrialReport | None:
    if not trial.intermediate_values:
        return None
    step = max(trial.intermediate_values)
    return TrialReport(int(step), {metric: float(trial.intermediate_values[step])})


def pause_reason(study: Study, trial) -> str:
    """Why the freeze_thaw scheduler paused Tune ``trial`` (the sentence it stored as ``mann.paused_why``; ``""``
    where there is none, or the storage cannot say): what the console's pause line and the MLflow tag show."""
    number = trial.config.get(TRIAL_NUMBER_KEY)
    if not isinstance(number, int):
        return ""
    try:
        storage = open_storage(storage_url(study))
        tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.key), number)
        return str(storage.get_trial(tid).user_attrs.get(PAUSED_WHY_ATTR) or "")
    except Exception:  # no such study or trial (yet), or the storage down: the pause is shown without its why
        return ""


def trial_outcomes(study: Study, trials: list | None = None) -> dict[str, str]:
    """``{trial name: outcome}`` from the study's Optuna storage (``running`` while a trial runs or waits,
    ``paused`` while the freeze_thaw scheduler has it paused); ``trials``: its Optuna trials, if read already."""
    out = {}
    for t in trials if trials is not None else OptunaStudy(study).study.get_trials(deepcopy=False):
        if WARM_ATTR in t.user_attrs:
            continue  # copied from an earlier study (warm_start)
        name = t.user_attrs.get(NAME_ATTR, f"t{t.number:02d}")
        if t.state == optuna.trial.TrialState.RUNNING:
            out[name] = "paused" if t.user_attrs.get(PAUSED_ATTR) not in (None, "") else "running"
            continue
        out[name] = t.user_attrs.get("outcome", t.state.name.lower())
    return out


def paused_reasons(study: Study, trials: list | None = None) -> dict[str, str]:
    """``{trial name: why the freeze_thaw scheduler paused it}`` for the trials it has paused now (``""`` where
    the storage holds no reason: paused by a version before 2026-12-07's); ``trials`` as :func:`trial_outcomes`."""
    out = {}
    for t in trials if trials is not None else OptunaStudy(study).study.get_trials(deepcopy=False):
        if (t.state == optuna.trial.TrialState.RUNNING and WARM_ATTR not in t.user_attrs
                and t.user_attrs.get(PAUSED_ATTR) not in (None, "")):
            out[t.user_attrs.get(NAME_ATTR, f"t{t.number:02d}")] = str(t.user_attrs.get(PAUSED_WHY_ATTR) or "")
    return out
