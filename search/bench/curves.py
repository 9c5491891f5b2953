"""A table of real learning curves: many configurations of a search space, each trained to the full budget with
frequent evaluation, for measuring search methods without training (``mann-search benchmark``).

``mann-search curves record SEARCH.yaml --configs N --seeds S --out FILE`` draws N distinct configurations at
random from the search space (Optuna's RandomSampler through the same define-by-run sampling a study uses, so
conditions and constraints hold) and trains each with S training seeds (``seed`` 0..S-1) by ``mann.train.train``,
with ``--set`` overrides (e.g. ``overrides.train.eval_every=1500``). It can stop and go on: a rerun with the same
arguments skips what the file already holds (in legs), and ``--workers`` runs several trainings at once (one
thread each).

Format (JSON Lines, documented in README "Search benchmark"): the first line is the header
``{"format": "mann-curves/1", "name", "search": <resolved search config>, "base": <base MANN tree>,
"objective": {"metric", "mode"}, "max_episodes", "eval_every", "split", "instances", "created"}``; every other
line is one curve ``{"config_id", "seed", "point": {dotted path: value}, "episodes": [...],
"acc_by_instance": [[acc_1..acc_K] per evaluation], "objective": [...], "val_loss": [...], "train_loss": [...],
"train_s": [cumulative training seconds], "wall_s", "diverged", "command", "commit", "machine", "recorded"}``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import optuna

from mann import metrics
from mann.config import ConfigError

from search import LoadedSearch, git_commit, load_search_config, suggest

FORMAT = "mann-curves/1"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def draw_points(search: LoadedSearch, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` distinct configurations drawn at random from the space (the same sequence for the same seed)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points, seen = [], set()
    for _ in range(count * 50):
        trial = study.ask()
        point = suggest(trial, search)
        study.tell(trial, 0.0)
        key = json.dumps(point, sort_keys=True)
        if key not in seen:
            seen.add(key)
            points.append(point)
        if len(points) == count:
            return points
    raise ConfigError(f"space: only {len(points)} distinct configurations found, {count} asked for")


def header(search: LoadedSearch, name: str) -> dict[str, Any]:
    base = search.base
    return {"format": FORMAT, "name": name, "search": search.config.to_dict(), "base": search.base_tree,
            "objective": search.config.primary.to_dict(), "max_episodes": base.train.episodes,
            "eval_every": base.train.eval_every, "split": "val", "instances": base.task.instances,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def train_curve(search: LoadedSearch, config_id: int, point: dict[str, Any], seed: int, command: str) -> dict:
    """Train one configuration with one seed to the full budget; its curve (runs in a worker process)."""
    from mann.config import replace
    from mann.train import Callback, TrainingDiverged, train

    cfg = search.trial_config(point, threads=1)
    cfg = replace(cfg, seed=seed)
    objective = search.config.primary.metric
    rows: list[dict[str, float]] = []

    class Keep(Callback):
        def on_eval(self, report):
            rows.append(report.metrics())

    t0 = time.perf_counter()
    diverged = False
    try:
        train(cfg, callbacks=[Keep()])
    except TrainingDiverged:
        diverged = True
    return {"config_id": config_id, "seed": seed, "point": point,
            "episodes": [int(r[metrics.EPISODES]) for r in rows],
            "acc_by_instance": [metrics.by_instance(r, "val") for r in rows],
            "objective": [r.get(objective) for r in rows],
            "val_loss": [r.get("val/loss") for r in rows], "train_loss": [r.get("train/loss") for r in rows],
            "read_entropy": [r.get("val/read_entropy") for r in rows],
            "train_s": [round(r.get("time/train_s", 0.0), 2) for r in rows],
            "wall_s": round(time.perf_counter() - t0, 1), "diverged": diverged, "command": command,
            "commit": git_commit(), "machine": machine(), "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _check_header(path: Path, head: Any) -> dict[str, Any]:
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a curves table (its first line must have format {FORMAT!r})")
    return head


def read_header(path: str | Path) -> dict[str, Any]:
    """A table's header line alone (its name, search and recording settings) without reading its curves."""
    path = Path(path)
    try:
        with open(path) as fh:
            first = next((x for x in fh if x.strip()), "")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the curves table ({exc.strerror or exc})") from None
    try:
        head = json.loads(first) if first else None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a curves table (JSON Lines expected: {exc})") from None
    return _check_header(path, head)


