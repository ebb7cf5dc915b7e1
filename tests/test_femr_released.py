"""convert-femr for femr's released layout (femr 0.2.1, tests/data/femr_released): same features."""

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

from ehrmotor.convert.femr_folder import ConversionError, convert_femr
from ehrmotor.embed import compute_features
from ehrmotor.synthetic import generate

FIXTURE = Path(__file__).parent / "data" / "femr_released"
FEMR_MODEL = FIXTURE / "model"
SUBJECTS, SEED = 60, 5  # as make_fixture.sh made the data
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def released_meds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("femr021") / "meds", SUBJECTS, seed=SEED,
                    progress=False)


@pytest.fixture(scope="module")
def released_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_femr(FEMR_MODEL, tmp_path_factory.mktemp("bundle021") / "b")


def test_converted_released_features_equal_femr(released_meds: Path,
                                                released_bundle: Path) -> None:
    config = json.loads((released_bundle / "config.json").read_text())
    assert (config["layout"], config["task_type"]) == ("released", "clmbr")
    labels = pl.read_parquet(FIXTURE / "labels.parquet")
    ours = compute_features(released_meds, released_bundle, labels, tokens_per_batch=300)
    table = pl.DataFrame({"subject_id": ours["subject_ids"],
                          "feature_time": ours["feature_times"], "ours": ours["features"]})
    femr = pl.read_parquet(FIXTURE / "features.parquet")
    joined = femr.join(table, on=["subject_id", "feature_time"], how="inner")
    assert joined.height == labels.height == femr.height
    diff = np.abs(np.stack(joined["embedding"].to_numpy()) - np.stack(joined["ours"].to_numpy()))
    assert float(diff.max()) <= TOLERANCE
    assert float(np.abs(ours["features"]).mean()) > 0.1  # not degenerate


def test_released_conversion_is_deterministic(released_bundle: Path, tmp_path: Path) -> None:
    again = convert_femr(FEMR_MODEL, tmp_path / "again")
    files = sorted(p.relative_to(released_bundle) for p in released_bundle.rglob("*")
                   if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert not (again / "ontology").exists()  # the flat tokenizer needs no ontology
    for name in files:
        assert (released_bundle / name).read_bytes() == (again / name).read_bytes(), name
    weights = load_file(again / "model.safetensors")
    assert "head.final_layer.weight" in weights and "in_norm.weight" in weights


def _copy_model(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FEMR_MODEL, tmp_path / "femr_model"))


def test_refuses_unknown_keys_of_the_released_layout(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["transformer.layers.1.hawk_module.conv_1d.w"] = torch.zeros(2)
    weights["task_model.task_layer.weight"] = torch.zeros(2)
    save_file(weights, model / "model.safetensors")
    with pytest.raises(ConversionError, match=r"not a femr 0\.2\.0 / 0\.2\.1 \(released layout\) "
                       r"model; unexpected keys task_model\.task_layer\.weight, "
                       r"transformer\.layers\.1\.hawk_module"):
        convert_femr(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_missing_weights_and_a_hierarchical_flag(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    weights = load_file(model / "model.safetensors")
    del weights["transformer.layers.2.norm.scale"]
    save_file(weights, model / "model.safetensors")
    with pytest.raises(ConversionError, match=r"missing layers\.2\.norm\.weight"):
        convert_femr(model, tmp_path / "out")
    config = json.loads((model / "config.json").read_text())
    config["transformer_config"]["is_hierarchical"] = True
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="is_hierarchical is true in femr's released"):
        convert_femr(model, tmp_path / "out")


def test_cli_embeds_a_released_bundle(released_meds: Path, released_bundle: Path,
                                      tmp_path: Path) -> None:
    from ehrmotor.cli import main

    labels, out = tmp_path / "labels.parquet", tmp_path / "emb.parquet"
    pl.read_parquet(FIXTURE / "labels.parquet").head(8).write_parquet(labels)
    assert main(["embed", "--meds", str(released_meds), "--model", str(released_bundle),
                 "--labels", str(labels), "--out", str(out)]) == 0
    femr = pl.read_parquet(FIXTURE / "features.parquet").rename({"feature_time": "prediction_time"})
    joined = femr.join(pl.read_parquet(out), on=["subject_id", "prediction_time"])
    assert joined.height == 8
    diff = np.abs(np.stack(joined["embedding"].to_numpy())
                  - np.stack(joined["embedding_right"].to_numpy()))
    assert float(diff.max()) <= TOLERANCE


@pytest.mark.parametrize("command", ["evaluate", "finetune"])
def test_evaluate_and_finetune_refuse_a_converted_bundle_in_one_line(
        command: str, released_meds: Path, released_bundle: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Both read our own architecture only (load_bundle); a converted bundle is refused, in one
    line naming its model_type, before any work (no crash, nothing written)."""
    from ehrmotor.cli import main

    labels = tmp_path / "labels.parquet"
    pl.read_parquet(FIXTURE / "labels.parquet").with_columns(
        boolean_value=pl.col("subject_id") % 2 == 0).write_parquet(labels)
    out = tmp_path / "out"
    args = [command, "--model", str(released_bundle), "--meds", str(released_meds),
            "--labels", str(labels), "--out", str(out)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and 'model_type "ehrmotor-femr-hybrid"' in error[0]
    assert not out.exists() or not any(out.iterdir())


def test_refuses_labels_without_a_position(released_meds: Path, released_bundle: Path) -> None:
    from ehrmotor.errors import InputError

    first = pl.read_parquet(FIXTURE / "labels.parquet").head(1)
    early = first.with_columns(pl.col("prediction_time") - pl.duration(days=365 * 200))
    with pytest.raises(InputError, match=r"1 labels come before the subject's first position"):
        compute_features(released_meds, released_bundle, early)
    stranger = first.with_columns(subject_id=pl.lit(999_999, pl.Int64))
    with pytest.raises(InputError, match=r"subjects \[999999\] have no femr positions"):
        compute_features(released_meds, released_bundle, stranger)
