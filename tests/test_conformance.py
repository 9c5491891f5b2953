"""One conformance test: every implementation of the MANN's memory path against one plain-autograd oracle, over
every reading of the paper, outputs and gradients (parameters, inputs and a non-default initial state).

Implementations: ``readable`` (``fused_memory: false``: :func:`mann.memory.lrua_step` under autograd), ``step``
(one :class:`mann.fused.LRUAStep` node per step), ``python`` and ``cpp`` (the whole episode as one
:class:`mann.fused.MANNSequence` node, time loops in Python or C++), ``plain`` (the bench's port). The oracle is a
functional model built on ``lrua_step`` and ``torch.lstm_cell`` from the MANN's parameters: no hand-written
gradient anywhere in it.

Tolerances: float64 1e-10 absolute + 1e-8 relative on outputs and gradients (rounding only: sums taken in another
order). Float32 against the float64 oracle: outputs 2e-5 + 2e-4 relative, gradients 2e-4 + 2e-3 relative.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from mann import fused
from mann import memory as mem
from mann.bench.plain import PlainMANN
from mann.config import ControllerConfig, MemoryConfig, ModelConfig, replace
from mann.model import MANN, MANNState

IMPLS = ["readable", "step", "python", "cpp", "plain"]
# every combination of (add vector, zeroing, read after write, key strength); heads 1-5 and odd widths cycle
READINGS = list(itertools.product([False, True], repeat=4))
TOL = {torch.float64: dict(out=(1e-10, 1e-8), grad=(1e-10, 1e-8)),
       torch.float32: dict(out=(2e-5, 2e-4), grad=(2e-4, 2e-3))}


def reading_id(r):
    add, zero, after, strength = r
    return "-".join(["add" if add else "key", "zero" if zero else "keep", "after" if after else "before",
                     "strength" if strength else "plain"])


def make_model(reading, heads: int, width: int, slots: int = 7, hidden: int = 6, controller: str = "lstm",
               inputs: int = 5, seed: int = 0) -> MANN:
    add, zero, after, strength = reading
    m = MemoryConfig(slots=slots, width=width, read_heads=heads, gamma=0.9, write_content="add" if add else "key",
                     zero_least_used=zero, read_after_write=after, key_strength="learned" if strength else "none")
    torch.manual_seed(seed)
    return MANN(ModelConfig(controller=ControllerConfig(kind=controller, hidden=hidden), memory=m), inputs, 4)


def oracle(model: MANN, x, state: MANNState):
    """The MANN's function in plain autograd: its parameters, ``torch.lstm_cell`` (or tanh) and ``lrua_step``."""
    p = dict(model.named_parameters())
    R, W, rd = model.heads, model.width, model.reading
    RW = R * W
    w_in = torch.cat([p["input_proj.weight"], p["recurrent.weight"][:, :RW]], 1)  # on [x_t, r_{t-1}]
    h, c, memory, usage, wr, reads = state
    ys = []
    for x_t in x.unbind(1):
        z = torch.cat([x_t, reads.flatten(1)], 1)
        if model.lstm:
            h, c = torch.lstm_cell(z, (h, c), w_in, p["recurrent.weight"][:, RW:], p["input_proj.bias"])
        else:
            h = torch.tanh(F.linear(z, w_in, p["input_proj.bias"]))
        heads = mem.split_heads(F.linear(h, p["head.weight"], p["head.bias"]), R, W, rd.add, rd.strength)
        reads, (memory, usage, wr) = mem.lrua_step(mem.LRUAState(memory, usage, wr), heads, rd)
        ys.append(F.linear(torch.cat([h, reads.flatten(1)], 1), p["output.weight"], p["output.bias"]))
    return torch.stack(ys, 1)


def initial_state(model: MANN, batch: int, dtype, seed: int = 1) -> MANNState:
    """Not the default one: random controller state, memory with one all-zero row, usage with a tie for least
    used, random read weights and read vectors."""
    g = torch.Generator().manual_seed(seed)
    shapes = model.initial_state(batch)
    h, c, memory, usage, wr, reads = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in shapes)
    memory[:, 1] = 0.0
    usage = usage.abs()
    usage[:, 2] = usage[:, 4] = 0.0
    state = MANNState(h, c, memory, usage, torch.softmax(wr, -1), torch.tanh(reads))
    return MANNState(*(t.to(dtype) for t in state))


