"""The hand-written backward (mann.fused) on its own: gradcheck of the per-step node and of the whole-episode
node for every reading, the zero key and zero row, the paper's sizes in float32, the reuse of saved buffers and
the C++ build. Every implementation against the plain-autograd oracle: tests/test_conformance.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from mann import memory as mem
from mann.fused import LRUAStep, MANNSequence

from .conftest import REPO
from .test_conformance import READINGS, check, initial_state, make_model, reading_id


def step_inputs(seed, B=3, R=2, N=6, W=4, strength=True, zero_row=False):
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64, generator=g)
    memory = torch.randn(B, N, W, **d)
    if zero_row:  # |M| has no derivative there: not for gradcheck
        memory[:, 2] = 0.0
    usage = torch.rand(B, N, **d)
    wr_prev = torch.softmax(torch.randn(B, R, N, **d), -1)
    keys, content = torch.tanh(torch.randn(B, R, W, **d)), torch.tanh(torch.randn(B, R, W, **d))
    beta = 1 + torch.rand(B, R, **d) if strength else None
    return [memory, usage, wr_prev, keys, torch.randn(B, R, **d), content, beta]


@pytest.mark.parametrize("zero,after,strength", list(itertools.product([True, False], repeat=3)))
def test_step_gradcheck(zero, after, strength):
    leaves = [t.requires_grad_() for t in step_inputs(3, strength=strength) if t is not None]
    fill = (lambda *xs: (*xs, None)) if not strength else (lambda *xs: xs)
    assert torch.autograd.gradcheck(lambda *xs: LRUAStep.apply(*fill(*xs), 0.95, zero, after), leaves, eps=1e-6,
                                    atol=1e-6)


@pytest.mark.parametrize("after", [True, False])
def test_zero_key_and_zero_row_give_the_readable_finite_gradients(after):
    # |x| has no derivative at 0 (so no gradcheck there); both paths must take the same finite one (0).
    inputs = step_inputs(4, zero_row=True)
    inputs[3][0, 0] = 0.0  # a zero key
    inputs[5][:] = 0.0  # nothing written: the zero row stays zero
    results = []
    for fused in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        heads = mem.Heads(*leaves[3:])
        if fused:
            outs = LRUAStep.apply(*leaves, 0.9, True, after)
        else:
            outs = mem.lrua_step(*leaves[:3], heads, 0.9, True, after)
        sum(o.sum() for o in outs).backward()
        results.append([t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.fixture(params=["cpp", "python"])
def loops(request, monkeypatch):
    """Run the whole-episode path with its time loops in C++ (mann/csrc) and in Python. The C++ build must work
    here (the CI machine has a compiler): a missing build fails the test rather than testing Python twice."""
    import mann.fused as fused

    if request.param == "cpp":
        assert fused.extension() is not None, "the C++ time loops did not build (see the warning above)"
    else:
        monkeypatch.setattr(fused, "_extension", False)
    return request.param


@pytest.mark.parametrize("reading", [READINGS[0], READINGS[6], READINGS[15]], ids=reading_id)
def test_whole_episode_gradcheck(reading, loops):
    """Every input of the node: the projected inputs, the weights and the initial state."""
    model = make_model(reading, heads=2, width=3, slots=5, hidden=4).double()
    g = torch.Generator().manual_seed(3)
    x_proj = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    state = initial_state(model, 2, torch.float64)
    # no zero row (|M| has no derivative at 0) and no near-ties (Eq. 6 must stay put under eps)
    state = state._replace(memory=state.memory + 0.5, usage=state.usage + torch.arange(5) * 0.1)
    leaves = [t.detach().clone().requires_grad_() for t in (x_proj, model.recurrent.weight, model.head.weight,
                                                             model.head.bias, *state)]
    leaves[8].requires_grad_(False)  # usage: no gradient path (Eq. 6 only)

    def run(*xs):
        return MANNSequence.apply(*xs, model.reading)

    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-6)


def test_paper_sizes_in_float32(loops, monkeypatch):
    """The paper's sizes (128 x 40 memory, 4 heads, LSTM 200) and reading, 50 steps, against the float64 oracle."""
    model = make_model((False, True, True, False), heads=4, width=40, slots=128, hidden=200, inputs=405)
    check("cpp" if loops == "cpp" else "python", model, torch.float32, monkeypatch, batch=4, steps=50)


def test_reused_buffers_never_change_a_pending_backward(loops):
    """The C++ path writes a new episode over the saved stacks of a finished one: a graph that is still alive
    (a second forward before the first backward, or retain_graph) must keep its own, and give the same gradients."""
    fast = make_model(READINGS[5], heads=3, width=6, slots=12, hidden=10, inputs=21).double()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, 20, 21, generator=g, dtype=torch.float64) for _ in range(3)]
    ups = [torch.randn(3, 20, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    params = list(fast.parameters())

    def grads(y, up, retain=False):
        return torch.autograd.grad((y * up).sum(), params, retain_graph=retain)

    alone = [grads(fast(x), up) for x, up in zip(xs, ups)]
    ys = [fast(x) for x in xs]  # three graphs alive at once
    together = [grads(y, up, retain=True) for y, up in zip(ys, ups)]
    for x in xs:  # these forwards may take only buffers no graph can still read
        fast(x).sum().backward()
    again = grads(ys[0], ups[0])  # a second backward through the first graph
    for a, b in zip(alone, together):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb, atol=0, rtol=0)
    for ga, gb in zip(alone[0], again):
        torch.testing.assert_close(ga, gb, atol=0, rtol=0)
    with torch.no_grad():  # evaluation: no graph, buffers handed back at once
        torch.testing.assert_close(fast(xs[1]), ys[1].detach(), atol=0, rtol=0)


def test_copies_of_the_source_share_one_build_and_a_changed_source_gets_its_own(tmp_path, monkeypatch):
    """Two checkouts, or the working-dir copies `ray job submit` unpacks on each node, must not rebuild each
    other's build (torch's build.ninja names the source path; each rebuild costs a minute)."""
    from mann import fused

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    flags = ["-O3", "-fopenmp"]
    builds = []
    for copy, text in (("a", fused.CPP_SOURCE.read_text()), ("b", fused.CPP_SOURCE.read_text()),
                       ("c", fused.CPP_SOURCE.read_text() + "\n// changed\n")):
        (tmp_path / copy).mkdir()
        monkeypatch.setattr(fused, "CPP_SOURCE", tmp_path / copy / "lrua_sequence.cpp")
        fused.CPP_SOURCE.write_text(text)
        source, build_dir = fused.stable_source(flags)
        assert source.parent == build_dir and source.read_text() == text
        assert build_dir.parent == tmp_path / "ext"
        builds.append(build_dir)
    assert builds[0] == builds[1] != builds[2]
    assert fused.stable_source(["-O2"])[1] != builds[1]  # other flags, another build


def test_without_a_compiler_the_python_loops_run_after_one_clear_warning(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import torch, warnings\n"
            "from mann.fused import extension\n"
            "from tests.test_conformance import make_model\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    assert extension() is None and extension() is None\n"
            "print(len(w), w[0].message)\n"
            "model = make_model((False, True, False, True), heads=2, width=3).double()\n"
            "x = torch.randn(2, 7, 5, dtype=torch.float64)\n"
            "torch.testing.assert_close(model(x), model(x, per_step=True))\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("1 mann: C++ time loops unavailable"), proc.stdout
