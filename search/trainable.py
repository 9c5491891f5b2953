"""The Tune function trainable: a sampled point -> MANN config -> ``mann.train.train`` -> ``tune.report``.

The only Ray calls made inside a trial are here: ``tune.get_checkpoint`` at the start (a retried trial resumes
from its last checkpoint; a trial that trains again the configuration of one lost with a killed driver resumes
from that trial's newest checkpoint, ``RESUME_KEY`` in its config) and ``tune.report`` at every evaluation;
``trainable_class`` makes Tune's trainable of ``run_trial``, restoring from the newest checkpoint still on storage.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mann.metrics import EPISODES
from mann.train import CHECKPOINT_NAME, Callback, EvalReport, TrainingDiverged, train

from .config import LoadedSearch
from .protocol import RESUME_KEY, TrialReport, sampled_point

log = logging.getLogger(__name__)

# Set by MannTrial.restore when it resumed from a checkpoint newer than the one Tune named: the episodes of the
# named one, the driver's last record of the trial; run_trial reports the evaluations after it again (one trial per
# worker process at a time)
_resumed_past: list[float] = []
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)$")
KEEP_CHECKPOINTS = 2  # Tune's CheckpointConfig.num_to_keep for every trial (search/runner.py)


def trainable_class(fn):
    """Tune's function trainable of ``fn`` (``tune.with_parameters(run_trial, ...)`` under ``tune.with_resources``;
    Ray names its worker processes ``ray::MannTrial``), restoring a trial from the newest of its checkpoints still
    on storage when the one Tune asks for is gone.

    Tune keeps ``KEEP_CHECKPOINTS`` checkpoints per trial and deletes older ones as new ones come; its experiment
    snapshot is written after that. A driver killed in between (a lost pod, SIGKILL) leaves a snapshot naming
    deleted checkpoints, and Tune's own restore then fails the trial for good ("Could not recover from checkpoint
    as it does not exist on storage anymore"), however often it is retried. Here the trial resumes from its newest
    surviving checkpoint instead (newer than the one named), or, with none left, starts over, with a warning;
    nothing it has on storage is lost (``surviving_checkpoint``)."""
    from ray.tune.trainable.function_trainable import wrap_function

    class MannTrial(wrap_function(fn)):
        def restore(self, checkpoint_path):
            survivor = restore_point(checkpoint_path)
            if survivor is not None:  # else the trial starts over, as a new one
                super().restore(survivor)

    return MannTrial


def restore_point(result):
    """What ``MannTrial.restore`` restores (``surviving_checkpoint``), noting for ``run_trial`` how far the driver
    has seen the trial when that is not the checkpoint Tune named. (Module level, not in the class: cloudpickle
    sends the class by value, with copies of the globals it names, to the worker.)"""
    survivor = surviving_checkpoint(result)
    _resumed_past.clear()
    if survivor is not result:  # the driver's record of the trial ends at the named checkpoint
        _resumed_past.append(float((getattr(result, "metrics", None) or {}).get(EPISODES, 0)))
    return survivor


def surviving_checkpoint(result):
    """``result`` (Tune's checkpoint-and-metrics record of the checkpoint to restore) if its checkpoint is on
    storage; else the same record pointing at the newest sibling ``checkpoint_*`` directory that holds a
    checkpoint file (newest by the file's modification time: a trial resumed this way writes its next checkpoints
    under the snapshot's numbering, over older ones, so a higher number is not always newer); else None (the
    trial starts over).

    The driver's record of the trial lists the named checkpoint and the one before it, and deletes them as the
    trial writes new ones; Tune fails a trial whose checkpoint it cannot delete because it is missing. Either can
    be gone after a killed driver (pruned after the snapshot), so the missing ones get an empty directory back, for
    Tune to delete."""
    import pyarrow.fs as pafs
    from ray import tune

    ckpt = getattr(result, "checkpoint", None)
    if ckpt is None:
        return result
    fs, path = ckpt.filesystem, ckpt.path.rstrip("/")
    present = fs.get_file_info(path).type != pafs.FileType.NotFound
    parent, name = path.rsplit("/", 1)
    named = _CHECKPOINT_DIR.fullmatch(name)
    if named:
        index, width = int(named.group(1)), len(named.group(1))
        for listed in range(max(0, index - KEEP_CHECKPOINTS + 1), index + 1):
            placeholder = f"{parent}/checkpoint_{listed:0{width}d}"
            if fs.get_file_info(placeholder).type == pafs.FileType.NotFound:
                fs.create_dir(placeholder)
    if present:
        return result
    newest = newest_checkpoint(fs, parent)
    if newest is None:
        log.warning("trial checkpoint %s is gone and no other checkpoint of the trial is on storage: the trial "
                    "starts over", path)
        return None
    log.warning("trial checkpoint %s is gone (pruned after the last experiment snapshot): resuming from %s",
                path, newest)
    return type(result)(checkpoint=tune.Checkpoint(newest, filesystem=fs),
                        metrics=dict(getattr(result, "metrics", {}) or {}))


def newest_checkpoint(fs, trial_dir: str) -> str | None:
    """The newest ``checkpoint_*`` directory under a trial's folder (on pyarrow filesystem ``fs``) that holds a
    checkpoint file, by the file's modification time (see :func:`surviving_checkpoint`); None if there is none."""
    import pyarrow.fs as pafs

    newest, newest_time = None, None
    for entry in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True)):
        if entry.type != pafs.FileType.Directory or not _CHECKPOINT_DIR.fullmatch(entry.base_name):
            continue
        info = fs.get_file_info(f"{entry.path}/{CHECKPOINT_NAME}")
        if info.type != pafs.FileType.File:
            continue
        when = (info.mtime_ns or 0, entry.base_name)
        if newest_time is None or when > newest_time:
            newest, newest_time = entry.path, when
    return newest


