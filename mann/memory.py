"""LRUA memory math (Santoro et al. 2016, section 3) as pure functions of tensors.

No state and no ``nn.Module`` here: the model wires these functions together and carries the memory in an
explicit state tuple. Shapes: ``B`` batch, ``R`` read heads (= write heads), ``N`` memory slots, ``W`` memory
width. Equation numbers refer to the paper:

- Eq. 2  cosine similarity        K(k_t, M_t(i)) = k_t . M_t(i) / (||k_t|| ||M_t(i)||)
- Eq. 3  read weights             w_r_t(i) = softmax_i K(k_t, M_t(i))
- Eq. 4  read vector              r_t = sum_i w_r_t(i) M_t(i)
- Eq. 5  usage                    w_u_t = gamma w_u_{t-1} + w_r_t + w_w_t
- Eq. 6  least-used weights       w_lu_t(i) = 1 if w_u_t(i) <= m(w_u_t, n) else 0  (m: n-th smallest)
- Eq. 7  write weights            w_w_t = sigmoid(alpha) w_r_{t-1} + (1 - sigmoid(alpha)) w_lu_{t-1}
- Eq. 8  write                    M_t(i) = M_{t-1}(i) + w_w_t(i) k_t

:func:`lrua_step` wires them into one step, every reading of the paper an argument of it; it is the definition
the hand-written backward of ``mann.fused`` and its C++ port (``mann/csrc``) are tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

EPS = 1e-8


def cosine_similarity(keys: Tensor, memory: Tensor, eps: float = EPS) -> Tensor:
    """Eq. 2: cosine similarity of every key with every memory row.

    Args:
        keys: ``[B, R, W]``.
        memory: ``[B, N, W]``.
        eps: added to each norm, so an all-zero row or key gives similarity 0, never 0/0.

    Returns:
        ``[B, R, N]``.
    """
    dots = torch.bmm(keys, memory.transpose(1, 2))  # (B, R, N)
    key_norm = keys.norm(dim=-1, keepdim=True) + eps  # (B, R, 1)
    mem_norm = memory.norm(dim=-1).unsqueeze(1) + eps  # (B, 1, N)
    return dots / (key_norm * mem_norm)


def content_read_weights(keys: Tensor, memory: Tensor, strength: Tensor | None = None) -> Tensor:
    """Eq. 3: softmax over memory rows of the cosine similarity.

    Args:
        keys: ``[B, R, W]``.
        memory: ``[B, N, W]``.
        strength: optional ``[B, R]`` multiplier of the similarities before the softmax (NTM's key strength;
            the paper uses none, which equals a strength of 1).

    Returns:
        ``[B, R, N]``, each row summing to 1.
    """
    sim = cosine_similarity(keys, memory)
    if strength is not None:
        sim = sim * strength.unsqueeze(-1)
    return torch.softmax(sim, dim=-1)


def read(memory: Tensor, read_weights: Tensor) -> Tensor:
    """Eq. 4: read vectors, the weighted sum of memory rows.

    Args:
        memory: ``[B, N, W]``.
        read_weights: ``[B, R, N]``.

    Returns:
        ``[B, R, W]``.
    """
    return torch.bmm(read_weights, memory)


def read_entropy(read_weights: Tensor) -> Tensor:
    """How spread a read is: the entropy of the read weights over the slots, divided by its maximum log N.

    Args:
        read_weights: ``[..., N]``, each row summing to 1.

    Returns:
        ``[...]`` in [0, 1]: 1 reads every slot alike, 0 reads one slot (0 where N = 1).
    """
    n = read_weights.shape[-1]
    if n < 2:
        return read_weights.new_zeros(read_weights.shape[:-1])
    h = -(read_weights * read_weights.clamp_min(1e-12).log()).sum(-1)
    return (h / math.log(n)).clamp(0.0, 1.0)


def update_usage(usage_prev: Tensor, read_weights: Tensor, write_weights: Tensor, gamma: float) -> Tensor:
    """Eq. 5: decayed usage plus this step's reads and writes, summed over heads.

    Args:
        usage_prev: ``[B, N]``, w_u_{t-1}.
        read_weights: ``[B, R, N]``, w_r_t.
        write_weights: ``[B, R, N]``, w_w_t.
        gamma: decay in (0, 1].

    Returns:
        ``[B, N]``, w_u_t.
    """
    return gamma * usage_prev + read_weights.sum(1) + write_weights.sum(1)


def least_used(usage: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Eq. 6: 1 on the ``n`` least-used slots, 0 elsewhere (n = number of reads in the paper), and the least-used
    slot itself (the row zeroed before the write).

    Ties at the n-th smallest usage are broken towards the lower slot index (a stable sort), so exactly ``n``
    slots are marked (the paper's ``<=`` would mark every tied slot); the least-used slot is the first of them.

    Args:
        usage: ``[B, N]``.
        n: number of slots to mark, ``1 <= n <= N``.

    Returns:
        ``([B, N]`` weights, same dtype as ``usage``, no gradient; ``[B]`` int64 slot``)``.
    """
    idx = torch.sort(usage.detach(), dim=-1, stable=True).indices[:, :n]  # (B, n)
    return usage.new_zeros(usage.shape).scatter_(1, idx, 1.0), idx[:, 0]


