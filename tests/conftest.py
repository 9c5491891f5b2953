"""Shared fixtures: the real Omniglot (required in CI), tiny generated Omniglot-layout zips."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "omniglot"


def real_data_dir() -> Path | None:
    path = Path(os.environ.get("MANN_DATA_DIR") or DEFAULT_DATA)
    return path if (path / "images_background.zip").exists() or (path / "images_background").exists() else None


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The real Omniglot. Missing data fails in CI (CI=true) and skips, loudly, elsewhere."""
    path = real_data_dir()
    if path is None:
        msg = f"real Omniglot not found (MANN_DATA_DIR or {DEFAULT_DATA})"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(autouse=True)
def _data_env(monkeypatch, tmp_path_factory):
    """Point MANN_DATA_DIR at the real data for every test (tests that need another set override it)."""
    path = real_data_dir()
    if path is not None:
        monkeypatch.setenv("MANN_DATA_DIR", str(path))


def png_bytes(seed: int, size: int = 105) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.ones((size, size), dtype=bool)
    y, x = rng.integers(10, size - 30, size=2)
    h, w = rng.integers(5, 25, size=2)
    img[y : y + h, x : x + 3] = False  # a vertical stroke
    img[y : y + 3, x : x + w] = False  # a horizontal stroke
    buf = io.BytesIO()
    Image.fromarray(img).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def make_tiny_zip(path: Path, source: str, alphabets: int, chars: int, drawers: int = 20, first_id: int = 1,
                  extra: dict[str, bytes] | None = None) -> int:
    """Write a small zip in the standard layout; returns the next free character id."""
    cid = first_id
    with zipfile.ZipFile(path, "w") as z:
        for a in range(alphabets):
            for c in range(chars):
                for d in range(1, drawers + 1):
                    name = f"{source}/Alphabet_{a}/character{c + 1:02d}/{cid:04d}_{d:02d}.png"
                    z.writestr(name, png_bytes(cid * 100 + d))
                cid += 1
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return cid


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A 2-source Omniglot-layout directory: 12 + 8 characters x 20 drawers."""
    nxt = make_tiny_zip(tmp_path / "images_background.zip", "images_background", alphabets=3, chars=4)
    make_tiny_zip(tmp_path / "images_evaluation.zip", "images_evaluation", alphabets=2, chars=4, first_id=nxt)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Real services on 127.0.0.1: an MLflow tracking server, Ray clusters started with `ray start`

import contextlib  # noqa: E402
import signal  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

BIN = Path(sys.executable).parent


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now and not handed out before in this process: several asked for in a row
    (Ray's GCS, dashboard and agent ports) are distinct, which the kernel alone does not promise."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"127.0.0.1:{port} did not open within {timeout} s")


class MlflowServer:
    def __init__(self, root: Path, backend: str | None = None):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.db = root / "mlflow.db"
        self.backend = backend or f"sqlite:///{self.db}"  # or a PostgreSQL URL (tests/pg.py)

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend, "--artifacts-destination", str(self.root / "artifacts"),
             "--serve-artifacts", "--workers", "1"],
            # MLflow 3's job runner (GenAI jobs; six huey consumers polling) is not used by mann-search
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_http(f"{self.uri}/health", timeout=90)
        return self

    def kill(self) -> None:
        """Crash it (SIGKILL to its process group), as an outage would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of a process from ``/proc/<pid>/stat`` (state ``Z``: a zombie); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces or ')'
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None:
            tree.setdefault(stat[1], []).append(int(entry))
    return tree


