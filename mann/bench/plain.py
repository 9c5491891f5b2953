"""A plain step-by-step port of the paper's MANN, written straight from the equations the way public ports are
(an ``nn.LSTMCell`` fed ``[x_t, y_{t-1}, r_{t-1}]`` every step, one_hot and einsum memory ops, the output layer
inside the loop). It is the benchmarks' baseline, not the model: ``mann.model.MANN`` is what trains.

:meth:`PlainMANN.from_model` copies a ``MANN``'s weights, so the two compute the same function (a test checks
forward outputs and gradients agree)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..model import MANN


class PlainMANN(nn.Module):
    def __init__(self, input_size: int, output_size: int, hidden: int, slots: int, width: int, heads: int,
                 gamma: float, init_value: float = 1e-6):
        super().__init__()
        self.N, self.W, self.R, self.H, self.gamma, self.init = slots, width, heads, hidden, gamma, init_value
        self.cell = nn.LSTMCell(input_size + heads * width, hidden)
        self.head = nn.Linear(hidden, heads * width + heads)
        self.output = nn.Linear(hidden + heads * width, output_size)

    @classmethod
    def from_model(cls, model: MANN) -> "PlainMANN":
        m = model.cfg.memory
        paper = (model.use_memory and model.lstm and m.write_content == "key" and m.key_strength == "none"
                 and m.read_after_write and m.zero_least_used)
        if not paper:
            raise ValueError("--compare-plain: the plain port implements the paper's reading only (LSTM controller, "
                             "write_content key, key_strength none, read_after_write and zero_least_used true)")
        d_in = model.input_proj.in_features
        plain = cls(d_in, model.output.out_features, model.hidden, m.slots, m.width, m.read_heads, m.gamma,
                    m.init_value)
        RW = m.read_heads * m.width
        with torch.no_grad():
            plain.cell.weight_ih.copy_(torch.cat([model.input_proj.weight, model.recurrent.weight[:, :RW]], 1))
            plain.cell.weight_hh.copy_(model.recurrent.weight[:, RW:])
            plain.cell.bias_ih.copy_(model.input_proj.bias)
            plain.cell.bias_hh.zero_()
            plain.head.load_state_dict(model.head.state_dict())
            plain.output.load_state_dict(model.output.state_dict())
        return plain

    def forward(self, inputs: Tensor) -> Tensor:
        B, T, _ = inputs.shape
        N, W, R, H = self.N, self.W, self.R, self.H
        h = inputs.new_zeros(B, H)
        c = inputs.new_zeros(B, H)
        M = inputs.new_full((B, N, W), self.init)
        usage = inputs.new_zeros(B, N)
        wr = inputs.new_full((B, R, N), 1.0 / N)
        r = inputs.new_full((B, R, W), self.init)
        outs = []
        for t in range(T):
            h, c = self.cell(torch.cat([inputs[:, t], r.reshape(B, -1)], -1), (h, c))
            o = self.head(h)
            k = torch.tanh(o[:, : R * W]).view(B, R, W)
            alpha = torch.sigmoid(o[:, R * W :]).unsqueeze(-1)
            lu_idx = torch.argsort(usage, dim=-1, stable=True)[:, :R]
            w_lu = F.one_hot(lu_idx, N).sum(1).to(inputs.dtype)
            ww = alpha * wr + (1 - alpha) * w_lu.unsqueeze(1)
            M = M * (1 - F.one_hot(usage.argmin(-1), N).to(inputs.dtype)).unsqueeze(-1)
            M = M + torch.einsum("brn,brw->bnw", ww, k)
            sim = torch.einsum("brw,bnw->brn", k, M)
            sim = sim / ((k.norm(dim=-1, keepdim=True) + 1e-8) * (M.norm(dim=-1).unsqueeze(1) + 1e-8))
            wr = torch.softmax(sim, -1)
            r = torch.einsum("brn,bnw->brw", wr, M)
            usage = self.gamma * usage + wr.sum(1) + ww.sum(1)
            outs.append(self.output(torch.cat([h, r.reshape(B, -1)], -1)))
        return torch.stack(outs, 1)
