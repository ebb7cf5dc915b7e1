"""convert-femr: a femr 0.2.4 model folder in, femr's own features out (tests/data/femr)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from ehrmotor.cli import main
from ehrmotor.convert.femr_folder import ConversionError, convert_femr
from ehrmotor.embed import compute_features
from ehrmotor.errors import OutputError
from ehrmotor.model.hawk import RecurrentBlock, linear_scan, segment_starts, sequential_scan
from ehrmotor.synthetic import generate

FIXTURE = Path(__file__).parent / "data" / "femr"
FEMR_MODEL = FIXTURE / "model"
SUBJECTS, SEED = 120, 5  # as make_fixture.sh made the data
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: several threads on a shared CI box only contend (20x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def femr_meds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("femr") / "meds", SUBJECTS, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def femr_bundle(femr_meds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_femr(FEMR_MODEL, tmp_path_factory.mktemp("bundle") / "b",
                        athena=femr_meds / "athena")


def _segments(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def test_chunked_scan_equals_sequential_reference() -> None:
    torch.manual_seed(0)
    segments = _segments([5, 40, 1, 33, 17])  # segments start inside and across chunks
    log_a = -torch.rand(96, 8) * 3
    x = torch.randn(96, 8)
    starts = segment_starts(segments)
    reference = sequential_scan(log_a, x, starts)
    for chunk in (None, 1, 7, 16, 200):
        assert torch.allclose(linear_scan(log_a, x, starts, chunk=chunk), reference, atol=1e-5)
    # the state restarts at each segment: the second segment's first value is its input
    assert torch.equal(reference[5], x[5])


def test_recurrent_block_does_not_cross_segments() -> None:
    torch.manual_seed(1)
    block = RecurrentBlock(16, num_heads=4)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(30, 16)
    segments = _segments([12, 18])
    with torch.no_grad():
        packed = block(x, segments)
        alone = block(x[12:], torch.zeros(18, dtype=torch.long))
        stepwise = block(x, segments, sequential=True)
    assert torch.allclose(packed[12:], alone, atol=1e-5)
    assert torch.allclose(packed, stepwise, atol=1e-5)


def _femr_rows() -> pl.DataFrame:
    return pl.read_parquet(FIXTURE / "features.parquet")


def test_converted_features_equal_femr(femr_meds: Path, femr_bundle: Path) -> None:
    labels = pl.read_parquet(FIXTURE / "labels.parquet")
    tokens_per_batch = json.loads((FIXTURE / "fixture.json").read_text())["tokens_per_batch"]
    ours = compute_features(femr_meds, femr_bundle, labels, tokens_per_batch=tokens_per_batch)
    assert ours["features"].shape == (labels.height, 64)
    table = pl.DataFrame({"subject_id": ours["subject_ids"],
                          "feature_time": ours["feature_times"],
                          "ours": ours["features"]})
    joined = _femr_rows().join(table, on=["subject_id", "feature_time"], how="inner")
    diff = np.abs(np.stack(joined["embedding"].to_numpy())
                  - np.stack(joined["ours"].to_numpy())).max(axis=1)
    # femr computes a label twice where its windows overlap; ours must equal one of them
    per_label = joined.with_columns(diff=pl.Series(diff)) \
        .group_by("subject_id", "feature_time").agg(pl.col("diff").min())
    assert per_label.height == labels.height
    assert float(per_label["diff"].max()) <= TOLERANCE
    assert float(np.abs(ours["features"]).mean()) > 0.1  # not degenerate


def test_conversion_is_deterministic(femr_meds: Path, femr_bundle: Path, tmp_path: Path) -> None:
    again = convert_femr(FEMR_MODEL, tmp_path / "again", athena=femr_meds / "athena")
    files = sorted(p.relative_to(femr_bundle) for p in femr_bundle.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (femr_bundle / name).read_bytes() == (again / name).read_bytes(), name


def test_cli_converts_and_embeds(femr_meds: Path, tmp_path: Path) -> None:
    bundle, out = tmp_path / "bundle", tmp_path / "emb.parquet"
    assert main(["convert-femr", str(FEMR_MODEL), "--out", str(bundle),
                 "--athena", str(femr_meds / "athena")]) == 0
    labels = tmp_path / "labels.parquet"
    pl.read_parquet(FIXTURE / "labels.parquet").head(6).write_parquet(labels)
    assert main(["embed", "--meds", str(femr_meds), "--model", str(bundle), "--labels",
                 str(labels), "--out", str(out), "--tokens-per-batch", "256"]) == 0
    written = pl.read_parquet(out)
    femr = _femr_rows().join(written.rename({"prediction_time": "feature_time"}),
                             on=["subject_id", "feature_time"])
    assert written.height == 6 and femr.height >= 6
    diff = np.abs(np.stack(femr["embedding"].to_numpy())
                  - np.stack(femr["embedding_right"].to_numpy())).max(axis=1)
    per_label = femr.with_columns(diff=pl.Series(diff)) \
        .group_by("subject_id", "feature_time").agg(pl.col("diff").min())
    assert per_label.height == 6 and float(per_label["diff"].max()) <= TOLERANCE


def _copy_model(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FEMR_MODEL, tmp_path / "femr_model"))


def test_refuses_a_folder_that_is_not_a_femr_model(tmp_path: Path, femr_meds: Path) -> None:
    with pytest.raises(ConversionError, match="not a femr model folder"):
        convert_femr(FIXTURE, tmp_path / "out", athena=femr_meds / "athena")
    model = _copy_model(tmp_path)
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="no transformer_config"):
        convert_femr(model, tmp_path / "out", athena=femr_meds / "athena")


def test_refuses_an_unknown_layout_naming_the_keys(tmp_path: Path, femr_meds: Path) -> None:
    model = _copy_model(tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["transformer.in_norm.scale"] = weights.pop("transformer.in_norm.weight")
    save_file(weights, model / "model.safetensors")
    # `scale` norms say femr's released layout, whose tokenizer is flat: this one is refused
    with pytest.raises(ConversionError, match=r"is_hierarchical is true in femr's released"):
        convert_femr(model, tmp_path / "out", athena=femr_meds / "athena")
    weights["transformer.in_norm.weight"] = weights.pop("transformer.in_norm.scale")
    weights["transformer.layers.1.extra.weight"] = torch.zeros(2)
    save_file(weights, model / "model.safetensors")
    with pytest.raises(ConversionError, match=r"unexpected keys transformer\.layers\.1\.extra"):
        convert_femr(model, tmp_path / "out", athena=femr_meds / "athena")


def test_refuses_missing_weights_and_a_flat_tokenizer(tmp_path: Path, femr_meds: Path) -> None:
    model = _copy_model(tmp_path)
    weights = load_file(model / "model.safetensors")
    del weights["transformer.layers.2.hawk_module.rg_lru.a_param"]
    save_file(weights, model / "model.safetensors")
    with pytest.raises(ConversionError, match=r"missing layers\.2\.recurrent\.a_param"):
        convert_femr(model, tmp_path / "out", athena=femr_meds / "athena")
    config = json.loads((model / "config.json").read_text())
    config["transformer_config"]["is_hierarchical"] = False
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="is_hierarchical is false"):
        convert_femr(model, tmp_path / "out", athena=femr_meds / "athena")


def test_refuses_a_hierarchical_tokenizer_without_ontology(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="hierarchical; give the Athena"):
        convert_femr(FEMR_MODEL, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_never_replaces_other_folders(tmp_path: Path, femr_meds: Path) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not a bundle written by convert-femr"):
        convert_femr(FEMR_MODEL, other, athena=femr_meds / "athena")
    assert (other / "notes.txt").read_text() == "keep"
