"""Causal local attention over packed sequences that never crosses subjects.

A packed sequence holds T tokens of several subjects one after another; `segment_ids` (T,) gives
each token's subject index in the pack (a subject's tokens are contiguous). Token i attends to
token j iff

    segment_ids[i] == segment_ids[j]  and  i - width < j <= i

(causal, itself included, at most `width` tokens). Every function takes q, k, v of shape
(T, H, D) and returns (T, H, D), scaled by 1/sqrt(D).

- `blockwise_local_attention`: CPU and GPU, memory O(T · width): each block of queries attends to
  its own block of keys and the blocks just before it, through `scaled_dot_product_attention`.
- `flex_local_attention`: CUDA only, FlexAttention with a block-sparse mask (`local_block_mask`);
  uncompiled (`compiled=False`) it also runs forward on CPU, which is how CI checks its mask.
- `local_attention`: picks one of them (`backend="auto"`: flex for CUDA tensors, else blockwise).

The dense (T, T) reference both are proven equal to lives with the tests
(`tests/model_reference.py`, `naive_local_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ehrmotor.config import BACKENDS  # names of the `local_attention` backends

# Query block of the blockwise attention. At width 496 a block of 256 computes 768 scores per
# query where 496 did 992: forward + backward 1.7-1.8× faster on CPU (Xeon, 1 thread, 2,048
# packed tokens, 4 heads of 16 and of 64; blocks of 128, 64 and 32 were no faster overall).
DEFAULT_BLOCK_SIZE = 256


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                  width: int) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape (T, H, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if segment_ids.shape != q.shape[:1]:
        raise ValueError(f"segment_ids must have shape ({q.shape[0]},); got "
                         f"{tuple(segment_ids.shape)}")
    if width < 1:
        raise ValueError(f"attention width must be at least 1; got {width}")


def blockwise_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              segment_ids: torch.Tensor, width: int = 496,
                              block_size: int | None = None) -> torch.Tensor:
    """Local attention block by block; memory O(T · (width + block_size)).

    Queries are cut into blocks of `block_size` (default: `DEFAULT_BLOCK_SIZE`, at most `width`
    and T). Query block n sees
    key blocks n - lookback .. n, with lookback = ceil((width - 1) / block_size), which cover every
    key within `width`; a boolean mask on positions and segments keeps exactly the allowed pairs.
    T is padded up to a multiple of the block size; padded queries attend only to themselves, so
    no row is fully masked and no NaN reaches the gradients.
    """
    _check_inputs(q, k, v, segment_ids, width)
    length, heads, head_dim = q.shape
    if length == 0:
        return q.clone()
    block = block_size or min(DEFAULT_BLOCK_SIZE, width, length)
    lookback = math.ceil((width - 1) / block)
    blocks = math.ceil(length / block)
    padded = blocks * block
    window = (lookback + 1) * block  # keys seen by one query block

    query_blocks = F.pad(q, (0, 0, 0, 0, 0, padded - length))
    query_blocks = query_blocks.view(blocks, block, heads, head_dim).transpose(1, 2)  # (n, H, B, D)
    # (T, H, D) -> (lookback·block + padded, H, D): `lookback` empty blocks first, then tail
    padded_k, padded_v = (F.pad(x, (0, 0, 0, 0, lookback * block, padded - length))
                          for x in (k, v))
    groups = block_plan(segment_ids, width, block)
    if len(groups) == 1:
        keys, _, allowed, _ = groups[0]
        # unfold puts the window last: (n, H, D, window) -> (n, H, window, D), its last `keys`
        key_blocks, value_blocks = (x.unfold(0, window, block).permute(0, 1, 3, 2)[:, :, -keys:]
                                    for x in (padded_k, padded_v))
        out = F.scaled_dot_product_attention(query_blocks, key_blocks, value_blocks,
                                             attn_mask=allowed)  # (n, H, B, D)
    else:  # each group of query blocks sees only the key blocks its subjects reach back to
        outs, order = [], []
        for keys, chosen, allowed, key_index in groups:
            key_blocks, value_blocks = (  # (blocks in group, H, keys, D)
                x.index_select(0, key_index).view(len(chosen), keys, heads, head_dim)
                .transpose(1, 2) for x in (padded_k, padded_v))
            outs.append(F.scaled_dot_product_attention(
                query_blocks.index_select(0, chosen), key_blocks, value_blocks,
                attn_mask=allowed))
            order.append(chosen)
        out = torch.cat(outs)[torch.argsort(torch.cat(order))]  # (n, H, B, D)
    return out.transpose(1, 2).reshape(padded, heads, head_dim)[:length]


# The last plan built and what it was built for: every layer of one forward pass (and its
# recomputation under activation checkpointing) asks for the same one.
Plan = list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
_last_plan: tuple[torch.Tensor, tuple[int, int, int], Plan] | None = None


def block_plan(segment_ids: torch.Tensor, width: int, block: int) -> Plan:
    """The query blocks of `blockwise_local_attention` grouped by how far back their subjects
    reach: [(keys, block indices, mask (blocks in group, 1, block, keys), key positions)], the
    mask saying which of the last `keys` keys of its window each padded query may see, the
    positions those keys have in the keys padded by `lookback` blocks in front (flat). Outside
    torch.compile the last plan is reused for the same `segment_ids` tensor (same object,
    unmodified) and sizes; under it, one group sees the whole window."""
    global _last_plan
    if torch.compiler.is_compiling():
        allowed = block_mask(segment_ids, width, block)
        every_block = torch.arange(allowed.shape[0], device=allowed.device)
        return [(allowed.shape[-1], every_block, allowed, every_block)]
    key = (segment_ids._version, width, block)
    if _last_plan is not None and _last_plan[0] is segment_ids and _last_plan[1] == key:
        return _last_plan[2]
    allowed = block_mask(segment_ids, width, block)
    blocks, window = allowed.shape[0], allowed.shape[-1]
    # keys (from the window's end) the first query of each block needs: its subject's start
    # or width - 1 back, whichever is later; later queries need no earlier keys
    length = segment_ids.shape[0]
    position = torch.arange(length, device=segment_ids.device)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[1:] = segment_ids[1:] != segment_ids[:-1]
    subject_start = torch.cummax(torch.where(is_start, position, 0), 0).values
    first = torch.arange(blocks, device=position.device) * block
    earliest = torch.maximum(subject_start[first], first - width + 1)
    needed = (torch.div(first - earliest + block - 1, block, rounding_mode="floor") + 1) * block
    plan: Plan = []
    for keys in sorted(set(needed.tolist())):
        chosen = torch.nonzero(needed == keys).flatten()
        start = chosen * block + window - keys  # window of block n: [n·block, n·block + window)
        key_index = (start[:, None] + torch.arange(keys, device=start.device)).flatten()
        plan.append((keys, chosen, allowed[chosen][..., -keys:], key_index))
    _last_plan = (segment_ids, key, plan)
    return plan


def block_mask(segment_ids: torch.Tensor, width: int, block: int) -> torch.Tensor:
    """(blocks, 1, block, window) bool: which keys of its window each padded query may see
    (see `blockwise_local_attention`)."""
    length, device = segment_ids.shape[0], segment_ids.device
    lookback = math.ceil((width - 1) / block)
    blocks = math.ceil(length / block)
    padded = blocks * block
    window = (lookback + 1) * block
    block_start = torch.arange(blocks, device=device)[:, None] * block
    query_position = block_start + torch.arange(block, device=device)  # (n, B)
    key_position = block_start - lookback * block + torch.arange(window, device=device)
    distance = query_position[:, :, None] - key_position[:, None, :]  # (n, B, window)
    segments = F.pad(segment_ids, (lookback * block, padded - length))
    query_segment = segments[lookback * block:].view(blocks, block)
    key_segment = segments.unfold(0, window, block)  # (n, window)
    allowed = (distance >= 0) & (distance < width) & (key_position[:, None, :] >= 0)
    allowed &= query_segment[:, :, None] == key_segment[:, None, :]
    query_is_padding = query_position >= length
    allowed &= ~query_is_padding[:, :, None]
    allowed |= (distance == 0) & query_is_padding[:, :, None]
    return allowed[:, None]

_compiled_flex_attention: Callable[..., Any] | None = None


def _flex_attention() -> Callable[..., Any]:
    """FlexAttention compiled once per process (uncompiled, it materialises the full scores)."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def flex_available() -> bool:
    """Whether FlexAttention can run here: CUDA present and the module importable."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def local_mask_mod(segment_ids: torch.Tensor, width: int) -> Callable[..., torch.Tensor]:
    """FlexAttention mask_mod(batch, head, query, key) -> whether query may attend to key."""

    def same_subject_within_width(batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor,
                                  key: torch.Tensor) -> torch.Tensor:
        near = (key <= query) & (query - key < width)
        return near & (segment_ids[query] == segment_ids[key])

    return same_subject_within_width


def local_block_mask(segment_ids: torch.Tensor, width: int, device: torch.device,
                     compiled: bool = True) -> Any:
    """FlexAttention's BlockMask of `local_mask_mod` for T = len(segment_ids) queries and keys:
    the blocks holding an allowed pair (mask_mod applied within them, except in blocks where
    every pair is allowed); the others are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = segment_ids.shape[0]
    return create_block_mask(local_mask_mod(segment_ids.to(device), width), None, None,
                             length, length, device=device, _compile=compiled)


