"""MLflow lineage for a study: one parent run, one nested child run per trial (driver side, no Ray here).

Every write goes through an outbox: operations are queued in order and delivered by :meth:`StudyTracker.flush`.
When the tracking server is unreachable, nothing is lost: the queue waits (training goes on) and is delivered
once the server is back; what is still undelivered at the end is written to a replay file
(``mann-search replay``). Runs are found again by tags (``mann.study``, ``mann.trial_id``), so a resumed study
continues the same runs, and metric points already logged are not logged twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("mann_search.tracking")

STUDY_TAG = "mann.study"
TRIAL_TAG = "mann.trial_id"
ROLE_TAG = "mann.role"
OUTCOME_TAG = "mann.outcome"
REASON_TAG = "mann.failure_reason"
# MLflow 3 opens an experiment on its GenAI overview unless told it is model training (the tag, and the
# workflowType parameter in every link we print: the UI picks its view from the URL first).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"

_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|credential|api[_-]?key|auth)", re.I)
_URI_CREDENTIALS = re.compile(r"(://)([^/@\s:]+)(:[^/@\s]*)?@")


def redact(key: str, value: Any) -> Any:
    """Never log credentials: secret-looking keys are masked and user:password@ is stripped from URIs."""
    if _SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return _URI_CREDENTIALS.sub(r"\1***@", value)
    return value


def resolve_tracking_uri(configured: str | None, storage_dir: Path) -> str:
    """Config, else MLFLOW_TRACKING_URI, else an embedded SQLite store beside the study's results."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    storage_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(storage_dir / 'mlflow.db').resolve()}"


def venv_tool(name: str) -> str:
    """The absolute path of a console script of this Python's environment (a new shell has no venv on PATH);
    the bare name where this environment has none."""
    tool = Path(sys.executable).parent / name
    return str(tool) if tool.is_file() else name


def ui_command(study_path: str | Path) -> str:
    """The command that serves a study's MLflow UI (``mann-search ui``), runnable as printed from a new shell."""
    return shlex.join([venv_tool("mann-search"), "ui", str(Path(study_path).resolve())])


