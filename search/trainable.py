"""The Tune function trainable: a sampled point -> MANN config -> ``mann.train.train`` -> ``tune.report``.

The only Ray calls made inside a trial are here: ``tune.get_checkpoint`` at the start (a retried trial resumes
from its last checkpoint) and ``tune.report`` at every evaluation.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mann.train import CHECKPOINT_NAME, Callback, EvalReport, TrainingDiverged, train

from .config import LoadedSearch
from .protocol import TrialReport, sampled_point


def worst(mode: str) -> float:
    return 0.0 if mode == "max" else 1e9


class _TuneReport(Callback):
    def __init__(self, out_dir: Path, extra: dict[str, float]):
        self.out_dir = out_dir
        self.extra = extra
        self.last: dict[str, float] = {}

    def on_eval(self, report: EvalReport) -> None:
        from ray import tune

        self.last = {**report.metrics(), **self.extra}
        tune.report(TrialReport(report.episodes, self.last).to_result(),
                    checkpoint=tune.Checkpoint.from_directory(str(self.out_dir)))


def run_trial(config: dict[str, Any], search: LoadedSearch, threads: int) -> None:
    """Tune entry point. ``config`` holds the sampled dotted settings; ``search`` is the study's snapshot."""
    from ray import tune

    if not os.environ.get("MANN_SEARCH_VERBOSE"):
        # Ray Train logs every persisted checkpoint at INFO, one line per evaluation on the driver's console
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = search.trial_config(sampled_point(config), threads)
    work = Path(tempfile.mkdtemp(prefix="mann-trial-"))
    try:
        resume = None
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                if (Path(d) / CHECKPOINT_NAME).exists():
                    shutil.copy2(Path(d) / CHECKPOINT_NAME, work / CHECKPOINT_NAME)
                    resume = work / CHECKPOINT_NAME
        from mann.model import build_model

        params = sum(p.numel() for p in build_model(cfg.model, cfg.task, cfg.data.image_size).parameters())
        reporter = _TuneReport(work, {"model/parameters": float(params)})
        try:
            train(cfg, callbacks=[reporter], out_dir=work, resume_from=resume)
        except TrainingDiverged as exc:
            # Retrying would diverge again from the same checkpoint: end the trial, marked as failed, with the
            # last good metrics (or the worst objective) so the searcher learns from it.
            final = dict(reporter.last)
            for objective in search.config.objectives:
                value = final.get(objective.metric)
                if value is None or not math.isfinite(value):
                    final[objective.metric] = worst(objective.mode)
            tune.report(TrialReport(exc.episodes, final, diverged=True, failure=str(exc)).to_result())
    finally:
        shutil.rmtree(work, ignore_errors=True)
