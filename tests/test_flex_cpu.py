"""The FlexAttention path's block mask and mask_mod, checked on CPU (forward, uncompiled).

The compiled kernel runs on CUDA only (test_attention's CUDA tests cover it, with gradients);
its logic — which blocks `local_block_mask` keeps, which it marks full (no mask_mod applied
inside), and `local_mask_mod` within the others — is the same uncompiled, so CI checks it here
against the dense reference and the blockwise kernel.
"""

from __future__ import annotations

import pytest
import torch
from model_reference import naive_local_attention

from ehrmotor.model.attention import (
    blockwise_local_attention,
    flex_local_attention,
    local_block_mask,
    local_mask_mod,
)

flex = pytest.importorskip("torch.nn.attention.flex_attention",
                           reason="FlexAttention is not in this torch")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
HEADS, HEAD_DIM = 2, 16
CPU = torch.device("cpu")
CASES = [  # subject lengths packed one after another, attention width
    ([400, 1, 60, 39], 496),  # a long subject: blocks entirely allowed (full blocks)
    ([3, 1, 200, 90, 150], 7),  # narrow: most blocks skipped
    ([257, 1, 130], 200),  # blocks beyond the width skipped within one subject
]


def packed(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def allowed_pairs(segment_ids: torch.Tensor, width: int) -> torch.Tensor:
    """(T, T) bool: query i may attend to key j (the module docstring's rule, written out)."""
    position = torch.arange(segment_ids.shape[0])
    distance = position[:, None] - position[None, :]
    same = segment_ids[:, None] == segment_ids[None, :]
    return (distance >= 0) & (distance < width) & same


def listed_blocks(counts: torch.Tensor, indices: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """(query blocks, key blocks) bool from a BlockMask's per-row counts and indices."""
    dense = torch.zeros(counts.shape[-1], kv_blocks, dtype=torch.bool)
    for row, count in enumerate(counts[0, 0].tolist()):
        dense[row, indices[0, 0, row, :count].long()] = True
    return dense


def pairs_the_kernel_computes(segment_ids: torch.Tensor, width: int) -> torch.Tensor:
    """(T, T) bool: the pairs a block-sparse kernel attends with `local_block_mask`: mask_mod
    within the partial blocks, every pair within the full ones, none elsewhere."""
    length = segment_ids.shape[0]
    block_mask = local_block_mask(segment_ids, width, CPU, compiled=False)
    query_block, kv_block = block_mask.BLOCK_SIZE
    kv_blocks = -(-length // kv_block)
    partial = listed_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, kv_blocks)
    full = torch.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                             kv_blocks)
    assert not (partial & full).any()

    def per_pair(blocks: torch.Tensor) -> torch.Tensor:
        rows = blocks.repeat_interleave(query_block, 0).repeat_interleave(kv_block, 1)
        return rows[:length, :length]

    position = torch.arange(length)
    masked = local_mask_mod(segment_ids, width)(torch.tensor(0), torch.tensor(0),
                                                position[:, None], position[None, :])
    return (per_pair(partial) & masked) | per_pair(full)


@pytest.mark.parametrize(("lengths", "width"), CASES)
def test_block_mask_keeps_every_allowed_pair_and_full_blocks_are_full(
        lengths: list[int], width: int) -> None:
    segment_ids = packed(lengths)
    assert torch.equal(pairs_the_kernel_computes(segment_ids, width),
                       allowed_pairs(segment_ids, width))


def test_block_mask_skips_blocks_and_marks_full_ones() -> None:
    """The cases above exercise both kinds of block, so the equality there means something."""
    wide = local_block_mask(packed(CASES[0][0]), CASES[0][1], CPU, compiled=False)
    assert int(wide.full_kv_num_blocks.sum()) > 0
    narrow = local_block_mask(packed(CASES[1][0]), CASES[1][1], CPU, compiled=False)
    kv_blocks = -(-sum(CASES[1][0]) // narrow.BLOCK_SIZE[1])
    assert int(narrow.kv_num_blocks.sum()) < kv_blocks * (kv_blocks + 1) // 2


@pytest.mark.parametrize(("lengths", "width"), CASES)
def test_flex_forward_on_cpu_equals_naive_and_blockwise(lengths: list[int], width: int) -> None:
    segment_ids = packed(lengths)
    generator = torch.Generator().manual_seed(len(lengths) * width)
    q, k, v = (torch.randn(segment_ids.shape[0], HEADS, HEAD_DIM, generator=generator)
               for _ in range(3))
    actual = flex_local_attention(q, k, v, segment_ids, width, compiled=False)
    torch.testing.assert_close(actual, naive_local_attention(q, k, v, segment_ids, width),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(actual, blockwise_local_attention(q, k, v, segment_ids, width),
                               atol=1e-5, rtol=0)


def test_compiled_flex_still_refuses_cpu_tensors() -> None:
    q = torch.zeros(4, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        flex_local_attention(q, q, q, torch.zeros(4, dtype=torch.long), 3)
