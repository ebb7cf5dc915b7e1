"""benchmarks/gpu_check.py in its CPU smoke mode: the GPU check cannot rot before a GPU runs it."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from ehrmotor.model import blockwise_local_attention

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_report(gpu_check: ModuleType, tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("gpu_check")
    status = gpu_check.main(["--cpu-smoke", "--json", str(folder / "figures.json"),
                             "--work", str(folder / "work")])
    report: dict[str, Any] = json.loads((folder / "figures.json").read_text())
    assert status == 0, report
    return report


def test_cpu_smoke_attention_backends_equal_the_reference(smoke_report: dict[str, Any]) -> None:
    attention = smoke_report["attention"]
    assert attention["passed"]
    checks = attention["checks"]
    assert {check["backend"] for check in checks} == {"blockwise"}
    assert attention["auto_runs_as"] == "blockwise"
    assert attention["skipped"] == ["flex"]  # needs CUDA
    assert {(check["layout"], check["dtype"]) for check in checks} == {
        (layout, dtype) for layout in ("short", "heavy-tailed", "width-edges")
        for dtype in ("fp32", "bf16")}
    for check in checks:
        assert check["passed"], check
        assert set(check["parts"]) == {"output", "dq", "dk", "dv"}
        assert all(part["passed"] for part in check["parts"].values())
        assert 0 <= check["tolerance_used"] <= 1


def test_cpu_smoke_reports_positive_training_and_embedding_figures(
        smoke_report: dict[str, Any]) -> None:
    training, embedding = smoke_report["training"], smoke_report["embedding"]
    assert training["preset"] == "tiny" and training["tokens_per_batch"] > 0
    for name in ("tokens_per_s", "mfu", "peak_memory_gib", "flops_per_token"):
        assert training[name] > 0, name
    assert training["losses"] and all(math.isfinite(loss) for loss in training["losses"])
    assert embedding["labels"] >= 100 and embedding["labels_per_s"] > 0
    assert embedding["features_finite"]
    for section in ("attention", "training", "embedding"):
        assert smoke_report[section]["elapsed_s"] > 0
    assert smoke_report["passed"]


def test_comparison_fails_a_perturbed_output(gpu_check: ModuleType) -> None:
    tolerance = gpu_check.TOLERANCES["fp32"]
    expected = torch.randn(64, 4, 16, generator=torch.Generator().manual_seed(0))
    assert gpu_check.compare(expected + 1e-5, expected, tolerance)["passed"]
    perturbed = expected.clone()
    perturbed[10, 2, 3] += 0.01
    result = gpu_check.compare(perturbed, expected, tolerance)
    assert not result["passed"] and result["tolerance_used"] > 1
    assert result["max_abs"] == pytest.approx(0.01, rel=1e-3)
    perturbed[10, 2, 3] = float("nan")
    assert not gpu_check.compare(perturbed, expected, tolerance)["passed"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_attention_check_fails_a_window_one_position_too_wide(gpu_check: ModuleType,
                                                             dtype: str) -> None:
    width = 32
    lengths = gpu_check.segment_lengths("width-edges", 256, width)
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    generator = torch.Generator().manual_seed(1)
    q, k, v, upstream = (torch.randn(256, 2, 16, generator=generator) for _ in range(4))
    inputs = [x.to(gpu_check.DTYPES[dtype]) for x in (q, k, v)]
    expected = gpu_check.attention_with_grads(
        gpu_check.naive_local_attention, [x.float() for x in inputs], segment_ids, width,
        upstream)
    tolerance = gpu_check.TOLERANCES[dtype]

    def too_wide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor,
                 attention_width: int) -> torch.Tensor:
        return blockwise_local_attention(q, k, v, segments, attention_width + 1)

    right = gpu_check.check_backend(blockwise_local_attention, inputs, segment_ids, width,
                                    upstream, expected, tolerance)
    wrong = gpu_check.check_backend(too_wide, inputs, segment_ids, width, upstream, expected,
                                    tolerance)
    assert right["passed"], right
    assert not wrong["passed"], wrong
