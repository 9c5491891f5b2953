"""The Optuna study's storage, made to outlast a database outage (a restart, a failover, cut connections).

Optuna's ``RDBStorage`` turns any SQLAlchemy error into ``StorageInternalError`` at once, and the searcher's calls run
inside Tune's driver loop, so one PostgreSQL restart used to end the whole study (the driver exited with
``StorageInternalError: ... Connection refused``, a trial left RUNNING, no model selected). :func:`open_storage`
returns a storage that delegates every call to an ``RDBStorage`` and, when the database cannot be reached, waits and
tries again with backoff for up to ``MANN_OPTUNA_RETRY_S`` seconds (default 300) before giving up: Tune's event loop
waits with it while the trials go on training (their results queue up), and the MLflow outbox keeps its own queue.
It logs one warning when an outage starts and one when the database answers again.

What counts as an outage: ``OperationalError``/``InterfaceError``/``DisconnectionError``/a pool timeout, or any
``DBAPIError`` whose connection was invalidated, raised directly or as the cause of Optuna's
``StorageInternalError`` (connection refused, "the database system is shutting down / starting up", "terminating
connection due to administrator command", "server closed the connection unexpectedly"). Never retried: wrong
credentials, a missing database or role (they do not heal), and anything else (integrity and data errors).

Which calls are safe to repeat after a failure whose commit may have gone through (the acknowledgement lost):
- reads, and the upserts (params, intermediate values, user and system attributes): repeating writes the same row;
- ``set_trial_state_values`` (a tell): a repeat finds the trial already finished; if the storage holds exactly the
  state and values asked for, that was our own commit and the call counts as done (otherwise the error stands);
- ``create_new_study``: a repeat that finds the study by its name returns its id;
- ``create_new_trial`` (an ask): a blind repeat would leave a phantom RUNNING trial behind the lost commit, so a
  repeat first adopts a RUNNING trial of the study with no parameters yet that started after the first attempt and
  that this storage has not handed out (one driver asks one trial at a time per study, so it is ours). A template
  trial (``enqueue_trial``/``add_trial``, not used by mann-search) is repeated as is. Optuna's own five quick
  retries inside ``create_new_trial`` are below this layer and keep their behaviour.

Optuna wraps an ``RDBStorage`` passed to a study in its trial cache; this storage is not one, so every read goes to
the database (a few small queries per trial event, negligible next to a trial).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from datetime import datetime
from typing import Any, Callable, Sequence, TypeVar

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from .tracking import redact

log = logging.getLogger("mann_search.storage")

RETRY_ENV = "MANN_OPTUNA_RETRY_S"
DEFAULT_RETRY_S = 300.0
_T = TypeVar("_T")
# libpq / PostgreSQL messages of errors that waiting does not fix
_PERMANENT = ("authentication failed", "no pg_hba.conf entry", "does not exist", "permission denied",
              "password must be", "invalid dsn", "could not translate host name")


def retry_budget_s() -> float:
    """How long one storage call may keep retrying through an outage (``MANN_OPTUNA_RETRY_S``, seconds)."""
    return float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_S)


def engine_kwargs(url: str) -> dict[str, Any]:
    # SQLite beside the study: wait for the lock instead of failing while optuna-dashboard reads it. A server:
    # test each pooled connection before use, so one dropped by a restart is replaced instead of failing a call.
    return {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}




def transient(exc: BaseException) -> bool:
    """A database outage (wait and retry) rather than an error that retrying cannot fix?"""
    import sqlalchemy.exc as sa

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, sa.SQLAlchemyError):
            text = str(e).lower()
            if any(word in text for word in _PERMANENT):
                return False
            if isinstance(e, sa.DBAPIError) and e.connection_invalidated:
                return True
            return isinstance(e, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, sa.TimeoutError))
        e = e.__cause__ or e.__context__
    return False


class ResilientStorage(BaseStorage):
    """An ``RDBStorage`` whose calls wait out a database outage (see the module doc for what is retried).

    Args:
        url: the SQLAlchemy URL (credentials best left to PGUSER/PGPASSWORD; the URL is only logged redacted).
        retry_s: the longest one call keeps retrying; default ``MANN_OPTUNA_RETRY_S`` or 300 s.
    """

    def __init__(self, url: str, retry_s: float | None = None):
        self.url = url
        self.retry_s = retry_budget_s() if retry_s is None else float(retry_s)
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.RLock()
        self._local = threading.local()  # depth of nested calls (only the outermost one retries)
        self._down_since: float | None = None
        self._issued: set[int] = set()  # trial ids this storage handed out (create_new_trial)
        self._rdb: RDBStorage | None = None
        self._rdb = self._retry("connect", lambda: RDBStorage(self.url, engine_kwargs=engine_kwargs(self.url)))

    # pickled with the searcher's state (Tune checkpoints it): the URL and settings only; reconnects on load
    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "retry_s": self.retry_s, "issued": set(self._issued)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url, self.retry_s = state["url"], state["retry_s"]
        self._setup()
        self._issued = set(state.get("issued", ()))

    # --- the retry loop ----------------------------------------------------------------------------------------

    def _retry(self, what: str, call: Callable[[], _T], again: Callable[[BaseException], _T] | None = None) -> _T:
        """``call()``, repeated through an outage for up to ``retry_s``; on a repeat after a failure, ``again(exc)``
        (if given) decides what a non-transient error from the repeat means (e.g. our lost commit found)."""
        depth = getattr(self._local, "depth", 0)
        if depth:  # nested inside a call that retries already
            return call()
        self._local.depth = 1
        try:
            start, wait, failed = time.monotonic(), 0.5, False
            while True:
                try:
                    result = call()
                except Exception as exc:
                    if failed and again is not None and not transient(exc):
                        return again(exc)
                    remaining = self.retry_s - (time.monotonic() - start)
                    if not transient(exc) or remaining <= 0:
                        if transient(exc):
                            log.error("optuna storage %s: still unreachable after %.0f s (%s); giving up on %s",
                                      redact("uri", self.url), time.monotonic() - start, _first_line(exc), what)
                        raise
                    failed = True
                    self._outage(exc)
                    if self._rdb is not None:
                        self._rdb.remove_session()
                    time.sleep(min(wait * random.uniform(0.8, 1.2), remaining))
                    wait = min(wait * 2, 10.0)
                    continue
                self._recovered()
                return result
        finally:
            self._local.depth = 0

    def _outage(self, exc: BaseException) -> None:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("optuna storage %s unreachable (%s); retrying for up to %.0f s (%s)",
                            redact("uri", self.url), _first_line(exc), self.retry_s, RETRY_ENV)

    def _recovered(self) -> None:
        with self._lock:
            if self._down_since is not None:
                log.warning("optuna storage %s reachable again after %.0f s", redact("uri", self.url),
                            time.monotonic() - self._down_since)
                self._down_since = None

    def _do(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._retry(name, lambda: getattr(self._rdb, name)(*args, **kwargs))

    # --- calls whose repeat needs care (see the module doc) -----------------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        def again(exc: BaseException) -> int:
            if isinstance(exc, optuna.exceptions.DuplicatedStudyError) and study_name is not None:
                return self._rdb.get_study_id_from_name(study_name)  # our lost commit
            raise exc

        return self._retry("create_new_study", lambda: self._rdb.create_new_study(directions, study_name), again)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        asked = datetime.now()
        attempts = 0

        def create() -> int:
            nonlocal attempts
            attempts += 1
            if attempts > 1 and template_trial is None:
                lost = [t._trial_id for t in self._rdb.get_all_trials(study_id, deepcopy=False,
                                                                     states=(TrialState.RUNNING,))
                        if t._trial_id not in self._issued and not t.params and t.datetime_start is not None
                        and t.datetime_start >= asked]
                if len(lost) == 1:
                    log.warning("optuna: trial id %d was created before the outage hid the answer; using it",
                                lost[0])
                    return lost[0]
            return self._rdb.create_new_trial(study_id, template_trial)

        trial_id = self._retry("create_new_trial", create)
        self._issued.add(trial_id)
        return trial_id

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        def again(exc: BaseException) -> bool:
            if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
                stored = self._rdb.get_trial(trial_id)
                if stored.state == state and (values is None or list(stored.values or []) == list(values)):
                    return True  # our lost commit
            raise exc

        return self._retry("set_trial_state_values",
                           lambda: self._rdb.set_trial_state_values(trial_id, state, values), again)

    # --- everything else: reads and upserts, repeated as they are --------------------------------------------

    def delete_study(self, study_id: int) -> None:
        self._do("delete_study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._do("set_study_user_attr", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._do("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._do("get_study_id_from_name", study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._do("get_study_name_from_id", study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._do("get_study_directions", study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._do("get_study_user_attrs", study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._do("get_study_system_attrs", study_id)

    def get_all_studies(self) -> list:
        return self._do("get_all_studies")

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution) -> None:
        self._do("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._do("get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._do("get_trial_number_from_id", trial_id)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._do("get_trial_param", trial_id, param_name)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._do("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._do("set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._do("set_trial_system_attr", trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._do("get_trial", trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self._do("get_all_trials", study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._do("get_n_trials", study_id, state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._do("get_best_trial", study_id)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._do("get_trial_params", trial_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._do("get_trial_user_attrs", trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._do("get_trial_system_attrs", trial_id)

    def remove_session(self) -> None:
        if self._rdb is not None:
            self._rdb.remove_session()


def _first_line(exc: BaseException) -> str:
    """The root cause's first line (the driver's message, e.g. psycopg2's ``Connection refused``)."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(getattr(root, "orig", None) or root).strip().splitlines()
    return f"{root.__class__.__name__}: {text[0][:200] if text else ''}"


def open_storage(url: str) -> BaseStorage:
    """The storage of a study at ``url`` (SQLite or a server): Optuna's RDB storage, retried through outages."""
    return ResilientStorage(url)
