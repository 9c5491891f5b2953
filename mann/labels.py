"""Label encodings: N-way one-hot, or the paper's strings of five characters from a five-letter alphabet."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .config import TaskConfig

STRING_LENGTH = 5
STRING_ALPHABET = 5


def label_dim(task: TaskConfig) -> int:
    """Width of the label part of the input and of the output."""
    return STRING_LENGTH * STRING_ALPHABET if task.labels == "string" else task.classes


def string_digits(labels: Tensor) -> Tensor:
    """``[...]`` labels in ``[0, 5**5)`` -> ``[..., 5]`` base-5 digits, most significant first."""
    powers = STRING_ALPHABET ** torch.arange(STRING_LENGTH - 1, -1, -1, device=labels.device)
    return (labels.unsqueeze(-1) // powers) % STRING_ALPHABET


def digits_to_label(digits: Tensor) -> Tensor:
    powers = STRING_ALPHABET ** torch.arange(STRING_LENGTH - 1, -1, -1, device=digits.device)
    return (digits * powers).sum(-1)


def encode_labels(labels: Tensor, task: TaskConfig) -> Tensor:
    """``[B, T]`` labels -> ``[B, T, label_dim]`` float input encoding (one-hot, or five one-hots)."""
    if task.labels == "string":
        return F.one_hot(string_digits(labels), STRING_ALPHABET).flatten(-2).float()
    return F.one_hot(labels, task.classes).float()
