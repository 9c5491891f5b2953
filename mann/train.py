"""The one training loop, evaluation by instance number, and checkpoints.

``train(cfg, callbacks)`` is called by the CLI, the tests and the search service's trainable alike; extras come
in as :class:`Callback` objects, never as a copied loop.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from . import metrics as names
from .config import ConfigError, DataConfig, OptimConfig, TaskConfig, TrainConfig, replace, train_config_from_dict
from .episodes import Episode, EpisodeSampler, accuracy_by_instance
from .model import MANN, build_model, episode_loss, predict
from .memory import read_entropy
from .omniglot import Splits, load_omniglot, make_splits

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, episodes: int, loss: float):
        self.step, self.episodes, self.loss = step, episodes, loss
        super().__init__(
            f"training diverged: loss is {loss} at step {step} (episode {episodes}); "
            "lower train.lr or set train.grad_clip"
        )


@dataclass
class EvalResult:
    """Accuracy by instance number on fixed episodes, with 95 % confidence half-widths."""

    split: str
    episodes: int
    loss: float
    accuracy_by_instance: list[float]  # index k-1: accuracy at the k-th instance
    ci95: list[float]
    # A memory signal (mann.memory.read_entropy): how spread the reads are at steps that show a 2nd or later
    # instance, mean over heads, steps and the first SIGNAL_EPISODES episodes; None for a model without memory.
    read_entropy: float | None = None

    @property
    def accuracy(self) -> float:
        return sum(self.accuracy_by_instance) / len(self.accuracy_by_instance)

    @property
    def accuracy_2plus(self) -> float:
        """Mean accuracy over the 2nd..K-th instances (the search's default objective)."""
        rest = self.accuracy_by_instance[1:] or self.accuracy_by_instance
        return sum(rest) / len(rest)

    def metrics(self) -> dict[str, float]:
        """Flat metrics named after the split evaluated (``val/acc_2``, ``test/ci95_2``...)."""
        out = names.evaluation(self.split, self.accuracy_by_instance, self.loss, self.ci95)
        if self.read_entropy is not None:
            out[names.name(self.split, "read_entropy")] = self.read_entropy
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "episodes": self.episodes,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "accuracy_2plus": self.accuracy_2plus,
            "accuracy_by_instance": {str(k + 1): a for k, a in enumerate(self.accuracy_by_instance)},
            "ci95_by_instance": {str(k + 1): c for k, c in enumerate(self.ci95)},
        }


@dataclass
class EvalReport:
    """What a callback receives at every evaluation."""

    step: int
    episodes: int  # training episodes so far
    train_loss: float  # mean training loss since the last evaluation
    val: EvalResult
    checkpoint: Path | None  # the checkpoint written at this evaluation, if any
    timings: dict[str, float]  # cumulative seconds: train (steps), eval, checkpoint, data
    done: bool  # the last evaluation of the run

    def metrics(self) -> dict[str, float]:
        """Flat metric names for loggers."""
        out: dict[str, float] = {names.EPISODES: float(self.episodes), "train/loss": self.train_loss}
        evaluated = self.val.metrics()
        out.update({k: v for k, v in evaluated.items() if "/ci95_" not in k})
        if self.train_s_here > 0:  # this process's rate: a resumed run's time totals include earlier legs
            out["train/episodes_per_s"] = self.episodes_trained_here / self.train_s_here
        if self.lr is not None:
            out["train/lr"] = self.lr
        for name, sec in self.timings.items():
            out[f"time/{name}_s"] = sec
        return out

    episodes_trained_here: int = 0
    train_s_here: float = 0.0  # seconds of training steps in this process (timings["train"] is the run's total)
    lr: float | None = None  # the learning rate of the last step


class Callback:
    """Hooks into :func:`train`; override what you need."""

    def on_start(self, cfg: TrainConfig, model: MANN, start_step: int) -> None:
        pass

    def on_step(self, step: int, episodes: int) -> None:
        pass

    def on_eval(self, report: EvalReport) -> None:
        pass


@dataclass
class TrainResult:
    model: MANN
    history: list[dict[str, Any]]
    final: EvalReport | None
    checkpoint: Path | None
    steps: int
    episodes: int
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


