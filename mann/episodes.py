"""Batched episode sampler: C classes x K instances shuffled (or each step's class at random), fresh labels,
previous-label input.

Everything is vectorised over the batch (no Python loop over episodes) and driven by an explicit
``torch.Generator``, so the same seed gives the same episodes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .config import TaskConfig
from .labels import STRING_ALPHABET, STRING_LENGTH, encode_labels


class Episode(NamedTuple):
    inputs: Tensor  # (B, T, S*S + L) float: image x_t joined with the label y_{t-1} (zeros at t = 0)
    labels: Tensor  # (B, T) int64 target label y_t
    instance: Tensor  # (B, T) int64, 1-based: this step shows the k-th instance of its class

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(*(t.to(device, non_blocking=True) for t in self))


class EpisodeSampler:
    """Samples episodes from an image pool ``[classes, drawers, S, S]`` (uint8, ink = 255)."""

    def __init__(self, pool: Tensor, task: TaskConfig, max_shift: int = 0):
        if pool.ndim != 4:
            raise ValueError(f"pool must be [classes, drawers, S, S], got shape {tuple(pool.shape)}")
        n_classes, drawers = pool.shape[:2]
        if n_classes < task.classes:
            raise ValueError(f"task.classes: {task.classes} classes per episode but the split has {n_classes}")
        if task.sampling == "balanced" and drawers < task.instances:
            raise ValueError(f"task.instances: {task.instances} per class but characters have {drawers} drawers")
        self.pool = pool
        self.task = task
        self.max_shift = max_shift
        self.size = pool.shape[-1]

    def sample(self, batch: int, generator: torch.Generator) -> Episode:
        C = self.task.classes
        n_classes, drawers = self.pool.shape[:2]
        g = generator
        # C distinct classes per episode.
        classes = torch.multinomial(torch.ones(batch, n_classes), C, replacement=False, generator=g)  # (B, C)
        if self.task.sampling == "random":
            slot, draw = self._random_steps(batch, drawers, g)
        else:
            slot, draw = self._balanced_steps(batch, drawers, g)
        char = classes.gather(1, slot)  # (B, T)
        images = self.pool[char, draw].float().div_(255.0)  # (B, T, S, S)
        if self.max_shift:
            images = self.shift(images, g)
        # A fresh assignment of labels to classes in every episode.
        if self.task.labels == "string":
            space = STRING_ALPHABET**STRING_LENGTH
            names = torch.multinomial(torch.ones(batch, space), C, replacement=False, generator=g)
        else:
            names = torch.rand(batch, C, generator=g).argsort(-1)
        labels = names.gather(1, slot)  # (B, T)
        instance = _instance_numbers(slot, C)
        enc = encode_labels(labels, self.task)  # (B, T, L)
        prev = torch.cat([enc.new_zeros(batch, 1, enc.shape[-1]), enc[:, :-1]], dim=1)
        inputs = torch.cat([images.flatten(2), prev], dim=-1)
        return Episode(inputs, labels, instance)

    def _balanced_steps(self, batch: int, drawers: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Every class exactly K times, K distinct drawers each, in a random order: ``(slot, drawer)``, ``[B, T]``."""
        C, K = self.task.classes, self.task.instances
        T = C * K
        drawer = torch.rand(batch, C, drawers, generator=g).argsort(-1)[..., :K]  # (B, C, K)
        # A random order of the C*K (class, instance) pairs.
        order = torch.rand(batch, T, generator=g).argsort(-1)  # (B, T)
        slot, inst = order // K, order % K  # class slot in [0, C), instance index in [0, K)
        draw = drawer.reshape(batch, T).gather(1, slot * K + inst)  # (B, T)
        return slot, draw

    def _random_steps(self, batch: int, drawers: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Each step's class uniform with replacement among the C classes. A class's k-th appearance shows the
        k-th drawer of a random order of its drawers; past the last drawer the order starts again (a repeat of an
        image, which only episodes much longer than classes x 20 reach)."""
        C, T = self.task.classes, self.task.length
        slot = torch.randint(0, C, (batch, T), generator=g)  # (B, T)
        order = torch.rand(batch, C, drawers, generator=g).argsort(-1)  # (B, C, D)
        k = (_instance_numbers(slot, C) - 1) % drawers  # (B, T) 0-based appearance, wrapped
        draw = order.reshape(batch, C * drawers).gather(1, slot * drawers + k)  # (B, T)
        return slot, draw

    def shift(self, images: Tensor, g: torch.Generator) -> Tensor:
        """Translate each image by a random (dy, dx) in [-max_shift, max_shift], filling with background."""
        B, T, S, _ = images.shape
        s = self.max_shift
        padded = torch.nn.functional.pad(images, (s, s, s, s))  # (B, T, S+2s, S+2s)
        dy = torch.randint(0, 2 * s + 1, (B, T, 1, 1), generator=g)
        dx = torch.randint(0, 2 * s + 1, (B, T, 1, 1), generator=g)
        P = S + 2 * s
        ar = torch.arange(S)
        window = (ar.view(S, 1) * P + ar.view(1, S)).flatten()  # (S*S,) the unshifted pixels in the padded image
        start = (dy * P + dx).view(B, T, 1)  # (B, T, 1) each image's top-left corner
        return padded.flatten(2).gather(2, start + window).view(B, T, S, S)


def _instance_numbers(slot: Tensor, classes: int) -> Tensor:
    """``[B, T]`` class slots -> how many times that class has appeared so far, this step included (1-based)."""
    seen = torch.nn.functional.one_hot(slot, classes).cumsum(1)  # (B, T, C)
    return seen.gather(2, slot.unsqueeze(-1)).squeeze(-1)  # (B, T)


def accuracy_by_instance(pred: Tensor, labels: Tensor, instance: Tensor, instances: int) -> Tensor:
    """Per-episode accuracy at each instance number.

    Args:
        pred, labels, instance: ``[B, T]``.
        instances: K, the number of instance numbers scored; steps with a larger instance number are not scored.

    Returns:
        ``[B, K]`` float: column k-1 is the fraction of the episode's k-th instances labelled right, NaN where the
        episode has no k-th instance (possible with ``sampling: random``; never with balanced episodes).
    """
    correct = (pred == labels).float()
    scored = (instance <= instances).float()  # (B, T)
    onehot = torch.nn.functional.one_hot((instance - 1).clamp(max=instances - 1), instances).float()
    onehot = onehot * scored.unsqueeze(-1)  # (B, T, K)
    count = onehot.sum(1)  # (B, K)
    hits = (correct.unsqueeze(-1) * onehot).sum(1)
    return torch.where(count > 0, hits / count.clamp_min(1.0), torch.full_like(hits, float("nan")))
