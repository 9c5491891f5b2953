"""A plain step-by-step port of the MANN, written the way public ports are (an ``nn.LSTMCell`` fed
``[x_t, y_{t-1}, r_{t-1}]`` every step, the output layer inside the loop, plain autograd), on
:func:`mann.memory.lrua_step`. It is the benchmarks' baseline, not the model: ``mann.model.MANN`` is what trains.

:meth:`PlainMANN.from_model` copies an LSTM-controlled ``MANN``'s weights (any reading), so the two compute the
same function (``tests/test_conformance.py`` checks outputs and gradients)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import memory as mem
from ..model import MANN, MANNState


class PlainMANN(nn.Module):
    def __init__(self, input_size: int, output_size: int, hidden: int, slots: int, width: int, heads: int,
                 reading: mem.Reading, init_value: float = 1e-6):
        super().__init__()
        self.N, self.W, self.R, self.H, self.reading, self.init = slots, width, heads, hidden, reading, init_value
        self.cell = nn.LSTMCell(input_size + heads * width, hidden)
        self.head = nn.Linear(hidden, mem.head_layout(heads, width, reading.add, reading.strength))
        self.output = nn.Linear(hidden + heads * width, output_size)

    @classmethod
    def from_model(cls, model: MANN) -> "PlainMANN":
        if not (model.use_memory and model.lstm):
            raise ValueError("--compare-plain: the plain port has an LSTM controller and a memory "
                             "(model.kind mann, controller.kind lstm)")
        m = model.cfg.memory
        plain = cls(model.input_proj.in_features, model.output.out_features, model.hidden, m.slots, m.width,
                    m.read_heads, model.reading, m.init_value)
        RW = m.read_heads * m.width
        with torch.no_grad():
            plain.cell.weight_ih.copy_(torch.cat([model.input_proj.weight, model.recurrent.weight[:, :RW]], 1))
            plain.cell.weight_hh.copy_(model.recurrent.weight[:, RW:])
            plain.cell.bias_ih.copy_(model.input_proj.bias)
            plain.cell.bias_hh.zero_()
            plain.head.load_state_dict(model.head.state_dict())
            plain.output.load_state_dict(model.output.state_dict())
        return plain.to(model.output.weight)

    def forward(self, inputs: Tensor, state: MANNState | None = None) -> Tensor:
        B, T, _ = inputs.shape
        N, W, R, H, rd = self.N, self.W, self.R, self.H, self.reading
        if state is None:
            new = inputs.new_full
            state = MANNState(new((B, H), 0.0), new((B, H), 0.0), new((B, N, W), self.init), new((B, N), 0.0),
                              new((B, R, N), 1.0 / N), new((B, R, W), self.init))
        h, c, M, usage, wr, r = state
        outs = []
        for t in range(T):
            h, c = self.cell(torch.cat([inputs[:, t], r.reshape(B, -1)], -1), (h, c))
            heads = mem.split_heads(self.head(h), R, W, rd.add, rd.strength)
            r, (M, usage, wr) = mem.lrua_step(mem.LRUAState(M, usage, wr), heads, rd)
            outs.append(self.output(torch.cat([h, r.reshape(B, -1)], -1)))
        return torch.stack(outs, 1)
