"""The whole pipeline, as a user runs it, on an export shaped unlike our synthetic EHR: MIMIC-style
codes (`HOSPITAL_ADMISSION//...`, no `Visit/*`), no `metadata/subject_splits.parquet`, no Athena.

validate → prepare --held-out-fraction → pretrain → label (default landmarks: every day with an
event) → evaluate (the label folder, one task per outcome file; and landmark outcomes straight from
codes, with the bundle's split file found by itself) → embed one task's file.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from export_builders import write_mimic_like

from ehrmotor.cli import main

SUBJECTS = 240
PREPARE = ["--workers", "1", "--vocab-size", "300", "--candidate-tasks", "60",
           "--max-window", "512"]
PRETRAIN_TOML = """[pretrain]
preset = "tiny"
tokens_per_batch = 1024
gradient_accumulation_steps = 1
max_steps = 2
eval_steps = 2
save_steps = 2
warmup_steps = 1
logging_steps = 1
"""
QUICK = ["--k", "all", "--replicates", "1", "--bootstrap", "5", "--max-count-features", "50"]
OUTCOMES = "MEDS_DEATH,ICU_ADMISSION"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export") / "meds"
    write_mimic_like(root, SUBJECTS, split_file=False)
    return root


def test_label_and_evaluate_run_end_to_end_on_an_export_without_visits_or_split_file(
        export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    assert not (export / "metadata/subject_splits.parquet").exists()
    assert not pl.read_parquet(export / "data").filter(
        pl.col("code").str.starts_with("Visit/")).height
    assert run(capsys, "validate", str(export))[0] == 0

    work = tmp_path / "work"
    code, err = run(capsys, "prepare", "--meds", str(export), "--out", str(work), *PREPARE)
    assert code == 2 and "--held-out-fraction" in err  # no split file: the user must choose
    assert run(capsys, "prepare", "--meds", str(export), "--out", str(work), *PREPARE,
               "--held-out-fraction", "0.3")[0] == 0
    config = tmp_path / "pretrain.toml"
    config.write_text(PRETRAIN_TOML)
    assert run(capsys, "pretrain", "--work", str(work), "--config", str(config))[0] == 0
    bundle = work / "model"
    splits = pl.read_parquet(bundle / "subject_splits.parquet")
    held_out = splits.filter(pl.col("split") == "held_out")["subject_id"]
    assert 0.2 * SUBJECTS < held_out.len() < 0.4 * SUBJECTS

    labels = tmp_path / "labels"
    assert run(capsys, "label", "--meds", str(export), "--out", str(labels), "--outcomes",
               OUTCOMES, "--subjects", "held_out", "--splits-file",
               str(work / "subject_splits.parquet"))[0] == 0
    for name in ("MEDS_DEATH", "ICU_ADMISSION"):
        frame = pl.read_parquet(labels / f"{name}.parquet")
        assert frame.height > 0 and frame["subject_id"].is_in(held_out.implode()).all()
        assert frame["event_time"].is_not_null().any()

    evaluation = tmp_path / "evaluation"
    assert run(capsys, "evaluate", "--model", str(bundle), "--meds", str(export), "--out",
               str(evaluation), "--labels", str(labels), "--subjects", "held_out", *QUICK)[0] == 0
    results = pl.read_csv(evaluation / "results.csv", infer_schema_length=None)
    assert sorted(results["task"].unique()) == ["ICU_ADMISSION", "MEDS_DEATH"]

    direct = tmp_path / "direct"  # landmarks from codes; held-out subjects from the bundle
    caplog.clear()
    assert run(capsys, "evaluate", "--model", str(bundle), "--meds", str(export), "--out",
               str(direct), "--outcomes", "MEDS_DEATH", *QUICK)[0] == 0
    assert not [r for r in caplog.records if "left out" in r.getMessage()]  # no tuning split
    assert pl.read_csv(direct / "results.csv", infer_schema_length=None)["task"].unique(
        ).to_list() == ["MEDS_DEATH"]

    embeddings = tmp_path / "death.parquet"
    assert run(capsys, "embed", "--model", str(bundle), "--meds", str(export), "--labels",
               str(labels / "MEDS_DEATH.parquet"), "--out", str(embeddings))[0] == 0
    assert pl.read_parquet(embeddings).height == pl.read_parquet(
        labels / "MEDS_DEATH.parquet").height
    code, err = run(capsys, "embed", "--model", str(bundle), "--meds", str(export), "--labels",
                    str(labels), "--out", str(tmp_path / "both.parquet"))
    assert code == 2 and "holds 2 tasks" in err


def test_an_export_without_planted_outcomes_needs_outcomes_or_labels(
        export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "label", "--meds", str(export), "--out", str(tmp_path / "labels"),
                    "--splits-file", str(tmp_path / "unused.parquet"))
    assert code == 2 and err.strip() == (
        f"ehrmotor label: error: {export}: not written by `ehrmotor synth`, so it has no planted "
        "outcomes to default to; give --outcomes with codes of the data (e.g. MEDS_DEATH, "
        "HOSPITAL_ADMISSION//)")
