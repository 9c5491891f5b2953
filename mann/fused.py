"""The hand-written backward of :func:`mann.memory.lrua_step`: one forward/backward pair (:func:`lrua_forward`,
:func:`lrua_backward`) for every reading (key or add vector written, zeroing on or off, read weights from M_t or
M_{t-1}, key strength or none, any number of heads), used by the per-step node :class:`LRUAStep` and by the
whole-episode node :class:`MANNSequence`.

At batch 16 the memory step is dominated by the fixed cost of many small operations, most of them on
``[B, N, W]`` tensors in the backward pass; writing the backward by hand merges them. :class:`MANNSequence` goes
further: a whole episode of the LSTM-controlled MANN is one node. On CPU its time loops run in C++
(``mann/csrc/lrua_sequence.cpp``: the same steps, the memory math as loops over each episode's rows, AVX2 where
the CPU has it, one episode per thread), compiled on first use; elsewhere (CUDA tensors, no compiler) the same
steps run from Python (:func:`sequence_forward_step`, :func:`sequence_backward_step`), which is also the readable
account of what the C++ computes. ``tests/test_conformance.py`` checks every path against a plain-autograd model.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from . import memory as mem
from .memory import EPS, Heads, Reading

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


def stable_source(flags: list[str]) -> tuple[Path, Path]:
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
    (default ``~/.cache/torch_extensions``) in a directory named by the source's content (:func:`stable_source`;
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
                source, build_dir = stable_source(flags)
                _extension = load(name=name, sources=[str(source)], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
            except Exception as e:  # no compiler, no ninja, no headers: fall back to the Python loops
                reason = " ".join(str(e).split())[:300]
                warnings.warn(f"mann: C++ time loops unavailable ({type(e).__name__}: {reason}); "
                              f"using the Python loops (same results, slower; MANN_CPP=0 silences this)",
                              stacklevel=2)
                _extension = False
    return _extension or None


class Tape(NamedTuple):
    """What :func:`lrua_backward` needs of one step (shapes as in :func:`lrua_forward`)."""

    keys: Tensor  # (B, R, W)
    content: Tensor  # (B, R, W), ``keys`` itself when the key is written
    strength: Tensor | None  # (B, R)
    gate: Tensor  # (B, R, 1) sigmoid(alpha)
    diff: Tensor  # (B, R, N) w_r_{t-1} - w_lu_{t-1}
    slot: Tensor | None  # (B,) the row zeroed before the write, None without zeroing
    ww: Tensor  # (B, R, N) w_w_t
    written: Tensor  # (B, N, W) M_t
    addressed: Tensor  # (B, N, W) the memory the read weights come from: M_t (``written`` itself), or M_{t-1}
    m_norm: Tensor  # (B, N) row norms of ``addressed``
    k_norm: Tensor  # (B, R, 1)
    q: Tensor  # (B, R, N) (|k| + eps)(|M| + eps)
    cos: Tensor  # (B, R, N) Eq. 2
    wr: Tensor  # (B, R, N) w_r_t


def lrua_forward(memory: Tensor, usage: Tensor, read_weights: Tensor, heads: Heads, gamma: float,
                 zero_least_used: bool = True, read_after_write: bool = True):
    """:func:`mann.memory.lrua_step` (same arguments, same results), keeping what the backward needs.

    Returns:
        ``(memory, usage, read_weights, reads)`` at step t, and the :class:`Tape`.
    """
    keys, alpha, content, strength = heads
    lu, slot = mem.least_used(usage, keys.shape[1])  # Eq. 6
    gate = torch.sigmoid(alpha).unsqueeze(-1)  # (B, R, 1)
    diff = read_weights - lu.unsqueeze(1)
    ww = torch.addcmul(lu.unsqueeze(1), gate, diff)  # Eq. 7
    written = mem.write(mem.zero_rows(memory, slot) if zero_least_used else memory, ww, content)  # Eq. 8
    addressed = written if read_after_write else memory
    m_norm = addressed.norm(dim=-1)
    k_norm = keys.norm(dim=-1, keepdim=True)
    q = (k_norm + EPS) * (m_norm + EPS).unsqueeze(1)
    cos = torch.bmm(keys, addressed.transpose(1, 2)).div_(q)  # Eq. 2
    wr = torch.softmax(cos if strength is None else cos * strength.unsqueeze(-1), dim=-1)  # Eq. 3
    reads = mem.read(written, wr)  # Eq. 4
    tape = Tape(keys, content, strength, gate, diff, slot if zero_least_used else None, ww, written, addressed,
                m_norm, k_norm, q, cos, wr)
    return (written, mem.update_usage(usage, wr, ww, gamma), wr, reads), tape  # Eq. 5


def lrua_backward(tape: Tape, d_memory: Tensor, d_usage: Tensor, d_wr: Tensor, d_reads: Tensor, gamma: float):
    """The backward of :func:`lrua_forward`: the gradients of its four outputs in, of its inputs out.

    Returns:
        ``(g_keys, g_content, g_alpha, g_strength or None, g_memory, g_usage, g_read_weights)``; with the key
        written (``content is keys``), the key's full gradient is ``g_keys + g_content``.
    """
    keys, content, strength, gate, diff, slot, ww, written, addressed, m_norm, k_norm, q, cos, wr = tape
    du = d_usage.unsqueeze(1)  # (B, 1, N)
    g_wr = torch.baddbmm(d_wr + du, d_reads, written.transpose(1, 2))  # read (Eq. 4) and usage (Eq. 5)
    g_logit = wr * (g_wr - (g_wr * wr).sum(-1, keepdim=True))  # softmax (Eq. 3)
    g_strength = None
    if strength is not None:
        g_strength = (g_logit * cos).sum(-1)
        g_logit = g_logit * strength.unsqueeze(-1)
    # cosine (Eq. 2): cos = D / q with D = k M^T and q = (|k| + eps)(|M| + eps); d|x|/dx = x/|x|, 0 at 0
    g_d = g_logit / q
    g_q = -(g_logit * cos) / q
    g_knorm = (g_q * (m_norm + EPS).unsqueeze(1)).sum(-1, keepdim=True)  # (B, R, 1)
    g_mnorm = (g_q * (k_norm + EPS)).sum(1)  # (B, N)
    g_keys = torch.bmm(g_d, addressed).addcmul_(g_knorm / k_norm.clamp_min(1e-30), keys)
    g_addressed = torch.bmm(g_d.transpose(1, 2), keys).addcmul_((g_mnorm / m_norm.clamp_min(1e-30)).unsqueeze(-1),
                                                               addressed)
    g_written = torch.baddbmm(d_memory, wr.transpose(1, 2), d_reads)  # the next step and the read (Eq. 4)
    if addressed is written:
        g_written += g_addressed
    # write (Eq. 8) and write weights (Eq. 7)
    g_ww = torch.bmm(content, g_written.transpose(1, 2)).add_(du)  # (B, R, N)
    g_memory = g_written if slot is None else mem.zero_rows(g_written, slot)
    if addressed is not written:
        g_memory = g_memory + g_addressed
    g_alpha = (g_ww * diff).sum(-1) * (gate * (1 - gate)).squeeze(-1)
    return g_keys, torch.bmm(ww, g_written), g_alpha, g_strength, g_memory, d_usage * gamma, g_ww * gate


class LRUAStep(torch.autograd.Function):
    """:func:`mann.memory.lrua_step` as one autograd node (:func:`lrua_forward`, :func:`lrua_backward`).

    Args: ``memory, usage, read_weights`` as in ``lrua_step``; ``keys, alpha, content, strength`` the fields of
    :class:`~mann.memory.Heads` (``strength`` may be None); ``gamma, zero_least_used, read_after_write``.
    """

    @staticmethod
    def forward(ctx, memory, usage, read_weights, keys, alpha, content, strength, gamma: float, zero: bool,
                after: bool):
        outs, tape = lrua_forward(memory, usage, read_weights, Heads(keys, alpha, content, strength), gamma, zero,
                                  after)
        ctx.gamma, ctx.after = gamma, after
        ctx.save_for_backward(*tape)  # the None fields (strength, slot) come back as None
        return outs

    @staticmethod
    def backward(ctx, *grads):
        tape = Tape(*ctx.saved_tensors)
        if ctx.after:  # saved tensors come back as new objects: `addressed is written` tells lrua_backward the reading
            tape = tape._replace(addressed=tape.written)
        ref = (tape.written, tape.m_norm, tape.wr, tape.keys)  # the outputs' shapes
        grads = [torch.zeros_like(r) if g is None else g for g, r in zip(grads, ref)]
        g_keys, g_content, g_alpha, g_strength, g_memory, g_usage, g_wr = lrua_backward(tape, *grads, ctx.gamma)
        return g_memory, g_usage, g_wr, g_keys, g_alpha, g_content, g_strength, None, None, None


def head_backward(tape: Tape, strength_slope: Tensor | None, g_keys, g_content, g_alpha, g_strength,
                  add: bool) -> Tensor:
    """The head layer's nonlinearities backward (:func:`mann.memory.split_heads`): ``[B, P]``, the gradient of its
    output. ``strength_slope``: ``[B, R]`` sigmoid of the strength's pre-activation (softplus')."""
    B = g_alpha.shape[0]
    keys, content = tape.keys, tape.content
    if not add:
        g_keys = g_keys + g_content
    parts = [(g_keys * (1 - keys * keys)).reshape(B, -1), g_alpha]
    if add:
        parts.append((g_content * (1 - content * content)).reshape(B, -1))
    if g_strength is not None:
        parts.append(g_strength * strength_slope)
    return torch.cat(parts, 1)


def sequence_forward_step(x_t, w_rec_t, w_head_t, b_head, h, c, memory, usage, wr, reads, reading: Reading):
    """One step of :class:`MANNSequence` without autograd: :meth:`mann.model.MANN.step` with the LSTM controller
    and :func:`lrua_forward`. Shapes as in :class:`~mann.model.MANNState`; ``x_t``: ``[B, 4H]``, ``w_rec_t``:
    ``[R*W + H, 4H]``, ``w_head_t``: ``[H, P]``.

    Returns:
        ``(h, c, memory, usage, wr, reads)`` at step t and the tuple of what the backward step needs.
    """
    B, R, W = reads.shape
    H = h.shape[1]
    z = torch.cat([reads.reshape(B, R * W), h], 1)  # (B, RW + H)
    gates = torch.addmm(x_t, z, w_rec_t)
    sg = torch.sigmoid(gates)
    i, f, o = sg[:, :H], sg[:, H : 2 * H], sg[:, 3 * H :]
    g = torch.tanh(gates[:, 2 * H : 3 * H])
    c_prev = c
    c = torch.addcmul(f * c_prev, i, g)
    tc = torch.tanh(c)
    h = o * tc
    out = torch.addmm(b_head, h, w_head_t)
    heads = mem.split_heads(out, R, W, reading.add, reading.strength)
    slope = torch.sigmoid(out[:, -R:]) if reading.strength else None
    state, tape = lrua_forward(memory, usage, wr, heads, reading.gamma, reading.zero_least_used,
                               reading.read_after_write)
    return (h, c, *state), (z, sg, g, c_prev, tc, tape, slope)


def sequence_backward_step(saved, d_h, d_reads, carry, w_rec, w_head, reading: Reading):
    """The backward of :func:`sequence_forward_step` through time: ``carry`` = ``(dh, dreads, dc, dmemory,
    dusage, dwr)`` from step t+1 in, for step t-1 out.

    Returns:
        the new carry, ``d_gates [B, 4H]`` (the gradient of ``x_t``) and ``d_out [B, P]`` (of the head layer).
    """
    z, sg, g, c_prev, tc, tape, slope = saved
    dh_next, dr_next, dc, dm, du, dwr = carry
    B, R, W = tape.keys.shape
    H = c_prev.shape[1]
    g_keys, g_content, g_alpha, g_strength, dm, du, dwr = lrua_backward(tape, dm, du, dwr, d_reads + dr_next,
                                                                        reading.gamma)
    d_out = head_backward(tape, slope, g_keys, g_content, g_alpha, g_strength, reading.add)
    dh = d_h + dh_next + d_out @ w_head
    # the LSTM cell
    i, f, o = sg[:, :H], sg[:, H : 2 * H], sg[:, 3 * H :]
    dc = torch.addcmul(dc, dh * o, 1 - tc * tc)
    d_act = sg * (1 - sg)  # sigmoid' of the i, f, o blocks; the g block is replaced by tanh'
    d_act[:, 2 * H : 3 * H] = 1 - g * g
    d_gates = torch.cat([dc * g, dc * c_prev, dc * i, dh * tc], 1).mul_(d_act)
    dz = d_gates @ w_rec
    return (dz[:, R * W :], dz[:, : R * W].reshape(B, R, W), dc * f, dm, du, dwr), d_gates, d_out


class MANNSequence(torch.autograd.Function):
    """A whole episode of the LSTM-controlled MANN as one autograd node, for every reading: the forward runs all
    T steps without building a graph (:func:`sequence_forward_step`), the backward runs back through time by hand
    (:func:`sequence_backward_step`); the recurrent and head weight gradients are one product each over all steps.
    On CPU both time loops run in C++ where :func:`extension` builds.

    Args:
        x_proj: ``[B, T, 4H]`` the hoisted input projection (bias included).
        w_rec: ``[4H, R*W + H]`` recurrent weight on ``[r_{t-1}, h_{t-1}]``.
        w_head: ``[P, H]`` and ``b_head``: ``[P]`` the head layer (:func:`mann.memory.head_layout`).
        h, c, memory, usage, wr, reads: the initial :class:`~mann.model.MANNState` (they get gradients too).
        reading: the :class:`~mann.memory.Reading`.

    Returns:
        ``(h [B, T, H], reads [B, T, R*W])``.
    """

    @staticmethod
    def forward(ctx, x_proj, w_rec, w_head, b_head, h, c, memory, usage, wr, reads, reading: Reading):
        B = x_proj.shape[0]
        state = (h, c, memory, usage, wr, reads)
        w_rec_t, w_head_t = w_rec.t().contiguous(), w_head.t().contiguous()
        ctx.reading = reading
        ctx.save_for_backward(w_rec, w_head)
        ext = extension() if x_proj.device.type == "cpu" else None
        ctx.ext = ext
        if ext is not None:  # the same steps with the time loop in C++
            key = (tuple(x_proj.shape), tuple(memory.shape), tuple(wr.shape), x_proj.dtype,
                   (reading.zero_least_used, reading.read_after_write, reading.add, reading.strength))
            pool = _WORKSPACES.setdefault(key, [])
            hs, rs, *saved = ext.sequence_forward(x_proj, w_rec_t, w_head_t, b_head, *state, *reading,
                                                  pool.pop() if pool else [])
            if any(ctx.needs_input_grad):
                ctx.saved, ctx.hs, ctx.recycle = saved, hs, _Recycle(saved, pool)
            else:
                _give_back(pool, saved)  # nothing will read them: the next call may write over them
            return hs.transpose(0, 1), rs.transpose(0, 1)
        hs, rs, saved = [], [], []
        for x_t in x_proj.unbind(1):
            state, tape = sequence_forward_step(x_t, w_rec_t, w_head_t, b_head, *state, reading)
            hs.append(state[0])
            rs.append(state[5].reshape(B, -1))
            saved.append(tape)
        ctx.saved, ctx.hs = saved, hs
        return torch.stack(hs, 1), torch.stack(rs, 1)

    @staticmethod
    def backward(ctx, d_hs, d_rs):
        w_rec, w_head = (w.contiguous() for w in ctx.saved_tensors)
        saved, hs = ctx.saved, ctx.hs
        if ctx.ext is not None:
            g_x, g_w_rec, g_w_head, g_b_head, *g_state = ctx.ext.sequence_backward(saved, hs, d_hs, d_rs, w_rec,
                                                                                   w_head, *ctx.reading)
            return (g_x, g_w_rec, g_w_head, g_b_head, *g_state, None)
        B, T, H = d_hs.shape
        R, W, N = saved[0][5].keys.shape[1], saved[0][5].keys.shape[2], saved[0][5].written.shape[1]
        d_rs = d_rs.reshape(B, T, R, W)
        new = d_hs.new_zeros
        carry = (new(B, H), new(B, R, W), new(B, H), new(B, N, W), new(B, N), new(B, R, N))
        d_gates, d_out = [None] * T, [None] * T
        for t in range(T - 1, -1, -1):
            carry, d_gates[t], d_out[t] = sequence_backward_step(saved[t], d_hs[:, t], d_rs[:, t], carry, w_rec,
                                                                 w_head, ctx.reading)
        d_out, d_gates = torch.cat(d_out), torch.cat(d_gates)  # (T*B, P), (T*B, G), step-major
        g_w_rec = d_gates.t() @ torch.cat([step[0] for step in saved])
        g_w_head = d_out.t() @ torch.cat(hs)
        dh, dr, dc, dm, du, dwr = carry
        return (d_gates.view(T, B, -1).transpose(0, 1), g_w_rec, g_w_head, d_out.sum(0), dh, dc, dm, du, dwr, dr,
                None)
