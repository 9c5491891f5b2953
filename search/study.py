"""The Study: one frozen, typed snapshot that owns a search, written to ``study.json`` when it starts.

It holds the resolved search (config, base TrainConfig, constraints: :class:`~search.config.LoadedSearch`), the
study's identity (key, Tune folder, MLflow URI and experiment) and the metric schema. ``resume``, ``status``,
``select`` and the final summary read the snapshot, never the YAML again; an edited YAML is noted in one line.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from mann import metrics
from mann.config import Section

from .config import LoadedSearch, Objective

STUDY_FILE = "study.json"
FORMAT = 2


class SearchError(RuntimeError):
    """A search cannot start or continue; the message says why and names the culprit."""


class Study(Section):
    key: str  # unique, tags every MLflow run of the study
    name: str
    path: str  # the Tune experiment folder (storage/name-time)
    tracking_uri: str | None  # None: a study without MLflow (an instrument's, e.g. the replay benchmark)
    created: float
    overrides: list[str]  # the --set overrides the study started with
    search: LoadedSearch
    format: int = FORMAT

    @classmethod
    def create(cls, search: LoadedSearch, overrides: list[str] = (), tracking_uri: str | None = None,
               path: str | None = None) -> "Study":
        """A new study of ``search``: its Tune folder under the config's storage (or ``path``), logged to
        ``tracking_uri`` (None: no MLflow)."""
        cfg = search.config
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cls(key=f"{cfg.name}-{stamp}-{uuid.uuid4().hex[:6]}", name=cfg.name,
                   path=path or f"{cfg.resolved_storage().rstrip('/')}/{cfg.name}-{stamp}",
                   tracking_uri=tracking_uri, created=time.time(), overrides=list(overrides), search=search)

    # --- what it is ----------------------------------------------------------------------------------------

    @property
    def experiment(self) -> str:
        return self.search.config.mlflow.experiment

    @property
    def primary(self) -> Objective:
        return self.search.config.primary

    @property
    def split(self) -> str:
        """The split every trial is evaluated on (the objective's); selection scores on ``test``."""
        return "val"

    @property
    def instances(self) -> int:
        return self.search.base.task.instances

    def metric_schema(self) -> dict[str, Any]:
        """The names a trial reports, built from the split evaluated (mann.metrics)."""
        return {"split": self.split, "objectives": [o.to_dict() for o in self.search.config.objectives],
                "by_instance": [metrics.instance(self.split, k) for k in range(1, self.instances + 1)],
                "episodes": metrics.EPISODES}

    @property
    def local_dir(self) -> Path:
        """Local folder for study.json, MLflow staging and replay files."""
        if "://" in self.path:
            return Path.home() / ".mann-search" / Path(urlparse(self.path).path).name
        return Path(self.path)

    @property
    def artifact_root(self) -> str | None:
        """Artifacts beside an embedded SQLite store (None: the tracking server's default)."""
        if self.tracking_uri and self.tracking_uri.startswith("sqlite:///"):
            return (Path(self.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        return None

    # --- persistence ---------------------------------------------------------------------------------------

    def save(self) -> Path:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        f = self.local_dir / STUDY_FILE
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.model_dump(mode="json"), "metric_schema": self.metric_schema()},
                                  indent=2))
        tmp.replace(f)
        return f

    @classmethod
    def load(cls, path: str | Path, note_changes: bool = True) -> "Study":
        """Read a study's snapshot (its folder or its study.json); say in one line if its YAML changed since."""
        p = Path(path)
        f = p / STUDY_FILE if p.is_dir() else p
        if not f.is_file():
            raise SearchError(f"{path}: no study here (missing {STUDY_FILE}); give the folder `mann-search run` "
                              "printed")
        try:
            data = json.loads(f.read_text())
        except ValueError as exc:
            raise SearchError(f"{f}: damaged study file ({exc})") from None
        if isinstance(data, dict) and "format" not in data and "config_file" in data:
            return cls._from_format_1(data, f)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SearchError(f"{f}: a study file of another mann-search version (format "
                              f"{data.get('format', 1) if isinstance(data, dict) else '?'}, this one reads "
                              f"{FORMAT}); start a new study")
        data.pop("metric_schema", None)
        try:
            study = cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            raise SearchError(f"{f}: damaged study file ({'.'.join(map(str, err['loc']))}: {err['msg']})") from None
        if note_changes:
            change = study.search.changed_on_disk(study.overrides)
            if change:
                print(f"mann-search: note: {change}", file=sys.stderr, flush=True)
        return study

    @classmethod
    def _from_format_1(cls, data: dict[str, Any], f: Path) -> "Study":
        """A study started before snapshots existed kept only its YAML's path: read it once, snapshot it."""
        from .config import load_search_config

        print(f"mann-search: note: {f} predates study snapshots; reading {data['config_file']} once and "
              "snapshotting it", file=sys.stderr, flush=True)
        search = load_search_config(data["config_file"], data.get("overrides", []))
        study = cls(key=data["key"], name=data["name"], path=data["path"], tracking_uri=data["tracking_uri"],
                    created=data["created"], overrides=list(data.get("overrides", [])), search=search)
        study.save()
        return study


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import mlflow
    import optuna
    import ray
    import torch

    return {"torch": torch.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "mlflow": mlflow.__version__, "python": platform.python_version()}