def write_weights(alpha: Tensor, read_weights_prev: Tensor, least_used_prev: Tensor) -> Tensor:
    """Eq. 7: interpolate between the previously read slots and the least-used slots.

    Args:
        alpha: ``[B, R]`` gate logits, one per head.
        read_weights_prev: ``[B, R, N]``, w_r_{t-1}.
        least_used_prev: ``[B, N]``, w_lu_{t-1} (shared by all heads).

    Returns:
        ``[B, R, N]``, w_w_t.
    """
    gate = torch.sigmoid(alpha).unsqueeze(-1)  # (B, R, 1)
    return gate * read_weights_prev + (1.0 - gate) * least_used_prev.unsqueeze(1)


def zero_rows(memory: Tensor, slots: Tensor) -> Tensor:
    """Set one row per batch element to zero (the least-used slot, before the write).

    Args:
        memory: ``[B, N, W]``.
        slots: ``[B]`` int64 row index per batch element.

    Returns:
        ``[B, N, W]``.
    """
    keep = torch.arange(memory.shape[1], device=memory.device) != slots.unsqueeze(1)  # (B, N)
    return memory * keep.unsqueeze(-1)


def write(memory_prev: Tensor, write_weights: Tensor, content: Tensor) -> Tensor:
    """Eq. 8: add each head's content to memory in proportion to its write weights.

    Args:
        memory_prev: ``[B, N, W]``.
        write_weights: ``[B, R, N]``.
        content: ``[B, R, W]`` (the key k_t in the paper).

    Returns:
        ``[B, N, W]``.
    """
    return torch.baddbmm(memory_prev, write_weights.transpose(1, 2), content)


class Reading(NamedTuple):
    """The readings of the paper that are options (``MemoryConfig``, README "Paper ambiguities")."""

    gamma: float  # usage decay (Eq. 5)
    zero_least_used: bool = True  # zero the least-used row before the write
    read_after_write: bool = True  # read weights from M_t (paper), else from M_{t-1}
    add: bool = False  # write a separate add vector (write_content: add), else the key
    strength: bool = False  # a learned key strength (key_strength: learned)

    @classmethod
    def of(cls, memory_config) -> Reading:
        m = memory_config
        return cls(m.gamma, m.zero_least_used, m.read_after_write, m.write_content == "add",
                   m.key_strength == "learned")


class Heads(NamedTuple):
    """What the controller's head layer gives the memory at step t."""

    keys: Tensor  # (B, R, W) read keys k_t (tanh)
    alpha: Tensor  # (B, R) write gate logits
    content: Tensor  # (B, R, W) what is written: ``keys`` itself (paper) or a tanh add vector
    strength: Tensor | None  # (B, R) key strength >= 1 (softplus + 1), or None (paper: no strength)