@functools.lru_cache(maxsize=2)
def load_splits(cfg: DataConfig) -> Splits:
    """Omniglot splits for a data config (cached in-process; the preprocessed array is cached on disk)."""
    return make_splits(load_omniglot(cfg), cfg)


def require_validation_split(cfg: TrainConfig) -> None:
    """Training evaluates (and a search optimises) on validation characters only, never on the test ones."""
    if cfg.data.val_characters < 1:
        raise ConfigError(
            f"data.val_characters: must be >= 1 to train, got {cfg.data.val_characters} (evaluation during "
            "training and the search objective use validation characters; the test characters stay for the "
            "final score)"
        )


def make_sampler(splits: Splits, split: str, cfg: TrainConfig) -> EpisodeSampler:
    pool = getattr(splits, split)
    try:
        return EpisodeSampler(pool, cfg.task, max_shift=cfg.data.max_shift if split == "train" else 0)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({split} split)") from None


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=cfg.lr, alpha=cfg.rmsprop_decay, momentum=cfg.momentum)
    # fused: one kernel per step for all parameters (CPU and CUDA), the same update as the per-tensor loop
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)


class Prefetcher:
    """The run's training batches in order, each drawn on a background thread while the step before it runs.

    Sampling costs about 7 % of a CPU step, and more beside a GPU. One thread at a time touches the generator,
    always in order, so the batches are exactly those of calling ``sampler.sample`` in a loop. :meth:`state` is
    the generator's state before the batch not yet taken: what a checkpoint saves so that a resumed run draws
    that batch next. At most ``count`` batches are drawn ahead; ``enabled=False`` samples in the caller's thread.
    """

    def __init__(self, sampler: EpisodeSampler, batch: int, generator: torch.Generator, count: int,
                 enabled: bool = True):
        self.sampler, self.batch, self.generator = sampler, batch, generator
        self._left = count
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mann-sampler") if enabled and count > 0 else None
        self._next = self._submit()

    def _draw(self) -> tuple[torch.Tensor, Episode]:
        state = self.generator.get_state()
        return state, self.sampler.sample(self.batch, self.generator)

    def _submit(self) -> Future | None:
        if self._pool is None or self._left <= 0:
            return None
        self._left -= 1
        return self._pool.submit(self._draw)

    def take(self) -> Episode:
        if self._next is None:
            return self.sampler.sample(self.batch, self.generator)
        _, episode = self._next.result()  # a sampling error is raised here, in the training thread
        self._next = self._submit()
        return episode

    def state(self) -> torch.Tensor:
        return self._next.result()[0] if self._next is not None else self.generator.get_state()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = self._next = None


