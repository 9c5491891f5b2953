"""A throwaway PostgreSQL cluster on 127.0.0.1 for the tests that run the cluster's stores for real.

``initdb`` into a temp dir, ``pg_ctl start`` on a free port (TCP on 127.0.0.1 with password authentication, plus a
Unix socket in the temp dir for the superuser's admin connection), a role with a password and the databases
``mlflow`` and ``optuna`` it owns, as in k8s/. PostgreSQL refuses to run as root: as root, its commands run as the
``postgres`` user (``su postgres``) in a dir under /tmp that user owns. The binaries are found on PATH or in
/usr/lib/postgresql/*/bin; where there are none, Debian's ``postgresql`` package is installed (``.ci/run`` does that
before the suite runs offline). In CI (CI=true) a missing PostgreSQL fails the tests instead of skipping them.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import free_port, wait_port

ROLE = "mann"
DATABASES = ("mlflow", "optuna")


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    return Path(dirs[-1]) if dirs and Path(dirs[-1], "initdb").exists() else None


def postgres_bin_dir() -> Path:
    """The server binaries (installed with apt-get when missing and we may); fails in CI, skips elsewhere."""
    found = _bin_dir()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = _bin_dir()
    problem = None
    if found is None:
        problem = "PostgreSQL server binaries (initdb, pg_ctl) not found; install them: apt-get install postgresql"
    elif os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        problem = "running as root but there is no `postgres` user to run PostgreSQL as"
    else:
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            problem = "psycopg2 missing: pip install -e '.[postgres]' (the dev extra includes it)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return found


class Postgres:
    """One PostgreSQL cluster: :meth:`start`, :meth:`stop` (a fast shutdown, like a pod going away) and start again
    on the same port and data; :meth:`destroy` stops it and removes its files."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        # under /tmp itself, not pytest's tmp_path (a root-only dir the postgres user cannot enter)
        self.dir = Path(tempfile.mkdtemp(prefix="mann-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.role = ROLE
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    # --- what the services are given ---------------------------------------------------------------------------

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of a database, credentials not in it (they come from :attr:`env`, as in k8s/)."""
        return f"postgresql+psycopg2://127.0.0.1:{self.port}/{database}"

    @property
    def env(self) -> dict[str, str]:
        return {"PGUSER": self.role, "PGPASSWORD": self.password}

    # --- the server ----------------------------------------------------------------------------------------------

    def _pg(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if proc.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}\n{log}")
        return proc

    def init(self) -> "Postgres":
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--no-sync",
                 "--auth-local=trust", "--auth-host=scram-sha-256")
        return self

    def start(self) -> "Postgres":
        # fsync off: a throwaway cluster; stops are clean shutdowns, so no data depends on it
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c max_connections=200"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        wait_port(self.port, timeout=30)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except Exception:
                os.kill(self.pid(), 9)
                time.sleep(1)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- the superuser's side (over the Unix socket, no password) -----------------------------------------------

    def sql(self, query: str, params: tuple = (), database: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser (autocommit); its rows, if any."""
        import psycopg2

        conn = psycopg2.connect(host=str(self.dir), port=self.port, user="postgres", dbname=database)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_role_and_databases(self) -> None:
        self.sql(f"CREATE ROLE {self.role} LOGIN PASSWORD %s", (self.password,))
        for db in DATABASES:
            self.sql(f"CREATE DATABASE {db} OWNER {self.role}")

    def role_connections(self) -> list[tuple[int, str, int]]:
        """(server pid, database, client's TCP port) of every connection of the role."""
        return self.sql("SELECT pid, datname, client_port FROM pg_stat_activity WHERE usename = %s", (self.role,))

    def terminate_role_connections(self) -> list[tuple[int, str, int]]:
        """``pg_terminate_backend`` on every connection of the role (what a failover or an admin does); returns
        those it cut, as :meth:`role_connections` lists them."""
        # listed first, then cut one by one: a filter holding pg_terminate_backend may run on any row first
        cut = self.role_connections()
        for pid, _, _ in cut:
            self.sql("SELECT pg_terminate_backend(%s)", (pid,))
        return cut


def port_owners() -> dict[int, int]:
    """Local TCP port -> pid of the process that owns the socket (``ss``), for telling whose connection is whose."""
    out = subprocess.run(["ss", "-Htnp"], capture_output=True, text=True, check=True).stdout
    owners = {}
    for line in out.splitlines():
        fields, pid = line.split(), re.search(r"pid=(\d+)", line)
        if pid and len(fields) >= 4:
            owners[int(fields[3].rsplit(":", 1)[1])] = int(pid.group(1))
    return owners


@pytest.fixture(scope="session")
def postgres():
    """A started cluster with the role and the databases ``mlflow`` and ``optuna``; stopped and removed after."""
    server = Postgres(postgres_bin_dir())
    try:
        server.init().start().create_role_and_databases()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def pg_env(postgres):
    """PGUSER/PGPASSWORD in this process's environment (so in the MLflow server's and the drivers', which
    inherit it), as the k8s manifests pass them; the URLs never hold the password."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in postgres.env.items():
            mp.setenv(key, value)
        yield postgres


@pytest.fixture(scope="module")
def pg_mlflow(pg_env, tmp_path_factory):
    """`mlflow server --backend-store-uri postgresql+psycopg2://127.0.0.1:PORT/mlflow` (it runs MLflow's own
    migrations on the empty database), artifacts on local disk."""
    from .conftest import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-pg"), backend=pg_env.url("mlflow")).start()
    yield server
    server.stop()
