"""Hawk's recurrent block (Griffin/RecurrentGemma's RG-LRU) in plain PyTorch, for packed sequences.

femr 0.2.4 runs it through the `torch_hawk` CUDA/C++ kernels; this is the same computation with
no compiled code, so a converted femr model runs on any CPU. Sequences are packed: `segment_ids`
(T,) names each token's sequence, and neither the convolution nor the recurrence crosses a change
of segment (a token whose segment differs from the previous token's starts afresh).

The block (`RecurrentBlock`), for x (T, width):

    y = gelu_tanh(linear_y(x))
    u = conv(linear_x(x))          causal, 4 taps: u'[t] = b + sum_s w[3 - s] * u[t - s]
    u = rg_lru(u)                  h[t] = a[t] * h[t-1] + sqrt(1 - a[t]^2) * sigmoid(gx[t]) * u[t]
    out = linear_out(u * y)        with a[t] = exp(-8 * sigmoid(ga[t]) * softplus(a_param))

where gx, ga are block-diagonal linear maps of u (one block per head); at a segment's first token
a = 0 and the input is not scaled. `linear_scan` solves h[t] = a[t] h[t-1] + x[t] by chunks
(every chunk scanned at once, then the carries passed along); `sequential_scan` is the
step-by-step reference it equals.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONV_TAPS = 4


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """(T,) bool: True where a token starts a segment (the first token, or a change of segment)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[1:] = segment_ids[1:] != segment_ids[:-1]
    return starts


def sequential_scan(log_a: torch.Tensor, x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Reference: h[t] = exp(log_a[t]) h[t-1] + x[t], h = x at segment starts. (T, D) -> (T, D)."""
    out = torch.empty_like(x)
    state = torch.zeros_like(x[0])
    for t in range(x.shape[0]):
        decay = torch.zeros_like(state) if starts[t] else torch.exp(log_a[t])
        state = decay * state + x[t]
        out[t] = state
    return out


def linear_scan(log_a: torch.Tensor, x: torch.Tensor, starts: torch.Tensor,
                chunk: int | None = None) -> torch.Tensor:
    """`sequential_scan` in chunks (default about sqrt(T) tokens each), all chunks at once:
    a scan inside every chunk from a zero state, also tracking the product of the decays, then
    one pass over the chunks adding each one's carried-in state times that product. About
    2 sqrt(T) small steps instead of T; a = 0 at segment starts cuts every carry there."""
    length, width = x.shape
    decays = torch.exp(log_a).masked_fill(starts[:, None], 0.0)
    size = chunk or max(1, math.isqrt(length))
    count = -(-length // size)
    pad = count * size - length  # zero decays and inputs after the end change nothing before it
    a = F.pad(decays, (0, 0, 0, pad)).view(count, size, width)  # (chunks, C, D)
    xs = F.pad(x, (0, 0, 0, pad)).view(count, size, width)
    local, product = torch.empty_like(xs), torch.empty_like(a)
    state, running = xs[:, 0], a[:, 0]
    local[:, 0], product[:, 0] = state, running
    for step in range(1, size):
        state = a[:, step] * state + xs[:, step]
        running = a[:, step] * running
        local[:, step], product[:, step] = state, running
    carried = torch.empty(count, width, dtype=x.dtype, device=x.device)
    carry = torch.zeros(width, dtype=x.dtype, device=x.device)
    for index in range(count):
        carried[index] = carry
        carry = local[index, -1] + product[index, -1] * carry
    return (local + product * carried[:, None, :]).reshape(count * size, width)[:length]


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                segment_ids: torch.Tensor) -> torch.Tensor:
    """(T, D) -> (T, D): out[t] = bias + sum_s weight[taps-1-s] * x[t-s] within t's segment."""
    taps = weight.shape[0]
    out = bias.expand_as(x).clone()
    for shift in range(taps):
        shifted = torch.zeros_like(x)
        same = torch.zeros_like(segment_ids, dtype=torch.bool)
        shifted[shift:] = x[:x.shape[0] - shift]
        same[shift:] = segment_ids[shift:] == segment_ids[:segment_ids.shape[0] - shift]
        out = out + shifted * same[:, None] * weight[taps - 1 - shift]
    return out


def block_diagonal(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(T, H*B) through H independent (B, B) maps: weight (H, B, B), bias (H, B)."""
    heads, width = weight.shape[0], weight.shape[1]
    blocks = x.reshape(x.shape[0], heads, width)  # (T, H, B)
    return (torch.einsum("thi,hij->thj", blocks, weight) + bias).reshape(x.shape)


class RecurrentBlock(nn.Module):
    """Hawk's recurrent block (see the module docstring); parameter names are ours, shapes
    torch_hawk's (`ehrmotor.convert.femr_folder` maps femr's names)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not a multiple of num_heads {num_heads}")
        block = width // num_heads
        self.linear_x = nn.Linear(width, width)
        self.linear_y = nn.Linear(width, width)
        self.linear_out = nn.Linear(width, width)
        self.conv_weight = nn.Parameter(torch.zeros(CONV_TAPS, width))
        self.conv_bias = nn.Parameter(torch.zeros(width))
        self.a_param = nn.Parameter(torch.zeros(width))
        self.input_gate_weight = nn.Parameter(torch.zeros(num_heads, block, block))
        self.input_gate_bias = nn.Parameter(torch.zeros(num_heads, block))
        self.a_gate_weight = nn.Parameter(torch.zeros(num_heads, block, block))
        self.a_gate_bias = nn.Parameter(torch.zeros(num_heads, block))
        nn.init.normal_(self.conv_weight, std=math.sqrt(0.01 / CONV_TAPS))

    def rg_lru(self, u: torch.Tensor, segment_ids: torch.Tensor, sequential: bool = False
               ) -> torch.Tensor:
        """The RG-LRU over u (T, width), restarting at each segment."""
        starts = segment_starts(segment_ids)
        gate_x = torch.sigmoid(block_diagonal(u, self.input_gate_weight, self.input_gate_bias))
        gate_a = torch.sigmoid(block_diagonal(u, self.a_gate_weight, self.a_gate_bias))
        log_a = -8.0 * gate_a * F.softplus(self.a_param)  # (T, width), <= 0
        scale = torch.sqrt(1 - torch.exp(2 * log_a))
        scale = torch.where(starts[:, None], torch.ones_like(scale), scale)
        inputs = u * gate_x * scale
        scan = sequential_scan if sequential else linear_scan
        return scan(log_a, inputs, starts)

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor, sequential: bool = False
                ) -> torch.Tensor:
        """x (T, width), segment_ids (T,) -> (T, width); sequential=True uses the reference scan."""
        y = F.gelu(self.linear_y(x), approximate="tanh")
        u = causal_conv(self.linear_x(x), self.conv_weight, self.conv_bias, segment_ids)
        return self.linear_out(self.rg_lru(u, segment_ids, sequential) * y)
