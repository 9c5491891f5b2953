"""Model selection: re-evaluate the top-k trials on held-out test characters, register the best, and move the
``champion`` alias only when it beats the current champion's test score."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import tempfile
from pathlib import Path
from typing import Any

from mann.train import evaluate_checkpoint

from .protocol import selectable
from .study import SearchError, Study
from .tracking import OUTCOME_TAG, ROLE_TAG, STUDY_TAG, StudyTracker

log = logging.getLogger("mann_search.selection")

CHAMPION = "champion"
SCORE_TAG = "mann.test_acc_2plus"


def select(study: Study, tracker: StudyTracker) -> dict[str, Any]:
    """Returns what was decided: candidates with test scores, the new version, whether it became champion.

    Trials were ranked on their validation characters (``study.split``); the candidates are scored here on the
    test characters, which no trial has seen."""
    import mlflow
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    if not tracker.flush(force=True):
        raise SearchError(f"MLflow unavailable ({tracker.last_error}); run `mann-search select {study.path}` later")
    cfg = study.search.config
    sel, primary = cfg.selection, cfg.primary
    client = tracker.client
    order = "DESC" if primary.mode == "max" else "ASC"
    runs = client.search_runs(
        [tracker.experiment_id()],
        filter_string=f"tags.`{STUDY_TAG}` = '{study.key}' and tags.`{ROLE_TAG}` = 'trial'",
        order_by=[f"metrics.`{primary.metric}` {order}"], max_results=1000,
    )
    runs = [r for r in runs if selectable(r.data.tags.get(OUTCOME_TAG))
            and primary.metric in r.data.metrics and r.data.tags.get("mann.model_uri")]
    if not runs:
        raise SearchError(f"{study.path}: no finished trial with a logged model to select from (none completed, "
                          f"or MLflow holds none of their models)")
    candidates = []
    for run in runs[: sel.top_k]:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run.info.run_id, "checkpoint/checkpoint.pt", tmp)
            result, _, _ = evaluate_checkpoint(Path(local), "test", sel.test_episodes, sel.seed)
        metrics = result.metrics()
        ts = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()],
                         tags=[RunTag("mann.test_episodes", str(sel.test_episodes)),
                               RunTag("mann.test_seed", str(sel.seed))])
        candidates.append({"run_id": run.info.run_id, "trial": run.data.tags.get("mlflow.runName"),
                           "val": run.data.metrics[primary.metric], "test_acc_2plus": result.accuracy_2plus,
                           "test_accuracy_by_instance": result.accuracy_by_instance,
                           "model_uri": run.data.tags["mann.model_uri"]})
    best = max(candidates, key=lambda c: c["test_acc_2plus"])
    name = cfg.mlflow.registered_model
    mlflow.set_tracking_uri(tracker.tracking_uri)
    current = None
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
        current = {"version": champ.version, "score": float(champ.tags.get(SCORE_TAG, "nan"))}
    except MlflowException:
        pass  # no registered model or no champion yet
    # register_model prints "Successfully registered model" / "Created version" to stderr; the study's summary
    # says the same in one line (errors are exceptions, not prints, so nothing is hidden)
    with contextlib.redirect_stderr(io.StringIO()):
        version = mlflow.register_model(best["model_uri"], name, tags={
            SCORE_TAG: str(best["test_acc_2plus"]), "mann.study": study.key, "mann.run_id": best["run_id"],
            "mann.test_episodes": str(sel.test_episodes), "mann.test_seed": str(sel.seed)})
    promoted = current is None or not (current["score"] >= best["test_acc_2plus"])
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    decision = {
        "registered_model": name, "new_version": version.version, "new_score": best["test_acc_2plus"],
        "new_trial": best["trial"],
        "previous_champion": current, "promoted": promoted, "candidates": candidates,
    }
    parent = tracker.run_id(None)
    client.log_batch(parent, tags=[
        RunTag("mann.selection.new_version", str(version.version)),
        RunTag("mann.selection.new_test_acc_2plus", f"{best['test_acc_2plus']:.4f}"),
        RunTag("mann.selection.previous_champion",
               f"v{current['version']} {current['score']:.4f}" if current else "none"),
        RunTag("mann.selection.promoted", str(promoted).lower()),
    ])
    client.log_dict(parent, decision, "summary/selection.json")
    return decision
