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
from .fused import DeferredLinear, DeferredWeight, LRUAStep, MANNSequence
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

    ``cfg.kind == "mann"`` uses the memory; ``"lstm"`` / ``"feedforward"`` are the controller alone.
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
            self.add = m.write_content == "add"
            self.strength = m.key_strength == "learned"
            # One matmul for every head's key, gate alpha, optional add vector and optional key strength.
            head_out = R * W + R + (R * W if self.add else 0) + (R if self.strength else 0)
            self.head = nn.Linear(H, head_out)
            # The fused step (mann.fused) covers the paper's read-after-write without key strength.
            self.fused = cfg.fused_memory and m.read_after_write and not self.strength
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

    def step(self, x_proj: Tensor, state: MANNState, tapes: dict | None = None) -> MANNState:
        """One time step.

        Args:
            x_proj: ``[B, G]`` the projected input ``input_proj([x_t, y_{t-1}])``.
            state: the state after step t-1.
            tapes: from :meth:`_deferred_weights`, inside :meth:`forward`: the per-step layers then leave their
                weight gradients to one product after the loop (same values, fewer operations).

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
            z = torch.cat(rec, dim=-1) if len(rec) > 1 else rec[0]
            gates = gates + (self._linear(z, "recurrent", tapes))
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
        memory, usage, read_weights, read_vectors = self._memory_step(h, state, tapes)
        return MANNState(h, c, memory, usage, read_weights, read_vectors)

    def _linear(self, x: Tensor, name: str, tapes: dict | None) -> Tensor:
        layer = getattr(self, name)
        if tapes is None:
            return layer(x)
        weight, tape = tapes[name]
        out = DeferredLinear.apply(x, weight, tape)
        return out if layer.bias is None else out + layer.bias

    def _deferred_weights(self) -> dict | None:
        """Per-step weights wrapped so their gradients are computed once after the time loop."""
        if not torch.is_grad_enabled():
            return None
        tapes = {}
        for name in ("recurrent", "head"):
            layer = getattr(self, name, None)
            if layer is not None:
                tape: list = []
                tapes[name] = (DeferredWeight.apply(layer.weight, tape), tape)
        return tapes

    def _memory_step(self, h: Tensor, state: MANNState, tapes: dict | None = None):
        m = self.cfg.memory
        B, R, W = h.shape[0], self.heads, self.width
        out = self._linear(h, "head", tapes)
        keys = torch.tanh(out[:, : R * W]).view(B, R, W)  # (B, R, W)
        alpha = out[:, R * W : R * W + R]  # (B, R)
        pos = R * W + R
        content = keys
        if self.add:
            content = torch.tanh(out[:, pos : pos + R * W]).view(B, R, W)
            pos += R * W
        strength = F.softplus(out[:, pos : pos + R]) + 1.0 if self.strength else None

        # Eq. 6-7: write weights from the previous reads and the least-used slots of w_u_{t-1}.
        lu_prev = mem.least_used(state.usage, R)  # (B, N)
        if self.fused:
            keep = torch.arange(self.slots, device=h.device) != torch.argmin(state.usage, -1, keepdim=True)
            if not m.zero_least_used:
                keep = torch.ones_like(keep)
            return LRUAStep.apply(keys, content, alpha, state.memory, state.usage, state.read_weights, lu_prev,
                                  keep.to(h.dtype), m.gamma)
        ww = mem.write_weights(alpha, state.read_weights, lu_prev)  # (B, R, N)
        memory = state.memory
        if not m.read_after_write:
            rw = mem.content_read_weights(keys, memory, strength)  # Eq. 3 on M_{t-1}
        if m.zero_least_used:
            memory = mem.zero_rows(memory, torch.argmin(state.usage, dim=-1))
        memory = mem.write(memory, ww, content)  # Eq. 8
        if m.read_after_write:
            rw = mem.content_read_weights(keys, memory, strength)  # Eq. 3 on M_t (paper)
        reads = mem.read(memory, rw)  # Eq. 4, (B, R, W)
        usage = mem.update_usage(state.usage, rw, ww, m.gamma)  # Eq. 5
        return memory, usage, rw, reads

    def forward(self, inputs: Tensor, state: MANNState | None = None) -> Tensor:
        """Run whole episodes.

        Args:
            inputs: ``[B, T, D]`` images joined with the previous step's label.
            state: initial state, default :meth:`initial_state`.

        Returns:
            ``[B, T, output_size]`` logits.
        """
        B, T, _ = inputs.shape
        if state is None:
            state = self.initial_state(B, inputs.device, inputs.dtype)
        x_proj = self.input_proj(inputs)  # (B, T, G), hoisted out of the loop
        if self.use_memory and self.lstm and self.fused:
            # the whole episode as one node with a hand-written backward through time (mann.fused)
            m = self.cfg.memory
            hs, reads = MANNSequence.apply(x_proj, self.recurrent.weight, self.head.weight, self.head.bias,
                                           *(t.detach() for t in state), m.gamma, m.zero_least_used, self.add)
            return self.output(torch.cat([hs, reads], -1))
        feats = []
        tapes = self._deferred_weights()
        # unbind, not x_proj[:, t]: indexing would make backward write a full-size zero gradient per step.
        for x_t in x_proj.unbind(1):
            state = self.step(x_t, state, tapes)
            if self.use_memory:
                feats.append(torch.cat([state.h, state.read_vectors.reshape(B, -1)], dim=-1))
            else:
                feats.append(state.h)
        return self.output(torch.stack(feats, dim=1))  # (B, T, out)


def build_model(model: ModelConfig, task: TaskConfig, image_size: int) -> MANN:
    dim = label_dim(task)
    return MANN(model, input_size=image_size * image_size + dim, output_size=dim)


def episode_loss(logits: Tensor, labels: Tensor, task: TaskConfig) -> Tensor:
    """Mean cross-entropy over steps (and over the five characters of a string label).

    Args:
        logits: ``[B, T, L]``.
        labels: ``[B, T]`` int64 class labels in ``[0, classes)`` (one-hot) or ``[0, 3125)`` (string).
    """
    if task.labels == "string":
        digits = string_digits(labels)  # (B, T, 5)
        return F.cross_entropy(logits.reshape(-1, STRING_ALPHABET), digits.reshape(-1))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def predict(logits: Tensor, task: TaskConfig) -> Tensor:
    """``[B, T, L]`` logits -> ``[B, T]`` predicted labels (a string is right only if all five are)."""
    if task.labels == "string":
        B, T, _ = logits.shape
        digits = logits.view(B, T, STRING_LENGTH, STRING_ALPHABET).argmax(-1)
        return digits_to_label(digits)
    return logits.argmax(-1)