def head_layout(heads: int, width: int, add: bool, strength: bool) -> int:
    """Width P of the head layer's output: R*W keys, R gates, then R*W add vectors and R strengths if used."""
    return heads * (width + 1) + (heads * width if add else 0) + (heads if strength else 0)


def split_heads(out: Tensor, heads: int, width: int, add: bool, strength: bool) -> Heads:
    """The head layer's output ``[B, P]`` (see :func:`head_layout`) as :class:`Heads`."""
    B, RW, R = out.shape[0], heads * width, heads
    keys = torch.tanh(out[:, :RW]).view(B, R, width)
    pos = RW + R
    content = keys
    if add:
        content = torch.tanh(out[:, pos : pos + RW]).view(B, R, width)
        pos += RW
    beta = F.softplus(out[:, pos : pos + R]) + 1.0 if strength else None
    return Heads(keys, out[:, RW : RW + R], content, beta)


class LRUAState(NamedTuple):
    """The memory's recurrent state between steps (DNC's ``AccessState``)."""

    memory: Tensor  # (B, N, W) M_t
    usage: Tensor  # (B, N) w_u_t
    read_weights: Tensor  # (B, R, N) w_r_t


def lrua_step(state, heads, reading, *positional):
    """One LRUA step (Eq. 2-8), DNC's ``MemoryAccess._build``: ``lrua_step(state, heads, reading) -> (reads,
    next_state)``. Every reading of the paper is a field of ``reading`` (:class:`Reading`): what is written
    (``heads.content``), zeroing the least-used row first or not, the read weights from M_t (after the write,
    paper) or from M_{t-1} (the read vector is taken from M_t either way, as this project has always done), a key
    strength or none (``heads.strength``).

    Args:
        state: :class:`LRUAState` at step t-1: memory ``[B, N, W]``, usage ``[B, N]``, read weights ``[B, R, N]``.
        heads: this step's :class:`Heads`.
        reading: the :class:`Reading` (``gamma``: usage decay, Eq. 5).

    Returns:
        ``(reads [B, R, W], LRUAState)`` at step t.

    The positional form of earlier versions, ``lrua_step(memory, usage, read_weights, heads, gamma,
    zero_least_used=True, read_after_write=True) -> (memory, usage, read_weights, reads)``, is still accepted.
    """
    if isinstance(state, LRUAState):
        reads, nxt = _lrua_step(state.memory, state.usage, state.read_weights, heads, reading.gamma,
                                reading.zero_least_used, reading.read_after_write)
        return reads, nxt
    memory, usage, read_weights = state, heads, reading
    heads, gamma, *flags = positional
    reads, nxt = _lrua_step(memory, usage, read_weights, heads, gamma, *flags)
    return (*nxt, reads)


def _lrua_step(memory: Tensor, usage: Tensor, read_weights: Tensor, heads: Heads, gamma: float,
               zero_least_used: bool = True, read_after_write: bool = True) -> tuple[Tensor, LRUAState]:
    lu, slot = least_used(usage, heads.keys.shape[1])  # Eq. 6 on w_u_{t-1}
    ww = write_weights(heads.alpha, read_weights, lu)  # Eq. 7
    if not read_after_write:
        wr = content_read_weights(heads.keys, memory, heads.strength)  # Eq. 3 on M_{t-1}
    written = zero_rows(memory, slot) if zero_least_used else memory
    written = write(written, ww, heads.content)  # Eq. 8
    if read_after_write:
        wr = content_read_weights(heads.keys, written, heads.strength)  # Eq. 3 on M_t (paper)
    reads = read(written, wr)  # Eq. 4, from M_t in both readings
    return reads, LRUAState(written, update_usage(usage, wr, ww, gamma), wr)  # Eq. 5
