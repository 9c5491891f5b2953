"""The simulated engine of ``mann-search benchmark`` (``--engine sim``, the default): a benchmark instrument, not
part of the service. It drives *the very searcher and scheduler objects* a study builds (Ray's ``OptunaSearch``
for the baseline, :func:`search.make_searcher` for the rest, :func:`search.make_scheduler` for every scheduler
kind) on simulated time, with each replayed trial *returning* its recorded training time instead of spending
it (Syne Tune's simulator backend: tabulated functions "return their computation time rather than spend it").

What it does as Tune does (Ray 2.60, ``ray/tune/execution/tune_controller.py``):

* **Trials.** Real ``ray.tune.experiment.Trial`` objects (stubs), created from ``searcher.suggest`` (wrapped in
  Ray's ``ConcurrencyLimiter`` when ``budget.max_concurrent`` is set, as the Tuner wraps it) until
  ``budget.num_samples`` suggestions were made; ``scheduler.on_trial_add`` for each; at most ``slots`` run at once
  (the table's ``budget.max_concurrent``, 2 when unset), and a free slot goes to the trial the scheduler's
  ``choose_trial_to_run`` picks (FIFO: pending trials first, then paused ones).
* **Results.** A trial reports the recorded evaluations of the configuration nearest to its point (the replay
  trainable's mapping and seed, :meth:`table.Table.curve_of`; every ``every``-th one and the last) at simulated
  time ``start + recorded train_s``. Per result, in Tune's order: the episode-cap stopper, else
  ``scheduler.on_trial_result``; then ``searcher.on_trial_result`` unless STOP; then the recorder. After a
  trial's last evaluation its function returns: Tune hands the last result again (``done``) to the scheduler and
  the searcher, then ``on_trial_complete`` to both.
* **Decisions.** CONTINUE; STOP (``on_trial_complete`` with the last result); PAUSE (the trial leaves its slot,
  keeps its place on its curve and its limiter slot, and goes on from its next evaluation when
  ``choose_trial_to_run`` picks it). ``stop_trial`` on the controller ends a trial (HyperBand calls it).
* **End.** When the episode cap (``budget.max_episodes``) is spent, or nothing runs and nothing can start. Trials
  still running, pending or paused then end as Tune's callbacks see them at the experiment's end
  (:func:`search.decide` with ``study_ended``); :attr:`methods.Run.paused` lists the paused ones never resumed.

Where it differs from a Tuner: no actors, no checkpoints, no time budget, no retries; a trial is suggested only
when a slot is free (Tune may suggest up to its pending-trial limit ahead, which matters only without the
concurrency limiter); ties in simulated time go in the order the events were scheduled. The Optuna studies live
in memory (``optuna.storage: memory://...``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from search import BudgetWatch, TrialReport, decide

from .methods import ORACLE, SIM_ONLY_OVERRIDES, Run, method_searcher, method_study
from .table import Table, recorded_values

PAUSE = TrialScheduler.PAUSE
STOP = TrialScheduler.STOP


@dataclass
class _Live:
    """A trial's place on its recorded curve."""

    trial: Trial
    cfg: int
    seed: int
    steps: list[int]  # indices of the recorded evaluations it reports
    pos: int = 0  # next of ``steps``
    iteration: int = 0  # Tune's training_iteration
    base_s: float = 0.0  # recorded train_s at its last reported evaluation
    resumed: int = 0


class Controller:
    """What Ray's schedulers call on Tune's controller (``get_trials``, ``get_live_trials``, ``stop_trial``)."""

    def __init__(self, engine: "SimStudy"):
        self._engine = engine

    def get_trials(self) -> list[Trial]:
        return self._engine.trials

    def get_live_trials(self) -> list[Trial]:
        return [t for t in self._engine.trials if not t.is_finished()]

    def stop_trial(self, trial: Trial) -> None:
        self._engine.stop(trial)


