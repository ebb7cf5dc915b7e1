"""Local attention over packed subjects: blockwise and flex paths against the naive reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from model_reference import naive_local_attention

from ehrmotor.model import BACKENDS, MotorConfig
from ehrmotor.model.attention import (
    block_mask,
    block_plan,
    blockwise_local_attention,
    flex_local_attention,
    local_attention,
    local_mask_mod,
    resolve_backend,
)

HEADS, HEAD_DIM = 3, 8


def packed_segments(lengths: list[int]) -> torch.Tensor:
    """segment_ids for subjects of the given lengths packed one after another."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def random_lengths(seed: int, total: int) -> list[int]:
    """Subject lengths summing to `total`, with a few subjects of length 1."""
    generator = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(1 if torch.rand(1, generator=generator) < 0.2
                       else int(torch.randint(2, 400, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    return [length for length in lengths if length > 0]


def random_qkv(seed: int, length: int,
               head_dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(  # type: ignore[return-value]
        torch.randn(length, HEADS, head_dim, generator=generator, requires_grad=True)
        for _ in range(3))


CASES = [  # seed, total length, width, block size (None: the default)
    (0, 1200, 7, None),
    (1, 1200, 496, None),
    (2, 1163, 496, 128),
    (3, 997, 7, 5),
    (4, 301, 64, 100),
    (5, 50, 496, None),
    (6, 1, 496, None),
    (7, 257, 1, None),
]


@pytest.mark.parametrize(("seed", "length", "width", "block_size"), CASES)
def test_blockwise_equals_naive_outputs_and_gradients(seed: int, length: int, width: int,
                                                      block_size: int | None) -> None:
    segment_ids = packed_segments(random_lengths(seed, length))
    q, k, v = random_qkv(seed, length)
    upstream = torch.randn(length, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed))

    expected = naive_local_attention(q, k, v, segment_ids, width)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (q, k, v))
    actual = blockwise_local_attention(q, k, v, segment_ids, width, block_size)
    actual_grads = torch.autograd.grad((actual * upstream).sum(), (q, k, v))

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    for name, got, want in zip("qkv", actual_grads, expected_grads, strict=True):
        assert torch.isfinite(got).all(), f"non-finite gradient for {name}"
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"gradient of {name}")


# The reference and the CPU path, both (q, k, v, segment_ids, width) -> (T, H, D).
ATTENTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "naive": naive_local_attention, "blockwise": blockwise_local_attention}


def test_block_plan_is_reused_for_the_same_unmodified_segments_only() -> None:
    segment_ids = torch.tensor([0, 0, 1, 1, 1])
    first = block_plan(segment_ids, 3, 2)
    assert block_plan(segment_ids, 3, 2) is first  # the next layer of the same batch
    assert block_plan(segment_ids, 4, 2) is not first
    segment_ids[2] = 0  # changed in place: a new plan
    changed = block_plan(segment_ids, 3, 2)
    assert changed is not first and changed[-1][2].shape != first[-1][2].shape
    assert block_plan(segment_ids.clone(), 3, 2) is not changed


def test_block_plan_drops_only_key_blocks_before_each_subjects_start() -> None:
    segment_ids = packed_segments([3, 9, 2, 6])  # blocks of 4 start at 0, 4, 8, 12, 16
    plan = block_plan(segment_ids, 496, 4)
    keys_of = {int(index): keys for keys, chosen, _, _ in plan for index in chosen}
    # block 0: own block; 4: subject from 3; 8: from 3; 12: 12; 16: subject from 14
    assert keys_of == {0: 4, 1: 8, 2: 12, 3: 4, 4: 8}
    full = block_mask(segment_ids, 496, 4)
    for keys, chosen, allowed, _ in plan:
        assert not full[chosen][..., :-keys].any()  # nothing dropped was allowed
        torch.testing.assert_close(allowed, full[chosen][..., -keys:])


@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("width", [7, 496])
def test_never_attends_across_subjects(attention: str, width: int) -> None:
    attend = ATTENTIONS[attention]
    lengths = [40, 1, 300, 25]
    segment_ids = packed_segments(lengths)
    q, k, v = (x.detach() for x in random_qkv(11, sum(lengths)))
    before = attend(q, k, v, segment_ids, width)

    changed = segment_ids == 2  # the third subject
    k2, v2 = k.clone(), v.clone()
    k2[changed] += 5.0 * torch.randn_like(k2[changed])
    v2[changed] += 5.0 * torch.randn_like(v2[changed])
    after = attend(q, k2, v2, segment_ids, width)

    torch.testing.assert_close(after[~changed], before[~changed], atol=1e-6, rtol=0)
    assert not torch.allclose(after[changed], before[changed])