def flex_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         segment_ids: torch.Tensor, width: int = 496, *,
                         compiled: bool = True) -> torch.Tensor:
    """Local attention with FlexAttention and a block-sparse mask; CUDA tensors only, unless
    `compiled` is False: eager FlexAttention, which materialises the full scores and runs
    forward on CPU too (for tests of this path's mask; not for training)."""
    _check_inputs(q, k, v, segment_ids, width)
    if compiled and not q.is_cuda:
        raise ValueError("flex_local_attention needs CUDA tensors; on CPU use "
                         "blockwise_local_attention (or backend='auto')")
    block_mask = local_block_mask(segment_ids, width, q.device, compiled)
    if compiled:
        attend = _flex_attention()
    else:
        from torch.nn.attention.flex_attention import flex_attention as attend
    # (T, H, D) -> (1, H, T, D)
    out = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=block_mask)
    return out[0].transpose(0, 1)  # (T, H, D)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend `local_attention` uses for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "blockwise"
    return backend


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                    width: int = 496, backend: str = "auto") -> torch.Tensor:
    """Causal local attention within subjects: (T, H, D) -> (T, H, D); see the module docstring."""
    chosen = resolve_backend(backend, q.device)
    if chosen == "flex":
        return flex_local_attention(q, k, v, segment_ids, width)
    return blockwise_local_attention(q, k, v, segment_ids, width)