def _pgrep(pattern: str) -> set[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return {int(p) for p in found}


def stop_and_clean(temp_dirs: list[str], gcs: int) -> set[int]:
    """Stop the nodes, remove their temp dirs; the pids of their processes still running (a leak)."""
    stop_nodes(temp_dirs, gcs)
    leaked = {p for p in cluster_processes(temp_dirs, gcs) if not _zombie(p)}
    for d in temp_dirs:
        shutil.rmtree(d, ignore_errors=True)
    return leaked


def node_processes(temp_dir: str) -> set[int]:
    """Every process of the Ray node(s) started with ``--temp-dir=temp_dir``: those whose command line names it
    (GCS, raylet, agents, monitors) and all their descendants (the workers, which rename themselves ``ray::...``)."""
    tree, todo, pids = _children(), list(_pgrep(f"{temp_dir}([/ ]|$)")), set()
    while todo:
        pid = todo.pop()
        if pid not in pids and pid != os.getpid():
            pids.add(pid)
            todo.extend(tree.get(pid, []))
    return pids


def cluster_processes(temp_dirs: list[str], gcs_port: int | None = None) -> set[int]:
    """The processes of the nodes started with these temp dirs, plus (given the GCS port) the head's Ray Client
    server, whose command line names the GCS address, not the temp dir."""
    pids = set().union(*(node_processes(d) for d in temp_dirs))
    if gcs_port is not None:
        pids |= _pgrep(f"ray.util.client.server --address=127.0.0.1:{gcs_port}( |$)")
    return pids


def stop_nodes(temp_dirs: list[str], gcs_port: int | None = None, grace: float = 3.0) -> None:
    """Stop the Ray nodes this test started, by their processes' ids (SIGTERM, then SIGKILL after ``grace``
    seconds; the GCS and the autoscaler never exit on SIGTERM alone); unlike ``ray stop``, any other Ray on the
    machine is left alone."""
    pids = cluster_processes(temp_dirs, gcs_port)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids):
                return
            time.sleep(0.2)


def _zombie(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is None or stat[0] == "Z"


@contextlib.contextmanager
def two_node_ray(cpus_per_node: int = 1):
    """A head and a worker node started with `ray start` on 127.0.0.1, token authentication on. Yields
    ``(env, gcs_port, dashboard_port, worker_temp_dir)``; stops both nodes by their processes' ids and removes
    their temp dirs."""
    import secrets
    import shutil

    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    gcs, dash = free_port(), free_port()
    ray = str(BIN / "ray")
    # Each node gets a temp dir of its own: two nodes on one machine must not garbage-collect each other's job
    # files, and the dirs name the nodes' processes for stopping them; short, because Ray's unix socket paths
    # must stay under 108 bytes.
    head_tmp, worker_tmp = f"/tmp/ray-h{gcs}", f"/tmp/ray-w{gcs}"

    def sh(*args, timeout=180):
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)

    try:
        head = sh(ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={cpus_per_node}",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
                  f"--temp-dir={head_tmp}")
        assert head.returncode == 0, head.stderr[-2000:]
        worker = sh(ray, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                    f"--num-cpus={cpus_per_node}", f"--temp-dir={worker_tmp}")
        assert worker.returncode == 0, worker.stderr[-2000:]
        wait_port(dash, timeout=90)
        yield env, gcs, dash, worker_tmp
    finally:
        leaked = stop_and_clean([worker_tmp, head_tmp], gcs)
    # reached only when the test body passed (a failure's own error is not hidden by this one)
    assert not leaked, f"Ray processes left running after the nodes were stopped: {sorted(leaked)}"


@pytest.fixture(scope="session")
def ray_jobs_cluster():
    """One 2-node cluster that the `ray job submit` tests share (starting one takes ~20 s). Tests that kill or
    stop nodes start their own with :func:`two_node_ray` instead."""
    with two_node_ray() as cluster:
        yield cluster


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's own exit status once pytest has reported, without the interpreter's
    finalization. Some tests run Ray (and torch) inside this process; after `ray.shutdown()` their native
    threads can still crash while Python tears its modules down (CI once ended a green run, 440 passed, with a
    segmentation fault after the summary, exit 139). Every test's outcome is already decided and printed here;
    the product's commands run in their own processes, where the tests check their exit codes."""
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
