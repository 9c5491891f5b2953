"""`mann-search ui STUDY_DIR`: serve a study's MLflow (its SQLite store and the artifacts beside it) without
MLflow 3's job runner; the command every summary, note and status prints (``tracking.ui_command``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .study import SearchError, Study
from .tracking import mlflow_ui_args, redact, ui_link

HOST, PORT = "127.0.0.1", 5000
# MLflow 3's job runner (GenAI jobs: huey consumers, about 3 GB resident) is not used by mann-search.
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def serve(study_dir: str, host: str = HOST, port: int = PORT) -> int:
    """Serve the study's MLflow in this process's place (``exec``: its pid is the server's, Ctrl-C stops it);
    for a study that logs to a tracking server, print where its runs are instead."""
    study = Study.load(study_dir)
    uri = study.tracking_uri
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a server that is down: say so soon
        link, _ = ui_link(uri, _experiment_id(uri, study.experiment))
        print(f"study {study.key} logs to the MLflow server {redact('uri', uri)}; nothing to serve here: open {link}")
        return 0
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise SearchError(f"{study_dir}: its MLflow store {uri} does not exist (yet)")
    link, _ = ui_link(f"http://{host}:{port}", _experiment_id(uri, study.experiment))
    print(f"serving the MLflow UI of study {study.key} at http://{host}:{port} (Ctrl-C stops it)\n"
          f"  open: {link}", flush=True)
    args = mlflow_ui_args(uri, host, port)
    os.execve(args[0] if os.path.isabs(args[0]) else _which(args[0]), args, {**os.environ, **NO_JOB_RUNNER})
    return 0  # not reached


def _experiment_id(tracking_uri: str, name: str) -> str | None:
    """The experiment's id, read from the store before serving it (None if it cannot be read)."""
    try:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(tracking_uri).get_experiment_by_name(name)
        return exp.experiment_id if exp else None
    except Exception:  # a link without the id still opens the UI
        return None


def _which(name: str) -> str:
    import shutil

    found = shutil.which(name)
    if not found:
        raise SearchError(f"{name} not found in {Path(sys.executable).parent} nor on PATH")
    return found