def read_table(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and curves of a table; errors name the file and line."""
    path = Path(path)
    try:
        lines = [x for x in path.read_text().splitlines() if x.strip()]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the curves table ({exc.strerror or exc})") from None
    try:
        rows = [json.loads(x) for x in lines]
    except ValueError as exc:
        raise ConfigError(f"{path}: not a curves table (JSON Lines expected: {exc})") from None
    _check_header(path, rows[0] if rows else None)
    for i, row in enumerate(rows[1:], 2):
        _check_curve(f"{path}:{i}", row)
    return rows[0], rows[1:]


# Per-evaluation columns beside ``episodes``: each, where a curve has it, holds one entry per evaluation.
PER_EVALUATION = ("objective", "train_s", "acc_by_instance", "val_loss", "train_loss", "read_entropy")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_curve(where: str, row: Any) -> None:
    """A curve's structure (the module doc's format): errors name the file, line and column."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a curve must be a JSON object, got {type(row).__name__}")
    missing = [k for k in ("config_id", "seed", "point", "episodes", "objective", "train_s") if k not in row]
    if missing:
        raise ConfigError(f"{where}: curve without {', '.join(missing)}")
    if not isinstance(row["point"], dict):
        raise ConfigError(f"{where}: point must be an object of dotted paths to values")
    eps = row["episodes"]
    if not isinstance(eps, list) or not eps or not all(_number(e) and math.isfinite(e) for e in eps):
        raise ConfigError(f"{where}: episodes must be a non-empty list of numbers (one per evaluation)")
    if any(b <= a for a, b in zip(eps, eps[1:])):
        raise ConfigError(f"{where}: episodes must increase from one evaluation to the next")
    for column in PER_EVALUATION:
        col = row.get(column)
        if col is None or (column not in ("objective", "train_s") and col == []):
            continue  # an optional column the curve does not have
        if not isinstance(col, list) or len(col) != len(eps):
            n = len(col) if isinstance(col, list) else type(col).__name__
            raise ConfigError(f"{where}: {column} has {n} entries for {len(eps)} evaluations (episodes)")
    if not all(v is None or _number(v) for v in row["objective"]):
        bad = next(v for v in row["objective"] if not (v is None or _number(v)))
        raise ConfigError(f"{where}: objective values must be numbers (or null where not finite), got {bad!r}")
    if not all(_number(v) and math.isfinite(v) for v in row["train_s"]):
        raise ConfigError(f"{where}: train_s must be finite numbers (cumulative training seconds)")
    if "diverged" in row and not isinstance(row["diverged"], bool):
        raise ConfigError(f"{where}: diverged must be true or false, got {row['diverged']!r}")


def record(config_file: str, overrides: list[str], out: Path, configs: int, seeds: int, workers: int,
           draw_seed: int = 0, limit_s: float | None = None) -> int:
    """Record (or go on recording) a table; returns the number of curves written by this call."""
    search = load_search_config(config_file, overrides)
    search.base.data.resolved_data_dir()
    head = header(search, search.config.name)
    done: set[tuple[int, int]] = set()
    if out.exists() and out.stat().st_size:
        old, curves = read_table(out)
        if old["search"] != head["search"] or old["base"] != head["base"]:
            raise ConfigError(f"{out}: recorded for another search or base config; give a new --out")
        done = {(c["config_id"], c["seed"]) for c in curves}
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(head) + "\n")
    points = draw_points(search, configs, draw_seed)
    todo = [(i, p, s) for i, p in enumerate(points) for s in range(seeds) if (i, s) not in done]
    command = " ".join(["mann-search", "curves", "record", *sys.argv[3:]]) if len(sys.argv) > 2 else "record"
    from mann.omniglot import load_omniglot

    load_omniglot(search.base.data)  # cached once before the workers start
    t0, written, walls = time.monotonic(), 0, []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        running = set()
        while todo or running:
            while todo and len(running) < workers and (limit_s is None or time.monotonic() - t0 < limit_s):
                i, p, s = todo.pop(0)
                running.add(pool.submit(train_curve, search, i, p, s, command))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                curve = f.result()
                with open(out, "a") as fh:
                    fh.write(json.dumps(curve) + "\n")
                written += 1
                best = max((v for v in curve["objective"] if v is not None and math.isfinite(v)), default=float("nan"))
                walls.append(float(curve["wall_s"]))
                left = (len(todo) + len(running)) * statistics.median(walls) / workers
                print(f"curve {curve['config_id']}/{curve['seed']}: {len(curve['episodes'])} evaluations, best "
                      f"{best:.3f}, {curve['wall_s']:.0f} s; {len(todo)} to go (about {left / 60:.0f} min at the "
                      f"median curve's time)", flush=True)
    return written
