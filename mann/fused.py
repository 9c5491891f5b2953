"""A fused LRUA memory step: the same math as ``mann.memory`` (Eq. 2-8), one autograd node with a hand-written
backward instead of ~25 small ones.

At batch 16 the memory step is dominated by the fixed cost of many small operations, most of them on
``[B, N, W]`` tensors in the backward pass; writing the backward by hand merges them (for example the three
gradient terms of M_t that autograd computes and sums separately). ``tests/test_fused.py`` checks outputs and
gradients against the readable functions in float64, zero rows included.

Covers the paper's reading (write, then read M_t) with the key or an add vector as content and with or without
zeroing; the model falls back to the readable functions for the other options.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .memory import EPS


class LRUAStep(torch.autograd.Function):
    """Eq. 5-8 then Eq. 2-4 on the written memory.

    Args:
        keys: ``[B, R, W]`` read keys k_t.
        content: ``[B, R, W]`` what is written (``keys`` itself in the paper).
        alpha: ``[B, R]`` write gate logits.
        memory: ``[B, N, W]`` M_{t-1}.
        usage: ``[B, N]`` w_u_{t-1}.
        read_weights: ``[B, R, N]`` w_r_{t-1}.
        least_used: ``[B, N]`` w_lu_{t-1} (no gradient).
        keep: ``[B, N]`` 0 on the row zeroed before the write, 1 elsewhere (no gradient).
        gamma: usage decay.

    Returns:
        ``(memory [B, N, W], usage [B, N], read_weights [B, R, N], reads [B, R, W])`` at step t.
    """

    @staticmethod
    def forward(ctx, keys, content, alpha, memory, usage, read_weights, least_used, keep, gamma: float):
        s = torch.sigmoid(alpha).unsqueeze(-1)  # (B, R, 1)
        lu = least_used.unsqueeze(1)  # (B, 1, N)
        diff = read_weights - lu  # (B, R, N)
        ww = lu + s * diff  # Eq. 7
        m1 = torch.baddbmm(memory * keep.unsqueeze(-1), ww.transpose(1, 2), content)  # Eq. 8, (B, N, W)
        m_raw = m1.norm(dim=-1)  # (B, N)
        k_raw = keys.norm(dim=-1, keepdim=True)  # (B, R, 1)
        q = (k_raw + EPS) * (m_raw + EPS).unsqueeze(1)  # (B, R, N)
        sim = torch.bmm(keys, m1.transpose(1, 2)).div_(q)  # Eq. 2
        wr = torch.softmax(sim, dim=-1)  # Eq. 3
        reads = torch.bmm(wr, m1)  # Eq. 4
        u1 = torch.add(wr.sum(1), ww.sum(1)).add_(usage, alpha=gamma)  # Eq. 5
        ctx.gamma = gamma
        ctx.save_for_backward(keys, content, s, diff, keep, m1, m_raw, k_raw, q, sim, wr, ww)
        return m1, u1, wr, reads

    @staticmethod
    def backward(ctx, d_m1, d_u1, d_wr, d_reads):
        keys, content, s, diff, keep, m1, m_raw, k_raw, q, sim, wr, ww = ctx.saved_tensors
        zeros = keys.new_zeros
        B, R, W = keys.shape
        N = m1.shape[1]
        d_m1 = zeros(B, N, W) if d_m1 is None else d_m1
        d_u1 = zeros(B, N) if d_u1 is None else d_u1
        d_wr = zeros(B, R, N) if d_wr is None else d_wr
        d_reads = zeros(B, R, W) if d_reads is None else d_reads
        du = d_u1.unsqueeze(1)  # (B, 1, N)
        # read (Eq. 4) and usage (Eq. 5) into the read weights
        g_wr = d_wr + du + torch.bmm(d_reads, m1.transpose(1, 2))  # (B, R, N)
        # softmax (Eq. 3)
        g_sim = wr * (g_wr - (g_wr * wr).sum(-1, keepdim=True))
        # cosine (Eq. 2): sim = D / q with D = k M^T and q = (|k| + eps)(|M| + eps)
        g_d = g_sim / q
        g_q = -(g_sim * sim) / q
        g_knorm = (g_q * (m_raw + EPS).unsqueeze(1)).sum(-1, keepdim=True)  # (B, R, 1)
        g_mnorm = (g_q * (k_raw + EPS)).sum(1)  # (B, N)
        # every path into M_t at once: the read, the dot products, the row norms, and the next step
        g_m1 = torch.baddbmm(d_m1, torch.cat([wr, g_d], 1).transpose(1, 2), torch.cat([d_reads, keys], 1))
        g_m1.addcmul_((g_mnorm / m_raw.clamp_min(1e-30)).unsqueeze(-1), m1)  # d|M|/dM = M/|M|, 0 at 0
        g_keys = torch.bmm(g_d, m1).addcmul_(g_knorm / k_raw.clamp_min(1e-30), keys)
        # write (Eq. 8) and write weights (Eq. 7)
        g_ww = torch.bmm(content, g_m1.transpose(1, 2)).add_(du)  # (B, R, N)
        g_content = torch.bmm(ww, g_m1)
        g_memory = g_m1 * keep.unsqueeze(-1)
        g_alpha = ((g_ww * diff).sum(-1, keepdim=True) * s * (1 - s)).squeeze(-1)
        g_read_prev = g_ww * s
        return (g_keys, g_content, g_alpha, g_memory, d_u1 * ctx.gamma, g_read_prev, None, None, None)


class DeferredWeight(torch.autograd.Function):
    """Marks a weight used at every time step; its gradient is computed once, after the last step's backward.

    A recurrent layer applied per step would otherwise get 2T small products for its weight gradient (the
    batch, 16, as inner dimension) plus T accumulations; :class:`DeferredLinear` records each step's input and
    output gradient instead, and this node, which autograd runs after all of them, turns them into one product:
    ``dW = [dy_1; ...; dy_T]^T [x_1; ...; x_T]``.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, tape: list) -> Tensor:
        ctx.tape = tape
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        tape = ctx.tape
        if not tape:
            return grad, None
        xs = torch.cat([x for x, _ in tape])  # (T*B, in)
        gs = torch.cat([g for _, g in tape])  # (T*B, out)
        tape.clear()
        return torch.addmm(grad, gs.t(), xs), None


class DeferredLinear(torch.autograd.Function):
    """``x @ weight^T`` whose weight gradient is left to :class:`DeferredWeight` (``weight`` must come from it)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, tape: list) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.tape = tape
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        ctx.tape.append((x, grad))
        return grad @ weight, None, None