def lost_checkpoint(experiment: str, tune_trial_id: str) -> str | None:
    """The newest checkpoint of a Tune trial the resumed study does not know (lost with a killed driver): its
    folder in the experiment folder ``experiment`` (a path or URI) ends with ``_<tune_trial_id>`` (the runner's
    trial folder names). A path, or a URI for a remote experiment folder; None when it left no checkpoint."""
    import pyarrow.fs as pafs

    if "://" in experiment:
        fs, root = pafs.FileSystem.from_uri(experiment)
        scheme = experiment.split("://", 1)[0]
    else:
        fs, root, scheme = pafs.LocalFileSystem(), str(Path(experiment).resolve()), None
    for entry in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if entry.type == pafs.FileType.Directory and entry.base_name.endswith(f"_{tune_trial_id}"):
            found = newest_checkpoint(fs, entry.path)
            if found is not None:
                return f"{scheme}://{found}" if scheme else found
    return None


def _copy_checkpoint(checkpoint, work: Path) -> Path | None:
    """Copy a Tune checkpoint's checkpoint file into ``work``; its path there, or None when it holds none."""
    with checkpoint.as_directory() as d:
        if not (Path(d) / CHECKPOINT_NAME).exists():
            return None
        shutil.copy2(Path(d) / CHECKPOINT_NAME, work / CHECKPOINT_NAME)
    return work / CHECKPOINT_NAME


def _lost_trial_checkpoint(uri: str, work: Path) -> Path | None:
    """Copy the checkpoint file of the lost trial this trial trains again (``RESUME_KEY``) into ``work``; None,
    with a warning, when it cannot be read (the trial then starts over)."""
    from ray import tune

    from mann.train import load_checkpoint

    try:
        copied = _copy_checkpoint(tune.Checkpoint(uri), work)
        if copied is None:
            raise FileNotFoundError(f"no {CHECKPOINT_NAME} in it")
        load_checkpoint(copied)
    except Exception as exc:
        log.warning("the lost trial's checkpoint %s cannot be read (%s): this trial starts over", uri, exc)
        (work / CHECKPOINT_NAME).unlink(missing_ok=True)
        return None
    return copied


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


def _report_again(checkpoint: Path, seen_up_to: float, reporter: _TuneReport) -> None:
    """Report the evaluations a checkpoint's history holds after ``seen_up_to`` episodes, the last one with the
    checkpoint: after a resume from a checkpoint newer than the one Tune named, the driver never received them
    (or received them before it was killed: MLflow logs a metric point once either way); a trial that resumes a
    lost trial's checkpoint reports them all (from 0), as its own."""
    from ray import tune

    from mann.train import load_checkpoint

    history = [h for h in load_checkpoint(checkpoint).get("history", []) if float(h[EPISODES]) > seen_up_to]
    for i, entry in enumerate(history):
        reporter.last = {**{k: v for k, v in entry.items() if k != "step"}, **reporter.extra}
        result = TrialReport(int(entry[EPISODES]), reporter.last).to_result()
        if i == len(history) - 1:
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(reporter.out_dir)))
        else:
            tune.report(result)


def run_trial(config: dict[str, Any], search: LoadedSearch, threads: int) -> None:
    """Tune entry point. ``config`` holds the sampled dotted settings; ``search`` is the study's snapshot."""
    from ray import tune

    if not os.environ.get("MANN_SEARCH_VERBOSE"):
        # Ray Train logs every persisted checkpoint at INFO, one line per evaluation on the driver's console
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = search.trial_config(sampled_point(config), threads)
    work = Path(tempfile.mkdtemp(prefix="mann-trial-"))
    try:
        ckpt = tune.get_checkpoint()
        resume = _copy_checkpoint(ckpt, work) if ckpt is not None else None
        replay_from = _resumed_past.pop() if resume is not None and _resumed_past else None
        if resume is None and config.get(RESUME_KEY):  # trains again a lost trial's configuration: from its end
            resume = _lost_trial_checkpoint(str(config[RESUME_KEY]), work)
            replay_from = 0.0 if resume is not None else None
        from mann.model import build_model

        params = sum(p.numel() for p in build_model(cfg.model, cfg.task, cfg.data.image_size).parameters())
        reporter = _TuneReport(work, {"model/parameters": float(params)})
        if replay_from is not None:
            _report_again(resume, replay_from, reporter)
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
