"""The fused LRUA step computes exactly what the readable memory functions compute: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from mann import memory as mem
from mann.fused import LRUAStep


def readable(keys, content, alpha, memory, usage, wr_prev, lu, keep, gamma):
    ww = mem.write_weights(alpha, wr_prev, lu)
    m1 = mem.write(memory * keep.unsqueeze(-1), ww, content)
    wr = mem.content_read_weights(keys, m1)
    return m1, mem.update_usage(usage, wr, ww, gamma), wr, mem.read(m1, wr)


def inputs(seed, B=3, R=2, N=6, W=4, zero_rows=True):
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    keys = torch.tanh(torch.randn(B, R, W, generator=g, **d))
    content = torch.tanh(torch.randn(B, R, W, generator=g, **d))
    alpha = torch.randn(B, R, generator=g, **d)
    memory = torch.randn(B, N, W, generator=g, **d)
    usage = torch.rand(B, N, generator=g, **d)
    if zero_rows:
        memory[:, 2] = 0.0  # a zero row that stays zero (its write weight is tiny, see below)
    wr_prev = torch.softmax(torch.randn(B, R, N, generator=g, **d), -1)
    lu = mem.least_used(usage, R)
    keep = (torch.arange(N) != torch.argmin(usage, -1, keepdim=True)).to(torch.float64)
    return keys, content, alpha, memory, usage, wr_prev, lu, keep


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("same_content", [True, False])
def test_fused_matches_readable_outputs_and_gradients(seed, same_content):
    keys, content, alpha, memory, usage, wr_prev, lu, keep = inputs(seed)
    if same_content:
        content = keys
    leaves = [t.clone().requires_grad_() for t in (keys, content, alpha, memory, usage, wr_prev)]
    if same_content:
        leaves[1] = leaves[0]
    upstream = [torch.randn_like(o) for o in readable(*(t.detach() for t in leaves), lu, keep, 0.9)]
    grads = []
    for fn in (readable, LRUAStep.apply):
        outs = fn(*leaves, lu, keep, 0.9)
        loss = sum((o * u).sum() for o, u in zip(outs, upstream))
        grads.append((outs, torch.autograd.grad(loss, leaves, allow_unused=False)))
    (out_r, g_r), (out_f, g_f) = grads
    for a, b in zip(out_r, out_f):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    for a, b in zip(g_r, g_f):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_fused_gradcheck():
    keys, content, alpha, memory, usage, wr_prev, lu, keep = inputs(3)
    leaves = [t.clone().requires_grad_() for t in (keys, content, alpha, memory, usage, wr_prev)]
    assert torch.autograd.gradcheck(lambda *xs: LRUAStep.apply(*xs, lu, keep, 0.95), leaves, eps=1e-6, atol=1e-6)


def test_zero_key_and_zero_row_give_the_readable_finite_gradients():
    # |x| has no derivative at 0 (so no gradcheck there); both paths must take the same finite one (0).
    keys, content, alpha, memory, usage, wr_prev, lu, keep = inputs(4)
    keys[0, 0] = 0.0
    content[:, :] = 0.0  # nothing written: the zero row stays zero
    results = []
    for fn in (readable, LRUAStep.apply):
        leaves = [t.clone().requires_grad_() for t in (keys, content, alpha, memory, usage, wr_prev)]
        outs = fn(*leaves, lu, keep, 0.9)
        sum(o.sum() for o in outs).backward()
        results.append([t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
