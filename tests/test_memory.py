"""LRUA memory math against hand-computed values and a plain numpy loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mann import memory as mem
from mann.config import ModelConfig, MemoryConfig, ControllerConfig
from mann.model import MANN

# ---------------------------------------------------------------------------------------------------------------
# numpy references: one batch element, loops over heads and slots, straight from the paper's equations


def np_cosine(k, M, eps=mem.EPS):
    out = np.zeros((k.shape[0], M.shape[0]))
    for r in range(k.shape[0]):
        for i in range(M.shape[0]):
            out[r, i] = k[r] @ M[i] / ((np.linalg.norm(k[r]) + eps) * (np.linalg.norm(M[i]) + eps))
    return out


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_least_used(u, n):
    order = sorted(range(len(u)), key=lambda i: (u[i], i))  # ties -> lower index
    w = np.zeros_like(u)
    w[order[:n]] = 1.0
    return w


def np_lrua_step(M, u, wr_prev, keys, alpha, gamma, zero=True, read_after_write=True, content=None,
                 strength=None):
    """One LRUA step for one batch element (paper Eq. 2-8; the key is written unless ``content`` is given)."""
    R = keys.shape[0]
    content = keys if content is None else content
    beta = np.ones(R) if strength is None else strength
    lu = np_least_used(u, R)
    ww = np.stack([1 / (1 + np.exp(-alpha[r])) * wr_prev[r] + (1 - 1 / (1 + np.exp(-alpha[r]))) * lu
                   for r in range(R)])
    M = M.copy()
    if not read_after_write:
        wr = np_softmax(beta[:, None] * np_cosine(keys, M))
    if zero:
        M[int(np.argmin(u))] = 0.0
    for r in range(R):
        for i in range(M.shape[0]):
            M[i] += ww[r, i] * content[r]
    if read_after_write:
        wr = np_softmax(beta[:, None] * np_cosine(keys, M))
    reads = wr @ M
    u = gamma * u + wr.sum(0) + ww.sum(0)
    return M, u, wr, ww, reads


# ---------------------------------------------------------------------------------------------------------------
# hand-computed cases


def test_cosine_hand_computed():
    keys = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (1, 2, 2)
    memory = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]]])  # (1, 3, 2)
    got = mem.cosine_similarity(keys, memory, eps=0.0)
    s = 1 / math.sqrt(2)
    want = torch.tensor([[[1.0, 0.0, -s], [s, s, -1.0]]])
    torch.testing.assert_close(got, want)


def test_cosine_zero_row_and_zero_key_give_zero_not_nan():
    keys = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    memory = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    got = mem.cosine_similarity(keys, memory)
    assert torch.isfinite(got).all()
    assert got[0, 0].abs().max() == 0 and got[0, 1, 0] == 0
    torch.testing.assert_close(got[0, 1, 1], torch.tensor(1.0), atol=1e-6, rtol=0)
    # gradients through an all-zero memory are finite too
    k = keys.clone().requires_grad_()
    m = memory.clone().requires_grad_()
    mem.content_read_weights(k, m).sum().backward()
    assert torch.isfinite(k.grad).all() and torch.isfinite(m.grad).all()


def test_read_weights_are_softmax_of_cosine():
    keys = torch.tensor([[[1.0, 0.0]]])
    memory = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    w = mem.content_read_weights(keys, memory)
    e = math.e
    torch.testing.assert_close(w, torch.tensor([[[e / (e + 1), 1 / (e + 1)]]]), atol=1e-6, rtol=0)
    # a key strength of 2 doubles the similarities before the softmax
    w2 = mem.content_read_weights(keys, memory, strength=torch.tensor([[2.0]]))
    torch.testing.assert_close(w2, torch.tensor([[[e**2 / (e**2 + 1), 1 / (e**2 + 1)]]]), atol=1e-6, rtol=0)


def test_read_is_weighted_sum():
    memory = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    w = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]]])
    torch.testing.assert_close(mem.read(memory, w), torch.tensor([[[2.0, 3.0], [4.5, 5.5]]]))


def test_usage_decay_hand_computed():
    u = torch.tensor([[1.0, 0.5, 0.0]])
    wr = torch.tensor([[[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]])
    ww = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]])
    got = mem.update_usage(u, wr, ww, gamma=0.9)
    torch.testing.assert_close(got, torch.tensor([[0.9 + 0.2 + 1.0, 0.45 + 0.3 + 0.5, 0.0 + 1.5 + 0.5]]))


def test_least_used_marks_n_smallest_with_ties_to_lower_index():
    u = torch.tensor([[0.3, 0.1, 0.2, 0.1, 0.9], [0.0, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(mem.least_used(u, 1)[0], torch.tensor([[0, 1, 0, 0, 0], [1, 0, 0, 0, 0.0]]))
    torch.testing.assert_close(mem.least_used(u, 2)[0], torch.tensor([[0, 1, 0, 1, 0], [1, 1, 0, 0, 0.0]]))
    torch.testing.assert_close(mem.least_used(u, 3)[0], torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0.0]]))
    # the least-used slot (the zeroed row) is the first marked one, as argmin on ties
    for n in (1, 2, 3):
        assert mem.least_used(u, n)[1].tolist() == [1, 0] == torch.argmin(u, dim=-1).tolist()


def test_write_weights_interpolate():
    alpha = torch.tensor([[0.0, 100.0]])  # sigmoid 0.5 and ~1
    wr_prev = torch.tensor([[[0.0, 1.0, 0.0], [0.2, 0.2, 0.6]]])
    lu = torch.tensor([[1.0, 0.0, 0.0]])
    got = mem.write_weights(alpha, wr_prev, lu)
    torch.testing.assert_close(got, torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]]))


def test_zero_rows_and_write():
    memory = torch.ones(2, 3, 2)
    zeroed = mem.zero_rows(memory, torch.tensor([2, 0]))
    assert zeroed[0, 2].abs().sum() == 0 and zeroed[1, 0].abs().sum() == 0
    assert zeroed.sum() == 8
    ww = torch.tensor([[[0.0, 0.0, 1.0]], [[0.5, 0.5, 0.0]]])  # (2, 1, 3)
    content = torch.tensor([[[3.0, 4.0]], [[2.0, 2.0]]])
    got = mem.write(zeroed, ww, content)
    torch.testing.assert_close(got[0, 2], torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(got[1, 0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(got[1, 1], torch.tensor([2.0, 2.0]))


# ---------------------------------------------------------------------------------------------------------------
# random inputs against the numpy loop, several steps, all the ambiguous readings


@pytest.mark.parametrize("zero", [True, False])
@pytest.mark.parametrize("read_after_write", [True, False])
@pytest.mark.parametrize("add,strength", [(False, False), (True, True)])
def test_lrua_steps_match_numpy_reference(zero, read_after_write, add, strength):
    rng = np.random.default_rng(0)
    B, R, N, W, gamma = 3, 2, 6, 4, 0.9
    M = rng.normal(size=(B, N, W))
    M[:, 1] = 0.0  # a zero row
    u = rng.uniform(size=(B, N))
    u[:, 3] = u[:, 4] = 0.0  # a tie for least used
    wr = np_softmax(rng.normal(size=(B, R, N)))
    Mt, ut, wrt = (torch.tensor(a) for a in (M, u, wr))
    for _ in range(4):
        keys = np.tanh(rng.normal(size=(B, R, W)))
        alpha = rng.normal(size=(B, R))
        content = np.tanh(rng.normal(size=(B, R, W))) if add else keys
        beta = 1 + rng.uniform(size=(B, R)) * 3 if strength else None
        heads = mem.Heads(torch.tensor(keys), torch.tensor(alpha), torch.tensor(content),
                          None if beta is None else torch.tensor(beta))
        reading = mem.Reading(gamma, zero, read_after_write, add, strength)
        reads_t, (M_new, u_new, wr_t) = mem.lrua_step(mem.LRUAState(Mt, ut, wrt), heads, reading)
        old = mem.lrua_step(Mt, ut, wrt, heads, gamma, zero, read_after_write)  # the earlier positional form
        for a, b in zip(old, (M_new, u_new, wr_t, reads_t)):
            assert torch.equal(a, b)
        for b in range(B):
            M[b], u[b], wr[b], _, reads = np_lrua_step(M[b], u[b], wr[b], keys[b], alpha[b], gamma, zero,
                                                       read_after_write, content[b],
                                                       None if beta is None else beta[b])
            np.testing.assert_allclose(reads_t[b].numpy(), reads, atol=1e-10)
        np.testing.assert_allclose(M_new.numpy(), M, atol=1e-12)
        np.testing.assert_allclose(u_new.numpy(), u, atol=1e-12)
        np.testing.assert_allclose(wr_t.numpy(), wr, atol=1e-12)
        Mt, ut, wrt = M_new, u_new, wr_t


def test_split_heads_layout():
    out = torch.arange(2 * 15, dtype=torch.float64).view(2, 15) / 30  # R=2, W=3: keys 6, alphas 2, add 6, beta 2
    assert mem.head_layout(2, 3, add=True, strength=True) == 16 and mem.head_layout(2, 3, False, False) == 8
    out = torch.cat([out, out[:, :1]], 1)
    h = mem.split_heads(out, 2, 3, add=True, strength=True)
    torch.testing.assert_close(h.keys, torch.tanh(out[:, :6]).view(2, 2, 3))
    torch.testing.assert_close(h.alpha, out[:, 6:8])
    torch.testing.assert_close(h.content, torch.tanh(out[:, 8:14]).view(2, 2, 3))
    torch.testing.assert_close(h.strength, torch.nn.functional.softplus(out[:, 14:16]) + 1)
    plain = mem.split_heads(out[:, :8], 2, 3, add=False, strength=False)
    assert plain.content is plain.keys and plain.strength is None


def test_zeroed_row_is_the_least_used_before_the_write():
    M = torch.ones(1, 4, 2)
    u = torch.tensor([[0.5, 0.2, 0.1, 0.7]])
    zeroed = mem.zero_rows(M, torch.argmin(u, -1))
    assert zeroed[0, 2].abs().sum() == 0 and zeroed[0, [0, 1, 3]].min() == 1


# ---------------------------------------------------------------------------------------------------------------
# the full model: gradcheck in float64 through a few steps, every option


@pytest.mark.parametrize(
    "memory",
    [
        MemoryConfig(slots=5, width=3, read_heads=2),
        MemoryConfig(slots=5, width=3, read_heads=1, write_content="add", read_after_write=False,
                     zero_least_used=False, key_strength="learned"),
    ],
)
@pytest.mark.parametrize("controller", ["lstm", "feedforward"])
def test_gradcheck_full_model(memory, controller):
    torch.manual_seed(0)
    cfg = ModelConfig(kind="mann", controller=ControllerConfig(kind=controller, hidden=4), memory=memory)
    model = MANN(cfg, input_size=6, output_size=3).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]

    names = [n for n, _ in model.named_parameters()]

    def f(inp, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "feedforward"])
def test_baselines_have_no_memory(kind):
    cfg = ModelConfig(kind=kind, controller=ControllerConfig(kind=kind, hidden=8))
    model = MANN(cfg, input_size=6, output_size=3)
    assert not hasattr(model, "head")
    assert model.output.in_features == 8
    assert model(torch.randn(2, 5, 6)).shape == (2, 5, 3)


def test_read_entropy_hand_computed():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert torch.allclose(mem.read_entropy(w), torch.tensor([1.0, 0.0, 0.5]), atol=1e-6)
    assert mem.read_entropy(torch.ones(3, 2, 1)).shape == (3, 2) and not mem.read_entropy(torch.ones(2, 1)).any()
