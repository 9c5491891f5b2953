"""MANN (LSTM or feed-forward controller + LRUA memory) and the paper's LSTM and feed-forward baselines.

The recurrent state is explicit: a :class:`MANNState` goes into :meth:`MANN.step` and a new one comes out; the
modules hold parameters only. The input projection of all steps is computed once before the time loop (images
and previous labels are known in advance) and the output layer once after it; only what truly depends on the
previous step runs inside the loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import memory as mem
from .fused import LRUAStep, MANNSequence
from .config import ModelConfig, TaskConfig
from .labels import STRING_ALPHABET, STRING_LENGTH, digits_to_label, label_dim, string_digits


class MANNState(NamedTuple):
    """Recurrent state between steps. ``c`` has width 0 for a feed-forward controller; the memory fields have
    ``N = 0`` slots for the memory-less baselines."""

    h: Tensor  # (B, H) controller output h_{t-1}
    c: Tensor  # (B, H) LSTM cell c_{t-1}
    memory: Tensor  # (B, N, W) M_{t-1}
    usage: Tensor  # (B, N) w_u_{t-1}
    read_weights: Tensor  # (B, R, N) w_r_{t-1}
    read_vectors: Tensor  # (B, R, W) r_{t-1}


class MANN(nn.Module):
    """Controller + optional LRUA memory + linear output on ``[h_t, r_t]``.

    ``cfg.kind == "mann"`` uses the memory; ``"lstm"`` / ``"feedforward"`` are the controller alone. The memory step
    is :func:`mann.memory.lrua_step` (``fused_memory: false``, plain autograd) or its hand-written backward
    (``mann.fused``, the default, every reading): the whole episode as one node with the LSTM controller, one node
    per step with the feed-forward one.
    """

    def __init__(self, cfg: ModelConfig, input_size: int, output_size: int):
        super().__init__()
        self.cfg = cfg
        self.use_memory = cfg.kind == "mann"
        self.lstm = cfg.controller.kind == "lstm"
        self.hidden = H = cfg.controller.hidden
        m = cfg.memory
        self.heads = R = m.read_heads if self.use_memory else 0
        self.slots = m.slots if self.use_memory else 0
        self.width = W = m.width if self.use_memory else 0
        gates = 4 * H if self.lstm else H
        # Controller input is [x_t, y_{t-1}, r_{t-1}] (+ h_{t-1} for the LSTM): split into the part known in
        # advance (input_proj, hoisted out of the time loop) and the recurrent part.
        self.input_proj = nn.Linear(input_size, gates)
        recurrent_in = R * W + (H if self.lstm else 0)
        self.recurrent = nn.Linear(recurrent_in, gates, bias=False) if recurrent_in else None
        if self.use_memory:
            self.reading = mem.Reading.of(m)
            # One matmul for every head's key, gate alpha, optional add vector and optional key strength.
            self.head = nn.Linear(H, mem.head_layout(R, W, self.reading.add, self.reading.strength))
            self.fused = cfg.fused_memory
        self.output = nn.Linear(H + R * W, output_size)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self.lstm:
            # Forget-gate bias 1 (a standard LSTM initialisation that helps long episodes).
            with torch.no_grad():
                self.input_proj.bias[self.hidden : 2 * self.hidden].fill_(1.0)

    def initial_state(self, batch: int, device: torch.device | str = "cpu", dtype=torch.float32) -> MANNState:
        """Memory rows start at a small constant (never all-zero, see Eq. 2); read weights uniform, which is what
        Eq. 3 gives on such a memory; usage zero."""
        H, R, N, W = self.hidden, self.heads, self.slots, self.width
        opts = dict(device=device, dtype=dtype)
        init = self.cfg.memory.init_value
        return MANNState(
            h=torch.zeros(batch, H, **opts),
            c=torch.zeros(batch, H if self.lstm else 0, **opts),
            memory=torch.full((batch, N, W), init, **opts),
            usage=torch.zeros(batch, N, **opts),
            read_weights=torch.full((batch, R, N), 1.0 / max(N, 1), **opts),
            read_vectors=torch.full((batch, R, W), init, **opts),
        )

    def step(self, x_proj: Tensor, state: MANNState) -> MANNState:
        """One time step.

        Args:
            x_proj: ``[B, G]`` the projected input ``input_proj([x_t, y_{t-1}])``.
            state: the state after step t-1.

        Returns:
            The state after step t; its ``h`` and ``read_vectors`` feed the output layer.
        """
        B = x_proj.shape[0]
        rec = []
        if self.use_memory:
            rec.append(state.read_vectors.reshape(B, -1))
        if self.lstm:
            rec.append(state.h)
        gates = x_proj
        if self.recurrent is not None:
            gates = gates + self.recurrent(torch.cat(rec, dim=-1) if len(rec) > 1 else rec[0])
        if self.lstm:
            H = self.hidden
            i, f, _, o = torch.sigmoid(gates).chunk(4, dim=-1)  # one sigmoid for three gates
            g = torch.tanh(gates[:, 2 * H : 3 * H])
            c = f * state.c + i * g
            h = o * torch.tanh(c)
        else:
            c = state.c
            h = torch.tanh(gates)
        if not self.use_memory:
            return state._replace(h=h, c=c)
        r = self.reading
        heads = mem.split_heads(self.head(h), self.heads, self.width, r.add, r.strength)
        if self.fused:
            new = LRUAStep.apply(state.memory, state.usage, state.read_weights, *heads, r.gamma, r.zero_least_used,
                                 r.read_after_write)
            return MANNState(h, c, *new)
        reads, access = mem.lrua_step(mem.LRUAState(state.memory, state.usage, state.read_weights), heads, r)
        return MANNState(h, c, *access, reads)

    def forward(self, inputs: Tensor, state: MANNState | None = None, per_step: bool = False) -> Tensor:
        """Run whole episodes.

        Args:
            inputs: ``[B, T, D]`` images joined with the previous step's label.
            state: initial state, default :meth:`initial_state`.
            per_step: run :meth:`step` by step even where the whole-episode node applies (tests compare them).

        Returns:
            ``[B, T, output_size]`` logits.
        """
        B, T, _ = inputs.shape
        if state is None:
            state = self.initial_state(B, inputs.device, inputs.dtype)
        x_proj = self.input_proj(inputs)  # (B, T, G), hoisted out of the loop
        if self.use_memory and self.lstm and self.fused and not per_step:
            # the whole episode as one node with a hand-written backward through time (mann.fused)
            hs, reads = MANNSequence.apply(x_proj, self.recurrent.weight, self.head.weight, self.head.bias, *state,
                                           self.reading)
            return self.output(torch.cat([hs, reads], -1))
        feats = []
        for state in self._steps(x_proj, state):
            if self.use_memory:
                feats.append(torch.cat([state.h, state.read_vectors.reshape(B, -1)], dim=-1))
            else:
                feats.append(state.h)
        return self.output(torch.stack(feats, dim=1))  # (B, T, out)


    @torch.no_grad()
    def read_weights_by_step(self, inputs: Tensor) -> Tensor:
        """The read weights of whole episodes, step by step (an evaluation's memory signal; no gradient).

        Args:
            inputs: ``[B, T, D]`` as :meth:`forward`.

        Returns:
            ``[B, T, R, N]`` w_r_t; ``[B, T, 0, 0]`` for a model without memory.
        """
        B, T, _ = inputs.shape
        if not self.use_memory:
            return inputs.new_zeros(B, T, 0, 0)
        state = self.initial_state(B, inputs.device, inputs.dtype)
        return torch.stack([s.read_weights for s in self._steps(self.input_proj(inputs), state)], dim=1)

    def _steps(self, x_proj: Tensor, state: MANNState):
        """The state after each step of ``[B, T, G]`` projected inputs, step by step from ``state``."""
        # unbind, not x_proj[:, t]: indexing would make backward write a full-size zero gradient per step.
        for x_t in x_proj.unbind(1):
            state = self.step(x_t, state)
            yield state


def build_model(model: ModelConfig, task: TaskConfig, image_size: int) -> MANN:
    dim = label_dim(task)
    return MANN(model, input_size=image_size * image_size + dim, output_size=dim)


def episode_loss(logits: Tensor, labels: Tensor, task: TaskConfig, string_loss: str = "mean") -> Tensor:
    """Mean cross-entropy over steps and episodes; for string labels the per-step loss is the mean (default) or,
    with ``string_loss="sum"`` (the paper's wording), the sum of the five characters' cross-entropies.

    Args:
        logits: ``[B, T, L]``.
        labels: ``[B, T]`` int64 class labels in ``[0, classes)`` (one-hot) or ``[0, 3125)`` (string).
    """
    if task.labels == "string":
        digits = string_digits(labels)  # (B, T, 5)
        loss = F.cross_entropy(logits.reshape(-1, STRING_ALPHABET), digits.reshape(-1))
        return loss * STRING_LENGTH if string_loss == "sum" else loss
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def predict(logits: Tensor, task: TaskConfig) -> Tensor:
    """``[B, T, L]`` logits -> ``[B, T]`` predicted labels (a string is right only if all five are)."""
    if task.labels == "string":
        B, T, _ = logits.shape
        digits = logits.view(B, T, STRING_LENGTH, STRING_ALPHABET).argmax(-1)
        return digits_to_label(digits)
    return logits.argmax(-1)