@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("width", [7, 64])
def test_never_attends_beyond_width(attention: str, width: int) -> None:
    attend = ATTENTIONS[attention]
    length = 200  # one subject
    segment_ids = torch.zeros(length, dtype=torch.long)
    q, k, v = (x.detach() for x in random_qkv(12, length))
    before = attend(q, k, v, segment_ids, width)

    perturbed = 50
    k2, v2 = k.clone(), v.clone()
    k2[perturbed] += 5.0
    v2[perturbed] += 5.0
    after = attend(q, k2, v2, segment_ids, width)

    changed = (after - before).abs().amax(dim=(1, 2)) > 1e-6  # (T,)
    sees_it = torch.zeros(length, dtype=torch.bool)
    sees_it[perturbed:perturbed + width] = True  # queries perturbed .. perturbed + width - 1
    assert torch.equal(changed, sees_it)


def test_flex_mask_mod_allows_exactly_the_reference_pairs() -> None:
    segment_ids = packed_segments([5, 1, 30, 12])
    width = 7
    positions = torch.arange(segment_ids.shape[0])
    allowed = local_mask_mod(segment_ids, width)(
        torch.tensor(0), torch.tensor(0), positions[:, None], positions[None, :])
    distance = positions[:, None] - positions[None, :]
    expected = ((distance >= 0) & (distance < width)
                & (segment_ids[:, None] == segment_ids[None, :]))
    assert torch.equal(allowed, expected)


def test_auto_backend_on_cpu_is_blockwise() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "blockwise"
    segment_ids = packed_segments([10, 20, 3])
    q, k, v = (x.detach() for x in random_qkv(13, 33))
    torch.testing.assert_close(local_attention(q, k, v, segment_ids, 7),
                               blockwise_local_attention(q, k, v, segment_ids, 7), atol=0, rtol=0)


def test_unknown_backend_and_bad_shapes_are_rejected() -> None:
    q, k, v = (x.detach() for x in random_qkv(14, 10))
    for backend in ("xformers", "naive"):  # the dense reference lives in the tests only
        assert backend not in BACKENDS
        with pytest.raises(ValueError, match="unknown attention backend"):
            local_attention(q, k, v, torch.zeros(10, dtype=torch.long), 7, backend=backend)
        with pytest.raises(ValueError, match="attention_backend"):
            MotorConfig.preset("tiny", attention_backend=backend)
    with pytest.raises(ValueError, match="segment_ids"):
        local_attention(q, k, v, torch.zeros(9, dtype=torch.long), 7)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("seed", "length", "width"), [(0, 1200, 7), (1, 1200, 496), (4, 301, 64),
                                                     (7, 257, 1)])
def test_flex_forward_equals_naive_on_cpu(seed: int, length: int, width: int) -> None:
    """The GPU path's mask (mask_mod and the block mask built from it) in FlexAttention's eager
    forward on CPU (backward is CUDA-only: the gradients are checked in the CUDA test below)."""
    segment_ids = packed_segments(random_lengths(seed, length))
    q, k, v = (x.detach() for x in random_qkv(seed, length, 16))  # flex: head_dim >= 16
    actual = flex_local_attention(q, k, v, segment_ids, width, compiled=False)
    torch.testing.assert_close(actual, naive_local_attention(q, k, v, segment_ids, width),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        flex_local_attention(q, k, v, segment_ids, width)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path needs CUDA")
@pytest.mark.parametrize(("seed", "length", "width", "block_size"), CASES[:3])
def test_flex_equals_naive_on_cuda(seed: int, length: int, width: int,
                                   block_size: int | None) -> None:
    segment_ids = packed_segments(random_lengths(seed, length)).cuda()
    # FlexAttention needs head_dim >= 16
    q, k, v = (x.detach().cuda().requires_grad_() for x in random_qkv(seed, length, 16))
    assert resolve_backend("auto", q.device) == "flex"
    expected = naive_local_attention(q, k, v, segment_ids, width)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    actual = local_attention(q, k, v, segment_ids, width, backend="flex")
    actual_grads = torch.autograd.grad(actual.sum(), (q, k, v))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    for got, want in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
