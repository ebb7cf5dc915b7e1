"""xformers.ops as femr 0.2.4 uses it: block-diagonal causal local masks and attention (SDPA).

`BlockDiagonalMask.from_seqlens(lengths).make_local_attention(width)` is xformers'
BlockDiagonalCausalLocalAttentionMask: a query at position i of a block attends to keys j of the
same block with i - width < j <= i (width keys, itself included).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class AttentionBias:
    """Base class, as in xformers (femr tests `isinstance(bias, AttentionBias)`)."""


class BlockDiagonalMask(AttentionBias):
    def __init__(self, seqlens: list[int], window: int | None = None) -> None:
        self.seqlens = [int(n) for n in seqlens]
        self.window = window

    @classmethod
    def from_seqlens(cls, seqlens: list[int]) -> BlockDiagonalMask:
        return cls(seqlens)

    def make_local_attention(self, window_size: int) -> BlockDiagonalMask:
        return BlockDiagonalMask(self.seqlens, int(window_size))

    def materialize(self, shape: tuple[int, ...], device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        block = torch.repeat_interleave(torch.arange(len(self.seqlens)),
                                        torch.tensor(self.seqlens)).to(device)
        n = block.shape[0]
        pos = torch.arange(n, device=device)
        allowed = (block[:, None] == block[None, :]) & (pos[None, :] <= pos[:, None])
        if self.window is not None:
            allowed &= pos[None, :] > pos[:, None] - self.window
        bias = torch.zeros((n, n), dtype=dtype, device=device)
        bias.masked_fill_(~allowed, float("-inf"))
        return bias.expand(shape)


def memory_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               attn_bias: BlockDiagonalMask) -> torch.Tensor:
    """(B, M, H, K) inputs as xformers takes them; SDPA with the materialized mask."""
    b, m, h, _ = q.shape
    mask = attn_bias.materialize((b, h, m, m), device=q.device, dtype=q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


fmha = SimpleNamespace(attn_bias=SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask))