def report_steps(curve: dict[str, Any], every: int) -> list[int]:
    """The recorded evaluations a replayed trial reports (as :func:`replay.replay_trial`): every ``every``-th and
    the last; a non-finite value is reported (as diverged) and ends the curve."""
    out = []
    n = len(curve["objective"])
    for i, v in enumerate(curve["objective"]):
        finite = v is not None and math.isfinite(v)
        if (i + 1) % every and i + 1 < n and finite:
            continue
        out.append(i)
        if not finite:
            break
    return out


class SimStudy:
    """One study on simulated time (see the module doc). ``run()`` returns its :class:`methods.Run`."""

    def __init__(self, table: Table, searcher: Searcher, scheduler: TrialScheduler | None, search, salt: int,
                 slots: int, every: int = 1, limit: int | None = None):
        self.table, self.search, self.salt, self.every, self.slots = table, search, salt, every, slots
        budget = search.config.budget
        self.num_samples, self.cap = budget.num_samples, budget.max_episodes
        self.searcher = ConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher
        self.limited = bool(limit)
        self.scheduler = scheduler if scheduler is not None else FIFOScheduler()
        self.metric = search.config.primary.metric
        self.controller = Controller(self)
        self.watch = BudgetWatch.of(search)
        self.trials: list[Trial] = []
        self.live: dict[str, _Live] = {}
        self.running: set[str] = set()
        self.events: list[tuple[float, int, str]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.created = 0
        self.search_done = False
        self.cap_spent = False
        self.run_ = Run()
        self.prefix = uuid.uuid4().hex[:5]

    # --- trials --------------------------------------------------------------------------------------------

    def _new_trial(self) -> bool:
        if self.search_done or self.created >= self.num_samples:
            return False
        if not self.limited and any(t.status == Trial.PENDING for t in self.trials):
            return False  # no limiter: suggest when a slot is free (see the module doc)
        tid = f"{self.prefix}_{self.created:05d}"
        config = self.searcher.suggest(tid)
        if config == Searcher.FINISHED:
            self.search_done = True
            return False
        if config is None:
            return False
        self.created += 1
        trial = Trial("replay", config=config, trial_id=tid, stub=True)
        self.trials.append(trial)
        cfg, seed = self.table.curve_of(config, self.salt)
        self.live[tid] = _Live(trial, cfg, seed, report_steps(self.table.curves[cfg][seed], self.every))
        self.scheduler.on_trial_add(self.controller, trial)
        return True

    def _fill(self) -> None:
        while len(self.running) < self.slots and not self.cap_spent:
            self._new_trial()
            trial = self.scheduler.choose_trial_to_run(self.controller)
            if trial is None or trial.status not in (Trial.PENDING, Trial.PAUSED):
                return
            self._start(trial)

    def _start(self, trial: Trial) -> None:
        live = self.live[trial.trial_id]
        if trial.status == Trial.PAUSED:
            live.resumed += 1
        elif trial.trial_id not in self.run_.started:
            self.run_.started.append(trial.trial_id)
        trial.set_status(Trial.RUNNING)
        self.running.add(trial.trial_id)
        self._schedule(live)

    def _schedule(self, live: _Live) -> None:
        train_s = self.table.curves[live.cfg][live.seed]["train_s"]
        at = self.now + max(0.0, float(train_s[live.steps[live.pos]]) - live.base_s)
        heapq.heappush(self.events, (at, next(self.seq), live.trial.trial_id))

    def _end(self, live: _Live, result: dict[str, Any]) -> None:
        """Tune's ``stop_trial`` for a running trial: both told ``on_trial_complete``, then the recorder."""
        trial = live.trial
        self.running.discard(trial.trial_id)
        self.scheduler.on_trial_complete(self.controller, trial, result)
        self.searcher.on_trial_complete(trial.trial_id, result=result)
        self.run_.ended[trial.trial_id] = decide(TrialReport.from_result(result), self.watch.facts())
        trial.set_status(Trial.TERMINATED)

    def stop(self, trial: Trial) -> None:
        """The controller's ``stop_trial``: a running trial completes with its last result, a pending or paused
        one is removed (``on_trial_remove``; the searcher told it completed without a result)."""
        if trial.is_finished():
            return
        live = self.live[trial.trial_id]
        if trial.status == Trial.RUNNING:
            self._end(live, trial.last_result)
            return
        self.scheduler.on_trial_remove(self.controller, trial)
        self.searcher.on_trial_complete(trial.trial_id)
        report = TrialReport.from_result(trial.last_result)
        self.run_.ended[trial.trial_id] = decide(report, self.watch.facts())
        trial.set_status(Trial.TERMINATED)

    # --- one result ----------------------------------------------------------------------------------------

    def _result(self, live: _Live) -> None:
        trial, tid = live.trial, live.trial.trial_id
        curve = self.table.curves[live.cfg][live.seed]
        i = live.steps[live.pos]
        live.pos += 1
        live.iteration += 1
        live.base_s = float(curve["train_s"][i])
        episodes, value = int(curve["episodes"][i]), curve["objective"][i]
        if value is None or not math.isfinite(value):
            report = TrialReport(episodes, {self.metric: 0.0 if self.table.sign > 0 else 1e9}, diverged=True,
                                 failure="the recorded curve diverged")
        else:
            report = TrialReport(episodes, recorded_values(curve, i, self.metric))
        result = {**report.to_result(), "training_iteration": live.iteration, "trial_id": tid, "done": False}
        self.watch.observe(tid, report)
        self.cap_spent = bool(self.cap) and self.watch.episodes >= self.cap
        decision = STOP if self.cap_spent else self.scheduler.on_trial_result(self.controller, trial, result)
        if decision != STOP:
            self.searcher.on_trial_result(tid, result)
        if report.value(self.metric) is not None:
            self.run_.results.append((tid, float(episodes), report.value(self.metric), live.cfg, live.seed))
        trial.update_last_result(result)
        if decision == STOP:
            self._end(live, result)
        elif live.pos >= len(live.steps):  # the trainable returned: Tune hands the last result again, done
            done = {**result, "done": True}
            if self.scheduler.on_trial_result(self.controller, trial, done) != STOP:
                self.searcher.on_trial_result(tid, done)
            self._end(live, done)
        elif decision == PAUSE:
            self.running.discard(tid)
            trial.set_status(Trial.PAUSED)
        else:
            self._schedule(live)

    # --- the study -----------------------------------------------------------------------------------------

    def run(self) -> Run:
        self._fill()
        while self.events and not self.cap_spent:
            self.now, _, tid = heapq.heappop(self.events)
            if tid in self.running:
                self._result(self.live[tid])
            self._fill()
        for trial in self.trials:  # what Tune's callbacks see at the experiment's end
            if trial.trial_id not in self.run_.ended:
                self.run_.ended[trial.trial_id] = decide(TrialReport.from_result(trial.last_result),
                                                         self.watch.facts(study_ended=True))
        self.run_.paused = [t.trial_id for t in self.trials if t.status == Trial.PAUSED]
        self.run_.resumed = {tid: x.resumed for tid, x in self.live.items() if x.resumed}
        self.run_.sim_s = self.now
        return self.run_


# --- the i-epoch baseline ------------------------------------------------------------------------------------


class IEpoch(FIFOScheduler):
    """The i-epoch baseline (Egele et al. 2023): train every configuration a short budget (``rung`` episodes),
    then continue the best. Each trial is paused at its first evaluation at or past ``rung``; once no trial is
    pending or still probing, the best paused trial (by its value at the rung) is resumed and runs to its end,
    then the next best, until the study's episode cap. A scheduler of the simulated engine only (Tune's replay
    trainable restarts a paused trial from its first evaluation)."""

    def __init__(self, time_attr: str, metric: str, mode: str, rung: float):
        super().__init__()
        self._time_attr, self._metric, self._sign = time_attr, metric, 1.0 if mode == "max" else -1.0
        self.rung = rung
        self.probe: dict[str, float] = {}  # trial id -> value at the rung
        self.promoted: set[str] = set()

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        t, v = result.get(self._time_attr), result.get(self._metric)
        if trial.trial_id in self.promoted or t is None or v is None or t < self.rung or result.get("done"):
            return TrialScheduler.CONTINUE
        self.probe[trial.trial_id] = self._sign * float(v)
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        pending = [t for t in trials if t.status == Trial.PENDING]
        if pending:
            return pending[0]
        if any(t.status == Trial.RUNNING and t.trial_id not in self.promoted for t in trials):
            return None  # probes still running: their values may be the best
        paused = [t for t in trials if t.status == Trial.PAUSED]
        if not paused:
            return None
        best = max(paused, key=lambda t: self.probe.get(t.trial_id, -math.inf))
        self.promoted.add(best.trial_id)
        return best


def iepoch_scheduler(study, table: Table, salt: int, target: float | None) -> IEpoch:
    """i-epoch with a rung of a tenth of the full budget (one evaluation of the quickstart's 30k at 3000)."""
    from mann import metrics

    search = study.search
    primary = search.config.primary
    return IEpoch(metrics.EPISODES, primary.metric, primary.mode, rung=0.1 * search.max_episodes)


def oracle_scheduler(study, table: Table, salt: int, target: float | None):
    """The reference row ``tpe+oracle@click`` (:class:`search.bench.bound.OracleAtClick`; it reads the table)."""
    from .bound import OracleAtClick

    if target is None:
        raise ValueError("the oracle needs the benchmark's target (the baseline's median final regret)")
    return OracleAtClick(study, table, salt, target)


# methods only this engine runs: name -> (search-config overrides, scheduler factory of (study, table, the
# repetition's salt, the benchmark's target regret))
SIM_ONLY: dict[str, tuple[dict[str, Any], Callable]] = {
    "i-epoch": (SIM_ONLY_OVERRIDES["i-epoch"], iepoch_scheduler),
    ORACLE: (SIM_ONLY_OVERRIDES[ORACLE], oracle_scheduler),
}


def run_study_sim(table: Table, method: str, repeat: int, num_samples: int, cap: int | None, every: int = 1,
                  shipped=None, scheduler: Callable | None = None, target: float | None = None) -> Run:
    """One study of ``method`` (a ``methods.METHODS`` or :data:`SIM_ONLY` name) on simulated time.
    ``scheduler``: a factory ``study -> scheduler`` replacing the method's (tests; pause-capable schedulers).
    ``target``: the benchmark's target regret (the oracle reference needs it)."""
    from search import FreezeThaw, SlotLimiter, make_scheduler

    slots = table.search.config.budget.max_concurrent or 2
    search, study, flavour = method_study(table, method, repeat, num_samples, cap, shipped,
                                          optuna_storage=f"memory://{uuid.uuid4().hex}", path="/nonexistent/sim")
    searcher = method_searcher(search, study, flavour)
    if scheduler is not None:
        sched = scheduler(study)
    elif method in SIM_ONLY:
        sched = SIM_ONLY[method][1](study, table, repeat, target)
    else:
        sched = make_scheduler(study)
    limit = search.config.budget.max_concurrent
    if isinstance(sched, FreezeThaw):  # as build_tuner does: a paused trial frees its slot
        searcher, limit = SlotLimiter(searcher, sched), None
    sim = SimStudy(table, searcher, sched, search, repeat, slots, every, limit=limit)
    run = sim.run()
    if isinstance(sched, FreezeThaw):
        run.why = dict(sched.rule.why)
    return run
