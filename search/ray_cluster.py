"""The Ray connection of the driver: join RAY_ADDRESS, or start a local Ray on 127.0.0.1 with token auth."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from urllib.parse import urlparse

from .study import SearchError

log = logging.getLogger("mann_search")

_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job's driver


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast when RAY_ADDRESS points nowhere (ray.init would otherwise wait for a long time)."""
    if address in ("auto", "local"):
        return
    target = address if "://" in address else f"ray://{address}"
    parsed = urlparse(target)
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise SearchError(f"RAY_ADDRESS {address!r}: expected host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise SearchError(f"RAY_ADDRESS {address}: Ray cluster not reachable ({exc.strerror or exc})") from None


def ray_job_id() -> str | None:
    """The submission id when running as a `ray job submit` entrypoint."""
    try:
        return json.loads(os.environ.get(_JOB_ENV, "{}")).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


def _first_line(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def prefer_loopback() -> None:
    """Before Ray is imported by a command that starts a local Ray (no RAY_ADDRESS, not a submitted job): make
    Ray take 127.0.0.1 as this node's address. Otherwise ``ray.init`` turns ``_node_ip_address="127.0.0.1"``
    into the machine's external address, found by connecting to 8.8.8.8:53 (which prints "Failed to determine
    local IP via external connectivity" where there is no route). The setting is Ray's single-machine mode
    (the default on macOS and Windows); it is inherited by the local node's processes, never by `ray start`
    nodes of a cluster, which it would refuse to join."""
    if "ray" in sys.modules or os.environ.get("RAY_ADDRESS") or os.environ.get(_JOB_ENV):
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def connect_ray(num_cpus: int | None = None, quiet: bool = False) -> str:
    """Join the cluster in RAY_ADDRESS, or start a local one on 127.0.0.1 with token authentication on
    (``quiet``: Ray's own driver logs at WARNING, not INFO)."""
    import ray

    if ray.is_initialized():
        return "existing"
    import search

    if search.RAY_IMPORTED_FIRST:
        raise SearchError("Ray was imported before mann-search with RAY_AUTH_MODE unset: import search first, or "
                          "export RAY_AUTH_MODE=token before starting Python")
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        log.warning("RAY_AUTH_MODE=%s: Ray token authentication is OFF", os.environ["RAY_AUTH_MODE"])
    address = os.environ.get("RAY_ADDRESS")
    level = logging.WARNING if quiet else logging.INFO
    env = {"MANN_DATA_DIR": os.environ["MANN_DATA_DIR"]} if os.environ.get("MANN_DATA_DIR") else {}
    runtime_env = {"env_vars": env} if env else None
    if address:
        check_ray_address(address)
        if os.environ.get(_JOB_ENV):
            runtime_env = None  # a `ray job submit` driver: the job's runtime env already applies
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=level)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, AuthenticationError...
            raise SearchError(f"RAY_ADDRESS {address}: cannot join the cluster ({_first_line(exc)})") from None
        return address
    try:
        # address="local": always a new cluster of our own, never one that `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=runtime_env, logging_level=level)
    except Exception as exc:
        raise SearchError(f"cannot start a local Ray ({_first_line(exc)})") from None
    return "local"
