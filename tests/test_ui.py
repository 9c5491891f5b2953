"""Printed commands run as printed: `mann-search ui STUDY_DIR` from a new shell (no venv on PATH, another working
directory) serves the study's MLflow on 127.0.0.1 without MLflow 3's job runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.parse
import urllib.request

import pytest

from .conftest import BIN, REPO, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """The study's own SQLite store: an earlier test's mlflow.set_tracking_uri leaves MLFLOW_TRACKING_URI set in
    this process (MLflow exports it), and resolve_tracking_uri would take the server it names."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _study_with_store(tmp_path):
    """A study snapshot and its embedded SQLite MLflow store holding the study's experiment."""
    from mlflow.tracking import MlflowClient

    from search.config import load_search_config
    from search.runner import tracker_for
    from search.study import Study
    from search.tracking import resolve_tracking_uri

    storage = tmp_path / "my runs"  # a space in the path: the printed command must quote it
    overrides = [f"storage={storage}"]
    study = Study.create(load_search_config(str(REPO / "configs/search/smoke.yaml"), overrides), overrides,
                         resolve_tracking_uri(None, storage))
    study.save()
    tracker = tracker_for(study)
    MlflowClient(study.tracking_uri).get_experiment_by_name(study.experiment)  # creates the tables
    return study, tracker.experiment_id()


def _new_shell_env() -> dict[str, str]:
    """What a user's new shell has: no venv on PATH, none of the test's settings (PYTHONPATH only where the
    checkout under test is not the one the venv was installed from)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": os.environ.get("LANG", "C.UTF-8")}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _descendants(pid: int) -> list[str]:
    """Command lines of a process and all its descendants."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode())
        except OSError:
            pass
        todo.extend(tree.get(p, []))
    return out


def test_printed_ui_command_serves_the_study_from_a_new_shell(tmp_path):
    from search.runner import mlflow_link
    from search.tracking import ui_link

    study, experiment_id = _study_with_store(tmp_path)
    link, command = mlflow_link(study)
    assert command == f"{BIN / 'mann-search'} ui '{study.local_dir.resolve()}'"
    assert link == f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"
    # the parent run's note prints the same command; without a study folder, the venv's mlflow with no job runner
    assert ui_link(study.tracking_uri, experiment_id, "r1", study.local_dir)[1] == command
    fallback = ui_link(study.tracking_uri, experiment_id)[1]
    assert fallback.startswith(f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {BIN / 'mlflow'} ui --host 127.0.0.1 ")

    log = open(tmp_path / "ui.log", "w+")
    proc = subprocess.Popen(["bash", "-c", command], cwd="/", env=_new_shell_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http("http://127.0.0.1:5000/health", timeout=120)
        with urllib.request.urlopen("http://127.0.0.1:5000/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        query = urllib.parse.urlencode({"experiment_name": study.experiment})
        with urllib.request.urlopen(f"http://127.0.0.1:5000/api/2.0/mlflow/experiments/get-by-name?{query}",
                                    timeout=10) as resp:
            assert json.loads(resp.read())["experiment"]["experiment_id"] == experiment_id
        commands = _descendants(proc.pid)
        assert not [c for c in commands if "huey" in c], commands  # MLflow 3's job runner stays off
        log.seek(0)
        printed = log.read()
        assert "serving the MLflow UI of study" in printed and f"open: {link}" in printed, printed
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ui_of_a_study_without_a_store_is_one_line(tmp_path):
    from search.config import load_search_config
    from search.study import Study

    storage = tmp_path / "runs"
    overrides = [f"storage={storage}"]
    storage.mkdir()
    study = Study.create(load_search_config(str(REPO / "configs/search/smoke.yaml"), overrides), overrides,
                         f"sqlite:///{storage / 'mlflow.db'}")
    study.save()
    proc = subprocess.run([str(BIN / "mann-search"), "ui", str(study.local_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
