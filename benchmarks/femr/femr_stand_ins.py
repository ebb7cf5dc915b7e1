"""Stand-ins that let femr 0.2.4 import and train on a CPU-only machine.

femr 0.2.4 imports `xformers.ops` (CUDA only) for its attention bias and memory-efficient
attention. `install()` puts a small `xformers` package into `sys.modules` before femr is imported:

- `xformers.ops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(lengths).make_local_attention(w)`:
  femr's mask, query i sees key j iff both lie in the same subject block and i - w < j <= i
  (xformers' BlockDiagonalCausalLocalAttentionMask); `materialize(shape)` gives its additive bias
  (0 allowed, -inf not) for femr's reference attention.
- `xformers.ops.memory_efficient_attention(q, k, v, attn_bias)`: the same attention through
  torch's `scaled_dot_product_attention` with a boolean mask, q, k, v of shape (1, T, H, D).

`use_sdpa_on_cpu()` routes femr's CPU attention (femr.models.xformers, which on CPU materialises
the float bias and runs its fp32 reference attention) through the SDPA stand-in instead, a fused
kernel like the xformers one femr uses on GPUs (`--femr-attention reference` keeps femr's own).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F


class AttentionBias:
    """Base class femr checks with isinstance."""


class BlockDiagonalMask(AttentionBias):
    """Subjects packed one after another; attention stays within a subject (causal, local)."""

    def __init__(self, lengths: Sequence[int], window: int | None = None) -> None:
        self.lengths = [int(length) for length in lengths]
        self.window = window

    @classmethod
    def from_seqlens(cls, lengths: Sequence[int]) -> BlockDiagonalMask:
        return cls(lengths)

    def make_local_attention(self, window: int) -> BlockDiagonalMask:
        return BlockDiagonalMask(self.lengths, window)

    def allowed(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(T, T) bool: query i may attend to key j."""
        lengths = torch.tensor(self.lengths, device=device)
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        position = torch.arange(len(segment), device=device)
        distance = position[:, None] - position[None, :]
        allowed = (segment[:, None] == segment[None, :]) & (distance >= 0)
        if self.window is not None:
            allowed &= distance < self.window
        return allowed

    def materialize(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        bias = torch.zeros(shape[-2:], dtype=dtype, device=device)
        bias.masked_fill_(~self.allowed(device), float("-inf"))
        return bias.expand(*shape)


def memory_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               attn_bias: BlockDiagonalMask) -> torch.Tensor:
    """(1, T, H, D) each -> (1, T, H, D), scaled by 1/sqrt(D), under femr's mask."""
    mask = attn_bias.allowed(q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def install() -> None:
    """Register the `xformers` stand-in package; call before importing femr.models."""
    package = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    fmha = types.ModuleType("xformers.ops.fmha")
    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    attn_bias.BlockDiagonalMask = BlockDiagonalMask  # type: ignore[attr-defined]
    fmha.attn_bias = attn_bias  # type: ignore[attr-defined]
    ops.fmha = fmha  # type: ignore[attr-defined]
    ops.AttentionBias = AttentionBias  # type: ignore[attr-defined]
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    package.ops = ops  # type: ignore[attr-defined]
    for module in (package, ops, fmha, attn_bias):
        sys.modules[module.__name__] = module


def use_sdpa_on_cpu() -> None:
    """Make femr's attention wrapper call the SDPA stand-in on CPU too."""
    import femr.models.transformer
    import femr.models.xformers

    def wrapper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_bias: BlockDiagonalMask) -> torch.Tensor:
        return memory_efficient_attention(q, k, v, attn_bias)

    femr.models.xformers.memory_efficient_attention_wrapper = wrapper
