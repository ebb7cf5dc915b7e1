"""benchmarks/femr/femr_stand_ins.py: femr's local mask and attention as --vs-femr runs them."""

import importlib.util
from pathlib import Path

import torch
from model_reference import naive_local_attention

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "femr" / "femr_stand_ins.py"


def stand_ins():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("femr_stand_ins", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_femr_local_mask_attention_equals_the_reference() -> None:
    module = stand_ins()
    lengths, width = [5, 1, 9, 3], 4
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    q, k, v = torch.randn(3, 1, sum(lengths), 2, 8).unbind(0)  # (1, T, H, D) each
    mask = module.BlockDiagonalMask.from_seqlens(lengths).make_local_attention(width)
    out = module.memory_efficient_attention(q, k, v, mask)
    expected = naive_local_attention(q[0], k[0], v[0], segment_ids, width)
    torch.testing.assert_close(out[0], expected)
    bias = mask.materialize((1, 2, sum(lengths), sum(lengths)))
    assert bias.shape == (1, 2, 18, 18)
    assert bias[0, 0, 10, 7] == 0 and bias[0, 0, 10, 6] == float("-inf")  # width 4: 10 - 6 = 4
    assert bias[0, 0, 6, 5] == float("-inf")  # another subject
