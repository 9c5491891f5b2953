"""The fused paths compute exactly what the readable memory functions and the step-by-step model compute:
outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from mann import memory as mem
from mann.fused import LRUAStep

from .conftest import REPO


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


def _pair(write_content="key", zero=True, dtype=torch.float64, **sizes):
    """The same MANN twice: the whole-episode fused path and the readable step-by-step path."""
    from mann.config import load_train_config, replace
    from mann.model import build_model

    sets = [f"model.{k}={v}" for k, v in sizes.items()]
    cfg = load_train_config(REPO / "configs/mann/paper.yaml", sets)
    mc = replace(cfg.model, memory=replace(cfg.model.memory, write_content=write_content, zero_least_used=zero))
    torch.manual_seed(0)
    fast = build_model(mc, cfg.task, 4).to(dtype)
    slow = build_model(replace(mc, fused_memory=False), cfg.task, 4).to(dtype)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


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


def _outputs_and_grads(model, x, upstream):
    y = model(x)
    return y, torch.autograd.grad((y * upstream).sum(), [p for p in model.parameters()])


@pytest.mark.parametrize("write_content", ["key", "add"])
@pytest.mark.parametrize("zero", [True, False])
def test_whole_episode_path_matches_readable_model_in_float64(write_content, zero, loops):
    fast, slow = _pair(write_content, zero, **{"memory.slots": 12, "memory.width": 6, "memory.read_heads": 3,
                                               "controller.hidden": 10})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 16 + 5, generator=g, dtype=torch.float64)
    upstream = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    (y_f, g_f), (y_s, g_s) = (_outputs_and_grads(m, x, upstream) for m in (fast, slow))
    torch.testing.assert_close(y_f, y_s, atol=1e-12, rtol=1e-10)
    for (name, _), a, b in zip(fast.named_parameters(), g_f, g_s):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)


def _assert_float32_agreement(steps: int, **sizes):
    fast, slow = _pair(dtype=torch.float32, **sizes)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, steps, 16 + 5, generator=g)
    upstream = torch.randn(4, steps, 5, generator=g)
    (y_f, g_f), (y_s, g_s) = (_outputs_and_grads(m, x, upstream) for m in (fast, slow))
    torch.testing.assert_close(y_f, y_s, atol=1e-5, rtol=1e-4)
    for (name, _), a, b in zip(fast.named_parameters(), g_f, g_s):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


def test_whole_episode_path_matches_readable_model_in_float32_at_paper_size(loops):
    """The paper's sizes (128 x 40 memory, 4 heads, LSTM 200), 50 steps, float32: agreement to float32 tolerance."""
    _assert_float32_agreement(50)


@pytest.mark.parametrize("heads,width,slots", [(1, 8, 8), (2, 17, 9), (3, 12, 16), (5, 10, 16)])
def test_whole_episode_path_matches_readable_model_in_float32_at_other_sizes(heads, width, slots, loops):
    """Widths that are not a multiple of the C++ vector width, and more heads than its one-pass row code takes."""
    _assert_float32_agreement(30, **{"memory.slots": slots, "memory.width": width, "memory.read_heads": heads,
                                     "controller.hidden": 24})


def test_whole_episode_gradcheck(loops):
    from mann.fused import MANNSequence

    fast, _ = _pair(**{"memory.slots": 5, "memory.width": 3, "memory.read_heads": 2, "controller.hidden": 4})
    g = torch.Generator().manual_seed(3)
    x_proj = torch.randn(2, 6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    state = fast.initial_state(2, dtype=torch.float64)
    weights = [p.detach().clone().requires_grad_() for p in (fast.recurrent.weight, fast.head.weight,
                                                             fast.head.bias)]

    def run(x, w_rec, w_head, b_head):
        return MANNSequence.apply(x, w_rec, w_head, b_head, *state, 0.9, True, False)

    assert torch.autograd.gradcheck(run, [x_proj, *weights], eps=1e-6, atol=1e-6)


def test_reused_buffers_never_change_a_pending_backward(loops):
    """The C++ path writes a new episode over the saved stacks of a finished one: a graph that is still alive
    (a second forward before the first backward, or retain_graph) must keep its own, and give the same gradients."""
    fast, _ = _pair(**{"memory.slots": 12, "memory.width": 6, "memory.read_heads": 3, "controller.hidden": 10})
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, 20, 21, generator=g, dtype=torch.float64) for _ in range(3)]
    ups = [torch.randn(3, 20, 5, generator=g, dtype=torch.float64) for _ in range(3)]
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
        source, build_dir = fused._stable_source(flags)
        assert source.parent == build_dir and source.read_text() == text
        assert build_dir.parent == tmp_path / "ext"
        builds.append(build_dir)
    assert builds[0] == builds[1] != builds[2]
    assert fused._stable_source(["-O2"])[1] != builds[1]  # other flags, another build


def test_without_a_compiler_the_python_loops_run_after_one_clear_warning(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import torch, warnings\n"
            "from mann.fused import extension\n"
            "from tests.test_fused import _pair\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    assert extension() is None and extension() is None\n"
            "print(len(w), w[0].message)\n"
            "fast, slow = _pair(**{'memory.slots': 6, 'memory.width': 3, 'memory.read_heads': 2, "
            "'controller.hidden': 4})\n"
            "x = torch.randn(2, 7, 21, dtype=torch.float64)\n"
            "torch.testing.assert_close(fast(x), slow(x))\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("1 mann: C++ time loops unavailable"), proc.stdout