def mlflow_ui_args(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The venv's `mlflow ui` for a local store (one worker); an embedded SQLite store's artifacts are the
    ``mlartifacts`` folder beside it. Run it with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false (no job runner)."""
    args = [venv_tool("mlflow"), "ui", "--host", host, "--port", str(port), "--workers", "1",
            "--backend-store-uri", tracking_uri]
    if tracking_uri.startswith("sqlite:///"):
        root = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        args += ["--default-artifact-root", root, "--artifacts-destination", root]
    return args


def ui_link(tracking_uri: str, experiment_id: str | None, run_id: str | None = None,
            study_path: str | Path | None = None) -> tuple[str, str | None]:
    """The MLflow UI address of an experiment's runs (or of one run) in the Model-training view, and the command
    that serves the UI when the store is local (None for a tracking server): ``mann-search ui STUDY_DIR`` given
    the study's folder, else the venv's ``mlflow ui`` with MLflow 3's job runner off."""
    command = None
    base = redact("uri", tracking_uri).rstrip("/")
    if not tracking_uri.startswith(("http://", "https://")):
        base = "http://127.0.0.1:5000"
        if study_path is not None:
            command = ui_command(study_path)
        else:
            command = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false " + shlex.join(
                mlflow_ui_args(redact("uri", tracking_uri)))
    page = f"#/experiments/{experiment_id or '0'}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning", command


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with one clear message, when the tracking server cannot be reached."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise ConnectionError(f"HTTP {resp.status}")
        except (OSError, urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(
                f"mlflow.tracking_uri {redact('uri', uri)}: tracking server not reachable ({reason})"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ConnectionError(f"mlflow.tracking_uri {uri}: folder {folder} does not exist")
    elif "://" in uri and not uri.startswith(("file://", "databricks", "postgresql", "mysql", "mssql")):
        raise ConnectionError(f"mlflow.tracking_uri {redact('uri', uri)}: unsupported scheme")


_TRANSIENT_WORDS = ("connection", "max retries", "timed out", "timeout", "unavailable", "refused",
                    "database is locked", "temporarily", "bad gateway", "503", "502", "504")


def _transient(exc: BaseException) -> bool:
    """An outage (retry later) rather than a refusal (drop the record)?"""
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    code = getattr(exc, "error_code", "")
    if code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"):
        return True
    text = str(exc).lower()
    return any(w in text for w in _TRANSIENT_WORDS) or exc.__class__.__module__.startswith(
        ("requests", "urllib3", "sqlalchemy"))


@dataclass
class _Op:
    trial: str | None  # None: the study's parent run
    kind: str
    payload: dict[str, Any]
    points: int = 0  # metric points carried, for the loss report


@dataclass
class TrialRecord:
    trial_id: str
    name: str
    history: list[dict[str, float]] = field(default_factory=list)  # every result seen, for plots
    last_step: int = -1  # highest metric step already queued


class StudyTracker:
    """Queue MLflow writes for a study and deliver them in order.

    Args:
        tracking_uri: resolved MLflow tracking URI.
        experiment: MLflow experiment name.
        study: the study's unique key (tag ``mann.study`` on every run).
        staging: a local folder for artifacts waiting to be logged (under the study's results).
        study_path: the study's folder, named by the `mann-search ui` command the parent run's note prints.
    """

    def __init__(self, tracking_uri: str, experiment: str, study: str, staging: Path,
                 artifact_root: str | None = None, study_path: str | Path | None = None):
        self.tracking_uri = tracking_uri
        self.study_path = study_path  # for the `mann-search ui` command in the parent run's note
        self.experiment_name = experiment
        self.study = study
        self.staging = Path(staging)
        self.artifact_root = artifact_root
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[str | None, str] = {}  # trial id (None = parent) -> run id
        self._logged_steps: dict[str, int] = {}  # run id -> highest step logged before (resume)
        self.trials: dict[str, TrialRecord] = {}
        self.outbox: list[_Op] = []
        self.delivered_points = 0
        self.last_error: str | None = None
        self.rejected: list[str] = []
        self.retry_after_s = 10.0
        self._retry_at = 0.0

    # --- connection ----------------------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        """The study's MLflow experiment (created on first use)."""
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=self.artifact_root, tags={KIND_TAG: KIND}
                )
            else:
                self._experiment_id = exp.experiment_id
                if exp.tags.get(KIND_TAG) != KIND:
                    self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return self._experiment_id

    def _find_run(self, trial: str | None) -> str | None:
        filt = f"tags.`{STUDY_TAG}` = '{self.study}'"
        filt += f" and tags.`{TRIAL_TAG}` = '{trial}'" if trial else f" and tags.`{ROLE_TAG}` = 'study'"
        runs = self.client.search_runs([self.experiment_id()], filter_string=filt, max_results=2)
        return runs[0].info.run_id if runs else None

    def run_id(self, trial: str | None) -> str:
        """The run of a trial (or of the study), found by tags or created; created children nest under it."""
        if trial in self._runs:
            return self._runs[trial]
        found = self._find_run(trial)
        if found is None:
            tags = {STUDY_TAG: self.study, ROLE_TAG: "trial" if trial else "study"}
            if trial:
                tags.update({TRIAL_TAG: trial, "mlflow.parentRunId": self.run_id(None),
                             "mlflow.runName": self.trials[trial].name if trial in self.trials else trial})
            else:
                tags["mlflow.runName"] = self.study
            found = self.client.create_run(self.experiment_id(), tags=tags).info.run_id
        else:
            self._logged_steps[found] = self._max_logged_step(found)
        self._runs[trial] = found
        return found

    def open_trial_runs(self) -> dict[str, str]:
        """Trial id -> run id of the study's trial runs that MLflow has as RUNNING (read now, not queued)."""
        filt = (f"tags.`{STUDY_TAG}` = '{self.study}' and tags.`{ROLE_TAG}` = 'trial' "
                f"and attributes.status = 'RUNNING'")
        runs = self.client.search_runs([self.experiment_id()], filter_string=filt, max_results=10000)
        return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if r.data.tags.get(TRIAL_TAG)}

    def known_run_id(self, trial: str | None) -> str | None:
        """The run id of a trial (None: the study's parent run) if it was found or created, else None."""
        return self._runs.get(trial)

    def history(self, trial: str) -> list[dict[str, float]]:
        """Every result of a trial seen by this driver (for plots)."""
        rec = self.trials.get(trial)
        return list(rec.history) if rec else []

    def _max_logged_step(self, run_id: str) -> int:
        hist = self.client.get_metric_history(run_id, "episodes")
        return max((m.step for m in hist), default=-1)

    # --- queueing ------------------------------------------------------------------------------------------

    def _queue(self, trial: str | None, kind: str, points: int = 0, **payload: Any) -> None:
        self.outbox.append(_Op(trial, kind, payload, points))

    def start_study(self, params: dict[str, Any], tags: dict[str, str], files: dict[str, str]) -> None:
        self._queue(None, "params", params={k: redact(k, v) for k, v in params.items()})
        self._queue(None, "tags", tags={k: str(redact(k, v)) for k, v in tags.items()})
        folder = self._stage(None, "study", files)
        self._queue(None, "artifacts", path=str(folder), artifact_path="study")
        self._queue(None, "note")

    def study_progress(self, by_trials: dict[str, float], trials_finished: int, by_episodes: dict[str, float],
                       episodes: int) -> None:
        """The search's progress on the parent run: some metrics against trials finished, some against the
        training episodes spent (two step axes), so its charts show the search history."""
        ts = int(time.time() * 1000)
        for values, step in ((by_trials, trials_finished), (by_episodes, episodes)):
            clean = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
            if clean:
                self._queue(None, "metrics", points=len(clean), metrics=clean, step=step, timestamp=ts)

    def trial_started(self, trial: str, name: str, params: dict[str, Any]) -> None:
        self.trials.setdefault(trial, TrialRecord(trial, name))
        self._queue(trial, "params", params={k: redact(k, v) for k, v in params.items()})
        self._queue(trial, "status", status="RUNNING")

    def trial_result(self, trial: str, metrics: dict[str, float], step: int) -> None:
        rec = self.trials.setdefault(trial, TrialRecord(trial, trial))
        if step <= rec.last_step:
            return  # a retried trial re-reporting what it already reported
        rec.last_step = step
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        rec.history.append({"step": step, **clean})
        self._queue(trial, "metrics", points=len(clean), metrics=clean, step=step, timestamp=int(time.time() * 1000))

    def trial_tags(self, trial: str, tags: dict[str, str]) -> None:
        """Tags on a trial's run while it lives (e.g. ``mann.paused``)."""
        self._queue(trial, "tags", tags=dict(tags))

    def trial_finished(self, trial: str, outcome: str, reason: str | None, checkpoint: Path | None,
                       files: dict[str, str] | None = None, figures: dict[str, Callable[[Path], None]] | None = None,
                       status: str = "FINISHED") -> None:
        """Final tags, tables, plots and model of a trial; ``status`` is MLflow's (FINISHED/FAILED/KILLED)."""
        tags = {OUTCOME_TAG: outcome}
        if reason:
            tags[REASON_TAG] = reason[:5000]
        self._queue(trial, "tags", tags=tags)
        folder = self._stage(trial, "results", files or {})
        for name, draw in (figures or {}).items():
            try:
                draw(folder / name)
            except Exception as exc:  # a plot must never cost the trial's record
                log.warning("plot %s for trial %s failed: %s", name, trial, exc)
        self._queue(trial, "artifacts", path=str(folder), artifact_path="results")
        if checkpoint is not None and Path(checkpoint).is_file():
            staged = self._stage(trial, "checkpoint", {})
            shutil.copy2(checkpoint, staged / "checkpoint.pt")
            self._queue(trial, "artifacts", path=str(staged), artifact_path="checkpoint")
            self._queue(trial, "model", checkpoint=str(staged / "checkpoint.pt"))
        self._queue(trial, "status", status=status)

    def study_finished(self, files: dict[str, str], figures: dict[str, Callable[[Path], None]],
                       tags: dict[str, str], status: str = "FINISHED") -> None:
        folder = self._stage(None, "summary", files)
        for name, draw in figures.items():
            try:
                draw(folder / name)
            except Exception as exc:
                log.warning("study plot %s failed: %s", name, exc)
        self._queue(None, "tags", tags=tags)
        self._queue(None, "artifacts", path=str(folder), artifact_path="summary")
        self._queue(None, "status", status=status)

    def _stage(self, trial: str | None, what: str, files: dict[str, str]) -> Path:
        folder = self.staging / (trial or "study") / what
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
        return folder

    # --- delivery ------------------------------------------------------------------------------------------

    def flush(self, force: bool = False) -> bool:
        """Deliver queued operations in order; stop at the first outage and keep the rest. True if empty.

        After an outage, delivery is tried again only after ``retry_after_s`` (unless ``force``), so a dead
        server does not slow the driver down at every event.
        """
        if not force and self.outbox and time.monotonic() < self._retry_at:
            return False
        while self.outbox:
            op = self.outbox[0]
            try:
                self._deliver(op)
            except Exception as exc:
                msg = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                if not _transient(exc):
                    # A record MLflow refuses for good (not an outage): say so, drop it, deliver the rest.
                    log.error("MLflow refused %s for %s, dropped: %s", op.kind, op.trial or "the study", msg)
                    self.rejected.append(f"{op.kind} for {op.trial or 'study'}: {msg}")
                    self.outbox.pop(0)
                    continue
                if msg != self.last_error:
                    log.warning("MLflow unavailable, %d operations queued: %s", len(self.outbox), msg)
                self.last_error = msg
                self._client = None  # reconnect next time
                self._retry_at = time.monotonic() + self.retry_after_s
                return False
            self.outbox.pop(0)
            self.delivered_points += op.points
        self.last_error = None
        return True

    def _deliver(self, op: _Op) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run = self.run_id(op.trial)
        p = op.payload
        if op.kind == "params":
            items = [Param(k, str(v)[:6000]) for k, v in p["params"].items()]
            existing = self.client.get_run(run).data.params
            items = [i for i in items if i.key not in existing]  # params are write-once (resume)
            for i in range(0, len(items), 100):
                self.client.log_batch(run, params=items[i : i + 100])
        elif op.kind == "tags":
            self.client.log_batch(run, tags=[RunTag(k, v) for k, v in p["tags"].items()])
        elif op.kind == "metrics":
            if p["step"] <= self._logged_steps.get(run, -1):
                return  # logged before a driver restart
            ms = [Metric(k, v, p["timestamp"], p["step"]) for k, v in p["metrics"].items()]
            self.client.log_batch(run, metrics=ms)
        elif op.kind == "artifacts":
            self.client.log_artifacts(run, p["path"], p["artifact_path"])
        elif op.kind == "note":
            link, command = ui_link(self.tracking_uri, self.experiment_id(), run, self.study_path)
            text = (f"mann-search study `{self.study}`: one nested run per trial; the charts of this run show "
                    f"the search's progress.\n\n[This run in the Model-training view]({link})")
            if command:
                text += f"\n\nServe the UI with: `{command}`"
            self.client.set_tag(run, NOTE_TAG, text)
        elif op.kind == "model":
            self._log_model(run, Path(p["checkpoint"]))
        elif op.kind == "status":
            if p["status"] == "RUNNING":
                self.client.update_run(run, status="RUNNING")
            else:
                self.client.set_terminated(run, status=p["status"])
        else:
            raise ValueError(f"unknown tracking operation {op.kind}")

    def _log_model(self, run: str, checkpoint: Path) -> None:
        import mlflow

        from .model_format import log_model

        mlflow.set_tracking_uri(self.tracking_uri)
        # log_model attaches to an active run; it leaves the run RUNNING until our own status op.
        with mlflow.start_run(run_id=run, nested=True, log_system_metrics=False):
            # a pyfunc whose loader is search.model_format: loading reads tensors only, never unpickles
            info = log_model(checkpoint)
        self.client.set_tag(run, "mann.model_uri", info.model_uri)
        self.client.update_run(run, status="RUNNING")

    # --- what could not be delivered -----------------------------------------------------------------------

    def pending_points(self) -> int:
        return sum(op.points for op in self.outbox)

    def write_replay(self, path: Path) -> Path:
        """Save undelivered operations as JSON lines for ``mann-search replay``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps({"tracking_uri": self.tracking_uri, "experiment": self.experiment_name,
                                "study": self.study}) + "\n")
            for op in self.outbox:
                f.write(json.dumps({"trial": op.trial, "kind": op.kind, "payload": op.payload,
                                    "points": op.points,
                                    "name": self.trials[op.trial].name if op.trial in self.trials else None}) + "\n")
        return path

    @classmethod
    def from_replay(cls, path: Path, tracking_uri: str | None = None) -> "StudyTracker":
        from mann.config import ConfigError

        lines = [x for x in Path(path).read_text().splitlines() if x.strip()]
        if not lines:
            raise ConfigError(f"{path}: an empty MLflow replay file (nothing to replay)")
        line_no = 1
        try:
            head = json.loads(lines[0])
            tracker = cls(tracking_uri or head["tracking_uri"], head["experiment"], head["study"], Path(path).parent)
            for line_no, line in enumerate(lines[1:], 2):
                rec = json.loads(line)
                if rec["trial"] and rec.get("name"):
                    tracker.trials.setdefault(rec["trial"], TrialRecord(rec["trial"], rec["name"]))
                tracker.outbox.append(_Op(rec["trial"], rec["kind"], rec["payload"], rec["points"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else exc.__class__.__name__
            raise ConfigError(f"{path}:{line_no}: not an MLflow replay record ({what}); the file is damaged") from None
        return tracker
