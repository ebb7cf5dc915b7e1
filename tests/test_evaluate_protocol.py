"""The whole evaluation on a model: `ehrmotor evaluate` on the data the ACES fixture was made
from (`ehrmotor synth --subjects 150 --seed 3`, every subject moved to held_out so that the test
set has events), with the session's `tiny_bundle` (pretrained on other synthetic data; its
weights only need to be fixed). One run covers landmark outcomes (time to event, the oracle, a
too-few task) and ACES's label folder (binary, predictions)."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from ehrmotor.cli import main
from ehrmotor.evaluate import RESULT_SCHEMA
from ehrmotor.evaluate.report import PREDICTION_SCHEMA
from ehrmotor.meds import read_label_set
from ehrmotor.synthetic import generate

ACES_LABELS = Path(__file__).parent / "data" / "aces" / "heart_failure_1y"
OUTCOMES = "hypertension,death,stroke"  # stroke: 3 events in all, too few to score
# Seed 8 puts 14 hypertension and 20 death events, and 35 of ACES's 52 positive labels (of 3
# subjects in all), in the test set, and leaves positives in the pool.
SETTINGS = ["--k", "16,all", "--replicates", "2", "--bootstrap", "30", "--seed", "8",
            "--landmark-codes", "Visit/"]  # the visits the counts above were taken at
TIME_TO_EVENT_METHODS = {"motor_cox", "motor_head", "counts_cox", "counts_lightgbm",
                         "age_sex_cox"}
BINARY_METHODS = {"motor_logistic", "counts_logistic", "counts_lightgbm", "age_sex_logistic"}


@pytest.fixture(scope="module")
def aces_meds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meds = generate(tmp_path_factory.mktemp("aces") / "meds", 150, seed=3, progress=False)
    splits = meds / "metadata" / "subject_splits.parquet"
    pl.read_parquet(splits).with_columns(split=pl.lit("held_out")).write_parquet(splits)
    shutil.rmtree(meds / "athena")
    return meds


@pytest.fixture(scope="module")
def evaluated(aces_meds: Path, tiny_bundle: tuple[Path, Path],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluation") / "out"
    assert main(["evaluate", "--model", str(tiny_bundle[1]), "--meds", str(aces_meds),
                 "--out", str(out), "--outcomes", OUTCOMES, "--labels", str(ACES_LABELS),
                 *SETTINGS]) == 0
    return out


def test_evaluate_writes_every_output(evaluated: Path) -> None:
    results = pl.read_csv(evaluated / "results.csv", schema=RESULT_SCHEMA)
    tasks = ["hypertension", "death", "stroke", "heart_failure_1y"]
    assert results["task"].unique(maintain_order=True).to_list() == tasks
    binary = results.filter(pl.col("kind") == "binary")
    assert set(binary["task"]) == {"heart_failure_1y"}
    assert set(binary["metric"]) == {"auroc", "auprc"}
    assert set(binary["method"]) == BINARY_METHODS | {"motor_minus_best_baseline"}
    survival = results.filter(pl.col("task") == "hypertension")
    assert set(survival["metric"]) == {"harrell_c", "uno_c", "integrated_brier"}
    assert set(survival["method"]) == TIME_TO_EVENT_METHODS | {"motor_minus_best_baseline",
                                                               "oracle"}
    assert set(survival["k"].drop_nulls()) == {"16", "all"}
    fitted = survival.filter(pl.col("method").is_in(TIME_TO_EVENT_METHODS))
    assert set(fitted.filter(pl.col("k") == "16")["replicates_fitted"]
               + fitted.filter(pl.col("k") == "16")["replicates_skipped"]) == {2}
    assert (fitted.filter(pl.col("k") == "all")["replicates_fitted"] == 1).all()
    # landmarks a year apart: most test events come after the 365-day horizon, too few before tau
    before_tau = results["note"].str.starts_with("too few events before tau").fill_null(False)
    assert set(results.filter(before_tau)["metric"]) == {"uno_c", "integrated_brier"}
    assert (results.filter(before_tau)["events_before_tau"] < 10).all()
    results = results.filter(~before_tau)
    scored = results.filter((pl.col("task") != "stroke") & (pl.col("k") != "16"))
    assert scored["mean"].is_finite().all(), scored.filter(~pl.col("mean").is_finite())
    few = results.filter((pl.col("k") == "16") & ~pl.col("mean").is_finite()
                         & (pl.col("task") != "stroke"))  # draws of 16 without events or a class
    assert few["note"].str.contains("no draw could be fitted").all()  # difference rows too
    unit = scored.filter(pl.col("method") != "motor_minus_best_baseline")
    assert unit["mean"].is_between(0, 1).all()
    # tiny test sets: where over 10% of resamples lack an event subject there is no interval
    bounded = results.filter(pl.col("ci_low").is_finite())
    assert bounded.height > 20
    assert (bounded["ci_low"] <= bounded["mean"]).all()
    assert (bounded["mean"] <= bounded["ci_high"]).all()
    stroke = results.filter(pl.col("task") == "stroke")
    assert stroke["mean"].is_nan().all() and stroke["note"].str.starts_with("too few events").all()

    text = (evaluated / "results.md").read_text()
    for task in tasks:
        assert f"## {task} (" in text
        assert (evaluated / f"kshot_{task}.png").read_bytes()[:4] == b"\x89PNG"
    assert ("| k | MOTOR Cox | MOTOR head | counts Cox | counts LightGBM | age (+sex) Cox "
            "| MOTOR − best baseline |") in text
    assert "| oracle (true hazard) |" in text and "n/a" not in text

    for method in BINARY_METHODS:
        predictions = pl.read_parquet(evaluated / "predictions" / "heart_failure_1y"
                                      / f"{method}.parquet")
        assert predictions.schema == PREDICTION_SCHEMA
        assert predictions["predicted_boolean_probability"].is_between(0, 1).all()
        assert predictions.height == binary["test_rows"][0]
    death = pl.read_parquet(evaluated / "predictions" / "death" / "motor_head.parquet")
    assert death.schema == PREDICTION_SCHEMA  # time to event: event within the horizon
    death = read_label_set(evaluated / "labels" / "death.parquet")
    assert death.kind == "time_to_event"
    assert death.frame.group_by("subject_id").len()["len"].max() <= 4


def test_evaluate_is_deterministic_and_refuses_unscored_label_kinds(
        aces_meds: Path, tiny_bundle: tuple[Path, Path], evaluated: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "los.parquet"
    read_label_set(ACES_LABELS).frame.select(
        "subject_id", "prediction_time", integer_value=pl.lit(3, pl.Int64)).write_parquet(labels)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_bundle[1]), "--meds", str(aces_meds),
                 "--out", str(tmp_path / "out"), "--labels", str(labels)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"ehrmotor evaluate: error: {labels}: integer labels are not evaluated "
                     "yet; give boolean_value or time-to-event labels"]
    assert main(["evaluate", "--model", str(tiny_bundle[1]), "--meds", str(aces_meds),
                 "--out", str(tmp_path / "out"), "--labels", str(ACES_LABELS), "--labels",
                 str(labels), "--task-name", "x"]) == 2
    assert "--task-name names the task of one label path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    again = tmp_path / "again"
    assert main(["evaluate", "--model", str(tiny_bundle[1]), "--meds", str(aces_meds),
                 "--out", str(again), "--outcomes", OUTCOMES, "--labels", str(ACES_LABELS),
                 *SETTINGS]) == 0
    assert (again / "results.csv").read_bytes() == (evaluated / "results.csv").read_bytes()
