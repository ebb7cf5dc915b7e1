"""Precision "auto": bf16 autocast on CPUs with AMX-BF16 for models at least 256 wide,
fp32 elsewhere; the CPU's capability read from torch, else /proc/cpuinfo; the same rule in
training (`TrainingArguments.bf16`) and embedding, where bf16 features stay close to fp32's."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from features_fixtures import Subjects, at, read_events

from ehrmotor import precision
from ehrmotor.bundle import load_bundle
from ehrmotor.config import PretrainConfig
from ehrmotor.model import MotorModel
from ehrmotor.precision import (
    BF16_MIN_EMBEDDING_HIDDEN_SIZE,
    auto_uses_bf16,
    cpu_has_amx_bf16,
)
from ehrmotor.pretrain.setup import training_arguments
from ehrmotor.representations import bundle_features


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set whether the CPU counts as having AMX-BF16, whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return lambda native: monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: native)


@pytest.mark.parametrize(("capabilities", "native"), [
    ({"amx_bf16": True, "avx512_bf16": False}, True),
    ({"avx512_bf16": True}, False),  # without AMX bf16 is slower than fp32
    ({"avx512_f": True, "amx_tile": True, "amx_bf16": False}, False),
    ({"architecture": "arm64", "neon": True}, False),
])
def test_native_bf16_is_read_from_torchs_cpu_capabilities(
        monkeypatch: pytest.MonkeyPatch, capabilities: dict[str, Any], native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert cpu_has_amx_bf16() is native


def test_without_torchs_capabilities_native_bf16_is_read_from_proc_cpuinfo(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert cpu_has_amx_bf16() is False  # no such file (not Linux)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert cpu_has_amx_bf16() is False
    cpuinfo.write_text("processor\t: 0\nmodel name\t: amx_bf16 in a name is no flag\n"
                       "flags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_amx_bf16() is False
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_has_amx_bf16() is True


def test_auto_trains_in_bf16_on_native_bf16_cpus_and_embeds_so_from_256_wide(
        native_bf16: Any) -> None:
    native_bf16(True)
    assert BF16_MIN_EMBEDDING_HIDDEN_SIZE == 256
    assert auto_uses_bf16("cpu", 64, training=True) and auto_uses_bf16("cpu", 768, training=True)
    assert auto_uses_bf16("cpu", 256, training=False)
    assert not auto_uses_bf16("cpu", 255, training=False)
    assert not auto_uses_bf16("mps", 768, training=True)
    native_bf16(False)
    assert not auto_uses_bf16("cpu", 768, training=True)


@pytest.mark.parametrize(("setting", "native", "hidden", "bf16"), [
    ("auto", True, 256, True), ("auto", True, 64, True), ("auto", False, 768, False),
    ("fp32", True, 768, False), ("bf16", False, 64, True),
])
def test_training_runs_in_bf16_where_precision_says(
        native_bf16: Any, tmp_path: Path, setting: str, native: bool, hidden: int,
        bf16: bool) -> None:
    native_bf16(native)
    args = training_arguments(PretrainConfig(precision=setting), tmp_path, True, hidden)
    assert args.bf16 is bf16


def test_gradient_checkpointing_reaches_trainer_without_a_deprecation_warning(
        tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        on = training_arguments(PretrainConfig(gradient_checkpointing=True), tmp_path, True, 64)
        off = training_arguments(PretrainConfig(), tmp_path, True, 64)
    assert on.gradient_checkpointing is True and off.gradient_checkpointing is False


def test_embeddings_in_bf16_are_close_to_fp32_and_narrow_models_stay_fp32(
        tiny_bundle: tuple[Path, Path], native_bf16: Any) -> None:
    meds, path = tiny_bundle
    subjects = Subjects.build(read_events(meds), path)
    rows = [(subject_id, at(subjects.times(subject_id)[-1]))
            for subject_id in subjects.with_sizes(20, 400, 12)]
    labels = pl.DataFrame(rows, schema={"subject_id": pl.Int64,
                                        "prediction_time": pl.Datetime("us")}, orient="row")
    tiny = load_bundle(path)
    config = copy.deepcopy(tiny.config)
    config.hidden_size, config.num_heads, config.intermediate_size = 256, 4, 512
    torch.manual_seed(0)
    wide = dataclasses.replace(tiny, config=config, model=MotorModel(config).eval())

    features = {}
    for native in (True, False):
        native_bf16(native)
        for name, bundle in (("tiny", tiny), ("wide", wide)):
            features[name, native] = bundle_features(meds, bundle, labels)["features"]
    # The 64-wide tiny model stays fp32 on a native-bf16 CPU.
    np.testing.assert_array_equal(features["tiny", True], features["tiny", False])
    bf16, fp32 = features["wide", True], features["wide", False]
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)
    cosine = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosine.min() >= 0.99, cosine
