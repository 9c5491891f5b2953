"""A fused LRUA memory step: the same math as ``mann.memory`` (Eq. 2-8), one autograd node with a hand-written
backward instead of ~25 small ones.

At batch 16 the memory step is dominated by the fixed cost of many small operations, most of them on
``[B, N, W]`` tensors in the backward pass; writing the backward by hand merges them (for example the three
gradient terms of M_t that autograd computes and sums separately). ``tests/test_fused.py`` checks outputs and
gradients against the readable functions in float64, zero rows included.

Covers the paper's reading (write, then read M_t) with the key or an add vector as content and with or without
zeroing; the model falls back to the readable functions for the other options.

:class:`MANNSequence` goes further: a whole episode is one node. On CPU its time loops run in C++
(``mann/csrc/lrua_sequence.cpp``: the same steps, the memory math as loops over each episode's rows, AVX2 where
the CPU has it, one episode per thread), compiled on first use; where that cannot be built the same steps run
from Python (:func:`sequence_forward_step`, :func:`sequence_backward_step`), which is also the readable account
of what the C++ computes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .memory import EPS

CPP_SOURCE = Path(__file__).with_name("csrc") / "lrua_sequence.cpp"
_extension: object = None  # the loaded module, False once it could not be, None before the first try
# Per shape, the saved stacks of finished episodes (their backward has run): the next forward writes over them
# instead of touching fresh pages, which cost more than the writes (about 25 MB per paper-size batch).
_WORKSPACES: dict[tuple, list[list[Tensor]]] = {}


def _give_back(pool: list, saved: list[Tensor]) -> None:
    if len(pool) < 2:  # two sets cover a forward that runs while the previous graph is still alive
        pool.append(saved)


class _Recycle:
    """Held by a graph node: gives its saved stacks back to the pool when the node is freed (after its last
    backward, or when the graph is dropped), never while a backward could still read them."""

    def __init__(self, saved: list[Tensor], pool: list):
        self.saved, self.pool = saved, pool

    def __del__(self):
        _give_back(self.pool, self.saved)


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for runs serially without it (torch's own libgomp is reused)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _stable_source(flags: list[str]) -> tuple[Path, Path]:
    """The source copied into a build directory named by its content, flags, torch and Python versions.

    torch's own build directory is keyed by the extension's name only, and its ``build.ninja`` names the source's
    path: two copies of this package (two checkouts, or the working-dir copies ``ray job submit`` unpacks on each
    node) would rebuild it, a minute each, every time the other one had built last. With the source at a path
    fixed by its content, every copy of the same source shares one build.
    """
    from torch.utils.cpp_extension import get_default_build_root

    text = CPP_SOURCE.read_bytes()
    tag = "\0".join([torch.__version__, sys.version, " ".join(flags)]).encode()
    digest = hashlib.sha256(text + b"\0" + tag).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as torch's own choice of root
    build_dir = Path(root) / f"mann_lrua_sequence-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / CPP_SOURCE.name
    if not source.is_file() or source.read_bytes() != text:
        tmp = build_dir / f".{CPP_SOURCE.name}.tmp{os.getpid()}"
        tmp.write_bytes(text)
        os.replace(tmp, source)  # processes building at once all write the same bytes
    return source, build_dir


def extension():
    """The C++ time loops of :class:`MANNSequence` (``mann/csrc/lrua_sequence.cpp``), or None.

    Compiled with the C++ compiler on first use (about a minute) and cached under ``TORCH_EXTENSIONS_DIR``
    (default ``~/.cache/torch_extensions``) in a directory named by the source's content (:func:`_stable_source`;
    a changed source builds in a new one). None, after one warning naming the
    reason, where it cannot be built; ``MANN_CPP=0`` turns it off. Either way the model computes the same thing:
    without it :class:`MANNSequence` runs the same steps from Python, slower (``mann bench`` says how much).
    """
    global _extension
    if _extension is None:
        if os.environ.get("MANN_CPP", "1") == "0":
            _extension = False
        else:
            try:
                from torch.utils.cpp_extension import load

                # the ninja of this environment (the `ninja` package) even when it is not on PATH
                here, path = str(Path(sys.executable).parent), os.environ.get("PATH", "")
                if here not in path.split(os.pathsep):
                    os.environ["PATH"] = os.pathsep.join([here, path])
                flags = _cflags()
                name = "mann_lrua_sequence" + ("_avx2" if "-mavx2" in flags else "")
                source, build_dir = _stable_source(flags)
                _extension = load(name=name, sources=[str(source)], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
            except Exception as e:  # no compiler, no ninja, no headers: fall back to the Python loops
                reason = " ".join(str(e).split())[:300]
                warnings.warn(f"mann: C++ time loops unavailable ({type(e).__name__}: {reason}); "
                              f"using the Python loops (same results, slower; MANN_CPP=0 silences this)",
                              stacklevel=2)
                _extension = False
    return _extension or None


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


def sequence_forward_step(x_t, w_rec_t, w_head_t, b_head, h, c, memory, usage, wr, reads, gamma: float,
                          zero: bool, add: bool):
    """One step of :class:`MANNSequence` without autograd: :meth:`mann.model.MANN.step` with the LSTM controller
    and the fused memory math of :class:`LRUAStep`. Shapes as in :class:`MANNState`; ``x_t``: ``[B, 4H]``,
    ``w_rec_t``: ``[R*W + H, 4H]``, ``w_head_t``: ``[H, P]``.

    Returns:
        ``(h, c, memory, usage, wr, reads)`` at step t and the tuple of what the backward step needs.
    """
    B, N = usage.shape
    R, W = reads.shape[1], reads.shape[2]
    H = h.shape[1]
    RW = R * W
    z = torch.cat([reads.reshape(B, RW), h], 1)  # (B, RW + H)
    gates = torch.addmm(x_t, z, w_rec_t)
    sg = torch.sigmoid(gates)
    i, f, o = sg[:, :H], sg[:, H : 2 * H], sg[:, 3 * H :]
    g = torch.tanh(gates[:, 2 * H : 3 * H])
    c_prev = c
    c = torch.addcmul(f * c_prev, i, g)
    tc = torch.tanh(c)
    h = o * tc
    out = torch.addmm(b_head, h, w_head_t)
    keys = torch.tanh(out[:, :RW]).view(B, R, W)
    alpha = out[:, RW : RW + R]
    content = torch.tanh(out[:, RW + R : 2 * RW + R]).view(B, R, W) if add else keys
    # Eq. 6 on w_u_{t-1} (ties to the lower index), and the least-used row that is zeroed before the write
    order = torch.sort(usage, dim=-1, stable=True).indices  # order[:, 0] is argmin (its first occurrence)
    lu = torch.zeros_like(usage).scatter_(1, order[:, :R], 1.0)
    keep = torch.ones_like(usage)
    if zero:
        keep.scatter_(1, order[:, :1], 0.0)
    # LRUAStep.forward (Eq. 7-8, 2-5)
    s = torch.sigmoid(alpha).unsqueeze(-1)
    lu1 = lu.unsqueeze(1)
    diff = wr - lu1
    ww = lu1 + s * diff
    memory = torch.baddbmm(memory * keep.unsqueeze(-1), ww.transpose(1, 2), content)
    m_raw = memory.norm(dim=-1)
    k_raw = keys.norm(dim=-1, keepdim=True)
    q = (k_raw + EPS) * (m_raw + EPS).unsqueeze(1)
    sim = torch.bmm(keys, memory.transpose(1, 2)) / q
    wr = torch.softmax(sim, dim=-1)
    reads = torch.bmm(wr, memory)
    usage = wr.sum(1) + ww.sum(1) + gamma * usage
    saved = (z, sg, g, c_prev, tc, keys, content, s, diff, keep, memory, m_raw, k_raw, q, sim, wr, ww)
    return (h, c, memory, usage, wr, reads), saved


def sequence_backward_step(saved, d_h, d_reads, dh_next, dr_next, dc, dm, du, dwr, w_rec, w_head, gamma: float,
                           add: bool):
    """The backward of :func:`sequence_forward_step` (through time: the ``d*`` carries come from step t+1).

    Returns:
        ``(dh_next, dr_next, dc, dm, du, dwr)`` for step t-1, ``d_gates [B, 4H]`` (the gradient of ``x_t``) and
        ``d_out [B, P]`` (of the head layer's output).
    """
    z, sg, g, c_prev, tc, keys, content, s, diff, keep, m1, m_raw, k_raw, q, sim, wr, ww = saved
    B, R, W = keys.shape
    H = c_prev.shape[1]
    RW = R * W
    d_reads = d_reads + dr_next
    # LRUAStep.backward
    du1 = du.unsqueeze(1)
    g_wr = torch.baddbmm(dwr + du1, d_reads, m1.transpose(1, 2))
    g_sim = wr * (g_wr - (g_wr * wr).sum(-1, keepdim=True))
    g_d = g_sim / q
    g_q = -(g_sim * sim) / q
    g_knorm = (g_q * (m_raw + EPS).unsqueeze(1)).sum(-1, keepdim=True)
    g_mnorm = (g_q * (k_raw + EPS)).sum(1)
    g_m1 = torch.baddbmm(dm, torch.cat([wr, g_d], 1).transpose(1, 2), torch.cat([d_reads, keys], 1))
    g_m1 = g_m1 + (g_mnorm / m_raw.clamp_min(1e-30)).unsqueeze(-1) * m1
    g_keys = torch.bmm(g_d, m1) + (g_knorm / k_raw.clamp_min(1e-30)) * keys
    g_ww = torch.bmm(content, g_m1.transpose(1, 2)) + du1
    g_content = torch.bmm(ww, g_m1)
    dm = g_m1 * keep.unsqueeze(-1)
    g_alpha = (g_ww * diff).sum(-1) * (s * (1 - s)).squeeze(-1)
    dwr = g_ww * s
    du = du * gamma
    # the head layer: keys = tanh(.), alpha, add vectors = tanh(.)
    if add:
        d_out = torch.cat([(g_keys * (1 - keys * keys)).reshape(B, RW), g_alpha,
                           (g_content * (1 - content * content)).reshape(B, RW)], 1)
    else:
        d_out = torch.cat([((g_keys + g_content) * (1 - keys * keys)).reshape(B, RW), g_alpha], 1)
    dh = d_h + dh_next + d_out @ w_head
    # the LSTM cell
    i, f, o = sg[:, :H], sg[:, H : 2 * H], sg[:, 3 * H :]
    dc = torch.addcmul(dc, dh * o, 1 - tc * tc)
    d_act = sg * (1 - sg)  # sigmoid' of the i, f, o blocks; the g block is replaced by tanh'
    d_act[:, 2 * H : 3 * H] = 1 - g * g
    d_gates = torch.cat([dc * g, dc * c_prev, dc * i, dh * tc], 1).mul_(d_act)
    dc = dc * f
    dz = d_gates @ w_rec
    return (dz[:, RW:], dz[:, :RW].reshape(B, R, W), dc, dm, du, dwr), d_gates, d_out


class MANNSequence(torch.autograd.Function):
    """A whole episode of the LSTM-controlled MANN (paper reading: write, then read M_t) as one autograd node:
    the forward runs all T steps without building a graph (:func:`sequence_forward_step`), the backward runs back
    through time by hand (:func:`sequence_backward_step`, the backward of :class:`LRUAStep` term by term and of
    the LSTM cell); the recurrent and head weight gradients are one product each over all steps. On CPU both time
    loops run in C++ where :func:`extension` builds. ``tests/test_fused.py`` checks outputs and gradients of both
    against the readable step-by-step model.

    Args:
        x_proj: ``[B, T, 4H]`` the hoisted input projection (bias included).
        w_rec: ``[4H, R*W + H]`` recurrent weight on ``[r_{t-1}, h_{t-1}]``.
        w_head: ``[P, H]`` and ``b_head``: ``[P]`` the head layer (keys, alphas, then add vectors if ``add``).
        h, c, memory, usage, wr, reads: the initial :class:`~mann.model.MANNState`, constants (no gradient).
        gamma: usage decay; ``zero``: zero the least-used row before the write; ``add``: write a separate vector.

    Returns:
        ``(h [B, T, H], reads [B, T, R*W])``.
    """

    @staticmethod
    def forward(ctx, x_proj, w_rec, w_head, b_head, h, c, memory, usage, wr, reads, gamma: float, zero: bool,
                add: bool):
        B = x_proj.shape[0]
        state = (h, c, memory, usage, wr, reads)
        w_rec_t, w_head_t = w_rec.t().contiguous(), w_head.t().contiguous()
        ctx.gamma, ctx.add = gamma, add
        ctx.save_for_backward(w_rec, w_head)
        ext = extension() if x_proj.device.type == "cpu" else None
        ctx.ext = ext
        if ext is not None:  # the same steps with the time loop in C++
            key = (tuple(x_proj.shape), tuple(memory.shape), tuple(wr.shape), x_proj.dtype, add)
            pool = _WORKSPACES.setdefault(key, [])
            hs, rs, *saved = ext.sequence_forward(x_proj, w_rec_t, w_head_t, b_head, *state, gamma, zero, add,
                                                  pool.pop() if pool else [])
            if any(ctx.needs_input_grad):
                ctx.saved, ctx.hs, ctx.recycle = saved, hs, _Recycle(saved, pool)
            else:
                _give_back(pool, saved)  # nothing will read them: the next call may write over them
            return hs.transpose(0, 1), rs.transpose(0, 1)
        hs, rs, saved = [], [], []
        for x_t in x_proj.unbind(1):
            state, tape = sequence_forward_step(x_t, w_rec_t, w_head_t, b_head, *state, gamma, zero, add)
            hs.append(state[0])
            rs.append(state[5].reshape(B, -1))
            saved.append(tape)
        ctx.saved, ctx.hs = saved, hs
        return torch.stack(hs, 1), torch.stack(rs, 1)

    @staticmethod
    def backward(ctx, d_hs, d_rs):
        w_rec, w_head = ctx.saved_tensors
        saved, hs = ctx.saved, ctx.hs
        w_rec, w_head = w_rec.contiguous(), w_head.contiguous()
        if ctx.ext is not None:
            g_x, g_w_rec, g_w_head, g_b_head = ctx.ext.sequence_backward(saved, hs, d_hs, d_rs, w_rec, w_head,
                                                                         ctx.gamma, ctx.add)
            return (g_x, g_w_rec, g_w_head, g_b_head, None, None, None, None, None, None, None, None, None)
        B, T, H = d_hs.shape
        keys, m1 = saved[0][5], saved[0][10]
        R, W, N = keys.shape[1], keys.shape[2], m1.shape[1]
        d_hs = d_hs.contiguous()
        d_rs = d_rs.reshape(B, T, R, W)
        new = d_hs.new_zeros
        carry = (new(B, H), new(B, R, W), new(B, H), new(B, N, W), new(B, N), new(B, R, N))
        zs = torch.cat([step[0] for step in saved])  # (T*B, RW + H), step-major
        d_gates_all, d_out_all = [None] * T, [None] * T
        for t in range(T - 1, -1, -1):
            carry, d_gates_all[t], d_out_all[t] = sequence_backward_step(
                saved[t], d_hs[:, t], d_rs[:, t], *carry, w_rec, w_head, ctx.gamma, ctx.add)
        d_out = torch.cat(d_out_all)  # (T*B, P)
        d_gates = torch.cat(d_gates_all)  # (T*B, G)
        g_w_rec = d_gates.t() @ zs
        g_w_head = d_out.t() @ torch.cat(hs)
        g_x = d_gates.view(T, B, -1).transpose(0, 1)
        return (g_x, g_w_rec, g_w_head, d_out.sum(0), None, None, None, None, None, None, None, None, None)