def run(impl: str, model: MANN, x, state: MANNState, monkeypatch):
    """``impl``'s logits; its model is ``model`` (the fused paths) or a copy with the readable path."""
    if impl == "readable":
        readable = MANN(replace(model.cfg, fused_memory=False), model.input_proj.in_features,
                        model.output.out_features).to(model.output.weight)
        readable.load_state_dict(model.state_dict())
        return readable, readable(x, state)
    if impl == "plain":
        plain = PlainMANN.from_model(model)
        return plain, plain(x, state)
    if impl == "cpp":
        assert fused.extension() is not None, "the C++ time loops did not build (see the warning above)"
    if impl == "python":
        monkeypatch.setattr(fused, "_extension", False)
    return model, model(x, state, per_step=impl == "step")


def model_grads(impl: str, net, model: MANN) -> list:
    """``net``'s parameter gradients in the order and layout of ``model.parameters()``."""
    if impl != "plain":
        return [p.grad for p in net.parameters()]
    D, RW = model.input_proj.in_features, model.heads * model.width
    ih = net.cell.weight_ih.grad
    torch.testing.assert_close(net.cell.bias_hh.grad, net.cell.bias_ih.grad, atol=0, rtol=0)
    return [ih[:, :D], net.cell.bias_ih.grad, torch.cat([ih[:, D:], net.cell.weight_hh.grad], 1),
            net.head.weight.grad, net.head.bias.grad, net.output.weight.grad, net.output.bias.grad]


def check(impl: str, model: MANN, dtype, monkeypatch, batch: int = 2, steps: int = 5):
    """``impl`` in ``dtype`` against the oracle in float64: logits and the gradients of a random projection of
    them with respect to every parameter, the inputs and every field of the initial state."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, steps, model.input_proj.in_features, generator=g, dtype=torch.float64)
    upstream = torch.randn(batch, steps, model.output.out_features, generator=g, dtype=torch.float64)
    state = initial_state(model, batch, torch.float64)

    ref_model = model.double()
    leaves = [x.clone().requires_grad_(), *(t.clone().requires_grad_() for t in state)]
    y_ref = oracle(ref_model, leaves[0], MANNState(*leaves[1:]))
    want = torch.autograd.grad((y_ref * upstream).sum(), [*ref_model.parameters(), *leaves], allow_unused=True)

    model = model.to(dtype)
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    net, y = run(impl, model, leaves[0], MANNState(*leaves[1:]), monkeypatch)
    net.zero_grad(set_to_none=True)
    (y * upstream.to(dtype)).sum().backward()
    got = [*model_grads(impl, net, model), *(t.grad for t in leaves)]

    (oa, orr), (ga, gr) = TOL[dtype]["out"], TOL[dtype]["grad"]
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=oa, rtol=orr)
    names = [n for n, _ in model.named_parameters()] + ["inputs", *MANNState._fields]
    for name, a, b in zip(names, got, want):
        if a is None and b is None:  # the initial usage reaches the outputs only through Eq. 6 (no gradient)
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        torch.testing.assert_close(a.double(), b, atol=ga, rtol=gr, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("reading", READINGS, ids=reading_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_matches_the_oracle_in_float64(impl, reading, monkeypatch):
    i = READINGS.index(reading)
    model = make_model(reading, heads=1 + i % 5, width=(3, 5, 1)[i % 3])
    check(impl, model, torch.float64, monkeypatch)


@pytest.mark.parametrize("reading", READINGS[::3], ids=reading_id)
@pytest.mark.parametrize("impl", ["readable", "step"])
def test_feedforward_controller_matches_the_oracle_in_float64(impl, reading, monkeypatch):
    model = make_model(reading, heads=2, width=3, controller="feedforward")
    check(impl, model, torch.float64, monkeypatch)


@pytest.mark.parametrize("heads,width,slots", [(1, 8, 8), (2, 17, 9), (4, 12, 16), (5, 10, 16)])
@pytest.mark.parametrize("impl", ["step", "python", "cpp"])
def test_float32_within_tolerance_of_the_float64_oracle(impl, heads, width, slots, monkeypatch):
    """Widths that are and are not a multiple of the C++ vector width (8), and more heads than its one-pass row
    code takes (4); each size with another reading."""
    reading = READINGS[[1, 6, 11, 15][[1, 2, 4, 5].index(heads)]]
    model = make_model(reading, heads, width, slots=slots, hidden=24, inputs=21)
    check(impl, model, torch.float32, monkeypatch, batch=4, steps=20)