@torch.no_grad()
def evaluate(
    model: MANN,
    sampler: EpisodeSampler,
    task: TaskConfig,
    episodes: int,
    seed: int,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    split: str = "val",
) -> EvalResult:
    """Accuracy by instance number on ``episodes`` episodes drawn with ``seed`` (the same ones every call)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    per_episode, loss_sum = [], 0.0
    done, spread = 0, None
    while done < episodes:
        n = min(batch_size, episodes - done)
        ep = sampler.sample(n, g).to(device)
        logits = model(ep.inputs)
        if done == 0 and model.use_memory:
            spread = memory_spread(model.read_weights_by_step(ep.inputs[:SIGNAL_EPISODES]),
                                   ep.instance[:SIGNAL_EPISODES])
        loss_sum += float(episode_loss(logits, ep.labels, task)) * n
        per_episode.append(accuracy_by_instance(predict(logits, task), ep.labels, ep.instance, task.instances))
        done += n
    model.train(was_training)
    mean, ci = mean_ci95(torch.cat(per_episode))
    return EvalResult(split, episodes, loss_sum / episodes, mean.tolist(), ci.tolist(), spread)


SIGNAL_EPISODES = 16  # first-batch episodes the memory signal is read on (it runs step by step)


def memory_spread(read_weights: torch.Tensor, instance: torch.Tensor) -> float | None:
    """``[B, T, R, N]`` read weights and ``[B, T]`` instance numbers -> the mean read entropy (0..1) over heads
    and the steps that show a 2nd or later instance (where a read can find the class in memory); None if none."""
    later = instance >= 2
    if not bool(later.any()) or read_weights.shape[-1] == 0:
        return None
    return float(read_entropy(read_weights).mean(-1)[later].mean())


def mean_ci95(acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[episodes, K]`` per-episode accuracy (NaN where an episode has no k-th instance) -> ``([K], [K])`` the
    mean and the 95 % half-width (1.96 standard errors) of each column over the episodes that have that instance
    (all of them with balanced sampling). A column no episode has (random sampling, short episodes) reads 0."""
    acc = acc.double().cpu()
    have = ~acc.isnan()
    n = have.sum(0).double()  # (K,)
    mean = acc.nan_to_num(0.0).sum(0) / n.clamp_min(1.0)
    dev = torch.where(have, acc - mean, torch.zeros_like(acc))
    std = (dev.pow(2).sum(0) / (n - 1).clamp_min(1.0)).sqrt()
    ci = torch.where(n > 1, 1.96 * std / n.clamp_min(1.0).sqrt(), torch.zeros_like(std))
    return mean, ci


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: state dicts and plain data only, loaded with weights_only=True.


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (or ``DIR/checkpoint.pt``) safely; errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path}: not a readable mann checkpoint ({exc.__class__.__name__}: {first[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a mann checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def model_from_checkpoint(payload: dict[str, Any]) -> tuple[MANN, TrainConfig]:
    cfg = train_config_from_dict(payload["config"])
    model = build_model(cfg.model, cfg.task, cfg.data.image_size)
    model.load_state_dict(payload["model"])
    return model, cfg


def evaluate_checkpoint(path: str | Path, split: str = "test", episodes: int = 1000, seed: int = 0,
                        device: str = "cpu", data_dir: str | None = None) -> tuple[EvalResult, dict[str, Any], TrainConfig]:
    """Accuracy by instance of a checkpoint on fixed episodes of ``split``: ``(result, payload, config)``.

    The data comes from ``data_dir``, else the checkpoint's own folder if it exists here, else MANN_DATA_DIR.
    """
    payload = load_checkpoint(path)
    model, cfg = model_from_checkpoint(payload)
    if data_dir or (cfg.data.data_dir and not Path(cfg.data.data_dir).exists()):
        cfg = replace(cfg, data=replace(cfg.data, data_dir=data_dir))  # a path from another machine: ours
    dev = resolve_device(device)
    model.to(dev)
    sampler = make_sampler(load_splits(cfg.data), split, cfg)
    with torch.inference_mode():
        result = evaluate(model, sampler, cfg.task, episodes, seed, dev, split=split)
    return result, payload, cfg


def _check_resumable(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    current = cfg.to_dict()
    # through the schema, so that keys added since the checkpoint was written compare at their defaults
    saved = train_config_from_dict(saved).to_dict()
    for section in ("model", "task"):
        if current[section] != saved[section]:
            path, now, then = _first_difference(current[section], saved[section], section)
            raise ConfigError(f"{path}: {now!r} here, {then!r} in the checkpoint being resumed (a resumed run keeps "
                              f"its model and task)")
    if current["data"]["image_size"] != saved["data"]["image_size"]:
        raise ConfigError(f"data.image_size: {current['data']['image_size']!r} here, {saved['data']['image_size']!r} "
                          f"in the checkpoint being resumed")


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any]:
    """(dotted path, value in ``a``, value in ``b``) of the first leaf where two config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if a[k] != b.get(k):
                return _first_difference(a[k], b.get(k), f"{path}.{k}")
    return path, a, b


# ---------------------------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    callbacks: Iterable[Callback] = (),
    out_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train a model as ``cfg`` says, evaluating every ``train.eval_every`` episodes.

    With ``out_dir``, a checkpoint (``checkpoint.pt``) is written at every evaluation and each evaluation is
    appended to ``metrics.jsonl``. ``resume_from`` (a checkpoint file or directory) continues exactly where that
    run stopped: model, optimizer, episode RNG and step; the ``time/*_s`` totals go on from the checkpoint's.
    """
    callbacks = list(callbacks)
    require_validation_split(cfg)
    opt_cfg = cfg.train
    if opt_cfg.threads:
        torch.set_num_threads(opt_cfg.threads)
    device = resolve_device(opt_cfg.device)
    timings = {"data": 0.0, "train": 0.0, "eval": 0.0, "checkpoint": 0.0}

    t0 = time.perf_counter()
    splits = load_splits(cfg.data)
    train_sampler = make_sampler(splits, "train", cfg)
    val_sampler = make_sampler(splits, "val", cfg)
    timings["data"] += time.perf_counter() - t0

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.task, cfg.data.image_size).to(device)
    optimizer = make_optimizer(model, opt_cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # training episodes only
    step, history = 0, []
    if resume_from is not None:
        saved = load_checkpoint(resume_from)
        _check_resumable(cfg, saved["config"])
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        step = int(saved["step"])
        history = list(saved.get("history", []))
        # the run's time so far: time/*_s stay totals over every leg of a resumed run
        for name, sec in saved.get("timings", {}).items():
            timings[name] = timings.get(name, 0.0) + float(sec)

    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    B = opt_cfg.batch_size
    total_steps = max(1, math.ceil(opt_cfg.episodes / B))
    start_step, train_s_start = step, timings["train"]
    for cb in callbacks:
        cb.on_start(cfg, model, step)

    model.train()
    loss_sum, loss_n = torch.zeros((), device=device), 0
    final: EvalReport | None = None
    batches = Prefetcher(train_sampler, B, gen, total_steps - step, enabled=opt_cfg.prefetch)
    try:
        while step < total_steps:
            t_step = time.perf_counter()
            ep = batches.take().to(device)
            loss = episode_loss(model(ep.inputs), ep.labels, cfg.task, opt_cfg.string_loss)
            if not torch.isfinite(loss):
                raise TrainingDiverged(step + 1, (step + 1) * B, float(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opt_cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
            # the config decides the rate, also on resume (a checkpoint's saved rate is not kept)
            lr = opt_cfg.lr_at(step * B)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            loss_sum += loss.detach()
            loss_n += 1
            step += 1
            timings["train"] += time.perf_counter() - t_step
            for cb in callbacks:
                cb.on_step(step, step * B)

            # Evaluate when the episode count crosses a multiple of eval_every (schedulers' rungs sit on those).
            if (step * B) // opt_cfg.eval_every > ((step - 1) * B) // opt_cfg.eval_every or step == total_steps:
                t_eval = time.perf_counter()
                val = evaluate(model, val_sampler, cfg.task, opt_cfg.eval_episodes, opt_cfg.eval_seed, device,
                               split="val")
                timings["eval"] += time.perf_counter() - t_eval
                report = EvalReport(
                    step=step,
                    episodes=step * B,
                    train_loss=float(loss_sum) / max(loss_n, 1),
                    lr=lr,
                    val=val,
                    checkpoint=None,
                    timings=dict(timings),
                    done=step == total_steps,
                    episodes_trained_here=(step - start_step) * B,
                    train_s_here=timings["train"] - train_s_start,
                )
                loss_sum.zero_()
                loss_n = 0
                history.append({"step": step, **report.metrics()})
                if out is not None:
                    t_ckpt = time.perf_counter()
                    save_checkpoint(
                        ckpt_path,
                        {
                            "format": CHECKPOINT_FORMAT,
                            "config": cfg.to_dict(),
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "generator": batches.state(),
                            "step": step,
                            "episodes": step * B,
                            "history": history,
                            "timings": dict(timings),
                        },
                    )
                    with open(out / METRICS_NAME, "a") as f:
                        f.write(json.dumps({"step": step, **report.metrics(), "val": val.as_dict()}) + "\n")
                    timings["checkpoint"] += time.perf_counter() - t_ckpt
                    report.checkpoint = ckpt_path
                    report.timings = dict(timings)
                final = report
                for cb in callbacks:
                    cb.on_eval(report)
    finally:
        batches.close()
    return TrainResult(model, history, final, ckpt_path if out else None, step, step * B, timings)
