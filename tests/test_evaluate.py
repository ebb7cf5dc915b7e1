"""Tests of `ehrmotor.evaluate`: task construction, count features, metrics, and the whole
evaluation on a tiny pretrained model (one session-scoped synthetic dataset and bundle, whose
outcome codes and oracle the tests hand to `evaluate` as the CLI does)."""

from __future__ import annotations

import logging
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from meds_builders import rows_table, write_table
from sksurv.metrics import concordance_index_censored

from ehrmotor.cli import main
from ehrmotor.errors import InputError
from ehrmotor.evaluate import RESULT_SCHEMA, evaluate
from ehrmotor.evaluate.counts import count_features, feature_matrix, select_features
from ehrmotor.evaluate.metrics import concordance
from ehrmotor.evaluate.tasks import TASK_SCHEMA, held_out_tasks
from ehrmotor.prepare.ontology import Ontology
from ehrmotor.synthetic.outcomes import outcome_codes, synthetic_oracle

BIRTH = datetime(1950, 1, 1)
VISIT = datetime(2010, 1, 1, 9)
DEATH = {"death": ["MEDS_DEATH"]}


def write_dataset(root: Path, events: dict[int, list[tuple[datetime | None, str, float | None]]],
                  splits: dict[int, str]) -> Path:
    """A MEDS dataset with one shard holding `events` (subject → (time, code, value) rows)."""
    rows = [{"subject_id": sid, "time": time, "code": code, "numeric_value": value}
            for sid, subject_rows in sorted(events.items())
            for time, code, value in sorted(subject_rows,
                                            key=lambda r: (r[0] is not None, r[0] or BIRTH))]
    write_table(root / "data/0.parquet", rows_table(rows))
    write_table(root / "metadata/subject_splits.parquet", pa.table({
        "subject_id": pa.array(list(splits), pa.int64()),
        "split": pa.array(list(splits.values()), pa.string())}))
    return root


def visit_subject(*extra: tuple[datetime | None, str, float | None],
                  last: datetime = datetime(2013, 1, 1)) -> list[tuple[Any, str, Any]]:
    """Born 1950-01-01, one eligible visit at VISIT, last event at `last`, plus `extra`."""
    return [(None, "Gender/F", None), (BIRTH, "MEDS_BIRTH", None), (BIRTH, "Visit/IP", None),
            (VISIT, "Visit/OP", None), (last, "CPT4/99213", None), *extra]


@pytest.fixture
def tiny_tasks(tmp_path: Path) -> pl.DataFrame:
    events = {
        1: visit_subject((datetime(2010, 6, 1, 9), "ICD10CM/I50.9", None),
                         (datetime(2011, 1, 1, 9), "ICD10CM/I50.22", None)),
        2: visit_subject((datetime(2009, 1, 1), "ICD10CM/I50", None)),  # prevalent
        3: visit_subject(last=datetime(2010, 9, 1, 9)),  # censored before the horizon
        4: visit_subject((datetime(2012, 1, 1, 21), "ICD10CM/I50.1", None),
                         (datetime(2010, 2, 1), "ICD10CM/I509", None)),  # not under I50.
        5: visit_subject((datetime(2010, 3, 1, 9), "MEDS_DEATH", None),
                         last=datetime(2010, 3, 1, 9)),
        6: visit_subject(),  # train split: not evaluated
        7: [(BIRTH, "MEDS_BIRTH", None), (BIRTH, "Visit/OP", None),
            (datetime(2000, 1, 1), "CPT4/99213", None)],  # no visit after the birth day
    }
    splits = {sid: "train" if sid == 6 else "held_out" for sid in events}
    meds = write_dataset(tmp_path / "meds", events, splits)
    return held_out_tasks(meds, {"heart_failure": ["ICD10CM/I50"], **DEATH}, horizon_days=365,
                          seed=0)


def task_rows(tasks: pl.DataFrame, outcome: str) -> dict[int, tuple[float, bool, bool | None]]:
    frame = tasks.filter(pl.col("outcome") == outcome).sort("subject_id")
    return {sid: (days, event, label) for sid, days, event, label in frame.select(
        "subject_id", "time_to_event_days", "event", "boolean_value").iter_rows()}


def test_tasks_exclude_prevalent_and_count_exact_days(tiny_tasks: pl.DataFrame) -> None:
    assert tiny_tasks.schema == TASK_SCHEMA
    assert (tiny_tasks["prediction_time"] == VISIT).all()
    heart = task_rows(tiny_tasks, "heart_failure")
    assert sorted(heart) == [1, 3, 4, 5]  # 2 prevalent, 6 train, 7 no eligible visit
    assert heart[1] == (151.0, True, True)  # first occurrence after the prediction time
    assert heart[3] == pytest.approx((243.0, False, None))  # censored before the horizon
    assert heart[4] == (730.5, True, False)  # event after the horizon: followed past it
    assert heart[5] == (59.0, False, None)  # censored at death
    death = task_rows(tiny_tasks, "death")
    assert death[5] == (59.0, True, True)
    assert death[2] == (1095.625, False, False)  # followed to 2013-01-01 without dying


def test_prediction_time_is_a_seeded_visit_strictly_before_the_last_event(tmp_path: Path) -> None:
    visits = [(datetime(2000 + year, 5, 1), "Visit/OP", None) for year in range(10)]
    meds = write_dataset(tmp_path / "meds", {1: [(BIRTH, "MEDS_BIRTH", None), *visits]},
                         {1: "held_out"})
    drawn = {held_out_tasks(meds, DEATH, horizon_days=365, seed=seed)["prediction_time"][0]
             for seed in range(12)}
    assert drawn <= {time for time, _, _ in visits[:-1]} and len(drawn) > 1
    again = held_out_tasks(meds, DEATH, horizon_days=365, seed=3)["prediction_time"][0]
    assert again == held_out_tasks(meds, DEATH, horizon_days=365, seed=3)["prediction_time"][0]


def test_empty_held_out_falls_back_to_tuning(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    meds = write_dataset(tmp_path / "meds", {1: visit_subject(), 2: visit_subject()},
                         {1: "tuning", 2: "train"})
    with caplog.at_level(logging.WARNING):
        tasks = held_out_tasks(meds, DEATH, horizon_days=365, seed=0)
    assert tasks["subject_id"].to_list() == [1]
    assert "held_out split is empty" in caplog.text


@pytest.mark.parametrize("codes", ["MEDS_DEATH", [], [""]])
def test_an_outcome_without_a_list_of_codes_is_refused(tmp_path: Path, codes: Any) -> None:
    meds = write_dataset(tmp_path / "meds", {1: visit_subject()}, {1: "held_out"})
    with pytest.raises(InputError, match="outcome 'death': expected a name and a non-empty list"):
        held_out_tasks(meds, {"death": codes}, horizon_days=365, seed=0)


def test_cli_refuses_an_unknown_outcome_name_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--meds", str(tmp_path),
                 "--out", str(tmp_path / "out"), "--outcomes", "death", "flu"]) == 2
    assert "unknown outcome 'flu'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_count_features_lifetime_recent_ancestors_and_last_lab(tmp_path: Path) -> None:
    prediction = datetime(2010, 1, 1)
    events = {1: [
        (None, "Gender/F", None), (BIRTH, "MEDS_BIRTH", None),
        (datetime(2005, 1, 1), "ICD10CM/E11.9", None),
        (datetime(2009, 9, 1), "ICD10CM/E11.65", None),
        (datetime(2009, 10, 1), "LOINC/2345-7", 100.0),
        (prediction, "LOINC/2345-7", 150.0),  # at the prediction time: counted
        (datetime(2010, 1, 2), "LOINC/2345-7", 999.0),  # after: never counted
        (datetime(2011, 1, 1), "ICD10CM/E11.9", None),
    ]}
    meds = write_dataset(tmp_path / "meds", events, {1: "held_out"})
    ontology = Ontology.build(
        ["ICD10CM/E11.9", "ICD10CM/E11.65", "LOINC/2345-7", "Gender/F", "MEDS_BIRTH"],
        codes_metadata=pl.DataFrame({"code": ["ICD10CM/E11.9", "ICD10CM/E11.65"],
                                     "parent_codes": [["ICD10CM/E11"], ["ICD10CM/E11"]]}))
    points = pl.DataFrame({"subject_id": [1, 1],
                           "prediction_time": [datetime(2009, 9, 15), prediction]})
    long = count_features(meds, points, ontology)
    later = dict(long.filter(pl.col("row") == 1).select("feature", "value").iter_rows())
    assert later == pytest.approx({
        "age_years": 60.0, "lifetime/Gender/F": math.log1p(1),
        "lifetime/MEDS_BIRTH": math.log1p(1),
        "lifetime/ICD10CM/E11": math.log1p(2), "recent/ICD10CM/E11": math.log1p(1),
        "lifetime/ICD10CM/E11.9": math.log1p(1),
        "lifetime/ICD10CM/E11.65": math.log1p(1), "recent/ICD10CM/E11.65": math.log1p(1),
        "lifetime/LOINC/2345-7": math.log1p(2), "recent/LOINC/2345-7": math.log1p(2),
        "last/LOINC/2345-7": 150.0,
    })
    earlier = dict(long.filter(pl.col("row") == 0).select("feature", "value").iter_rows())
    assert earlier["lifetime/ICD10CM/E11"] == pytest.approx(math.log1p(2))
    assert "last/LOINC/2345-7" not in earlier and "recent/ICD10CM/E11.9" not in earlier

    names = select_features(long, np.array([0, 1]), 3)  # most frequent first, ties by name
    assert names == ["age_years", "lifetime/Gender/F", "lifetime/ICD10CM/E11"]
    ranked = select_features(long, np.array([0, 1]), 100)
    assert ranked.index("recent/ICD10CM/E11.65") < ranked.index("last/LOINC/2345-7")
    matrix = feature_matrix(long, [*names, "last/LOINC/2345-7"], 2)
    assert np.isnan(matrix[0, 3]) and matrix[1, 3] == 150.0


def test_concordance_matches_sksurv_and_weights_act_as_copies() -> None:
    rng = np.random.default_rng(0)
    time = rng.integers(1, 20, 60).astype(float)  # many tied times
    event = rng.random(60) < 0.4
    risk = rng.integers(0, 5, 60).astype(float)  # many tied risks
    expected = concordance_index_censored(event, time, risk)[0]
    assert concordance(time, event, risk)[0] == pytest.approx(expected)
    weights = rng.integers(0, 3, 60)
    copies = np.repeat(np.arange(60), weights)
    assert concordance(time, event, risk, weights)[0] == pytest.approx(
        concordance(time[copies], event[copies], risk[copies])[0])


# --------------------------------------------------------------------------- end to end

SUBJECTS = 600
OUTCOMES = ("death", "diabetes")
EVAL_SETTINGS: dict[str, Any] = {"outcomes": outcome_codes(OUTCOMES),
                                 "train_sizes": (40, None), "repeats": 2, "bootstrap": 50,
                                 "seed": 0, "tokens_per_batch": 1024, "max_count_features": 500}


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MEDS dir, model bundle): 600 synthetic subjects and a tiny model pretrained 20 steps.

    Two in five subjects are moved to held_out (before pretraining, which leaves them out) so
    that the test set has enough deaths for finite metrics. Not the session's 300-subject
    `tiny_bundle`: with its own held_out split (10%) every metric is nan, and with two in five of
    its subjects moved to held_out (and used in its pretraining) the test set has 3 deaths and
    only the death C-index is finite; here it has 10, and 16 of the 20 metrics are finite.
    """
    from synthetic_data import prepare_work, pretrain_tiny, synthetic_meds

    root = tmp_path_factory.mktemp("evaluate")
    meds = synthetic_meds(root / "meds", SUBJECTS)
    splits_file = meds / "metadata/subject_splits.parquet"
    splits = pl.read_parquet(splits_file)
    held_out = pl.when(pl.col("subject_id") % 5 < 2).then(pl.lit("held_out"))
    splits.with_columns(split=held_out.otherwise("split")).write_parquet(splits_file)
    return meds, pretrain_tiny(prepare_work(meds, root / "work"), 20)


@pytest.fixture(scope="session")
def evaluated(bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    meds, model = bundle
    out = tmp_path_factory.mktemp("evaluation")
    result = evaluate(meds, model, out, oracle=synthetic_oracle(meds), **EVAL_SETTINGS)
    assert result.results_csv == out / "results.csv"
    assert result.table_markdown == (out / "results.md").read_text().rstrip("\n")
    return out


def test_evaluation_writes_finite_metrics_with_intervals_and_oracle(evaluated: Path) -> None:
    results = pl.read_csv(evaluated / "results.csv", schema=RESULT_SCHEMA)
    assert set(results["features"]) == {"motor", "counts", "oracle"}
    for outcome in OUTCOMES:
        for metric in ("c_index", "auroc"):
            task = results.filter((pl.col("outcome") == outcome) & (pl.col("metric") == metric))
            assert task.filter(pl.col("features") == "oracle").height == 1
    finite = results.filter(pl.col("mean").is_finite())
    assert finite.filter((pl.col("mean") < 0) | (pl.col("mean") > 1)).is_empty()
    assert finite.filter(~pl.col("ci_low").is_between(0, pl.col("mean"))
                         | ~pl.col("ci_high").is_between(pl.col("mean"), 1)).is_empty()
    death = results.filter((pl.col("outcome") == "death") & (pl.col("metric") == "c_index"))
    assert death["mean"].is_finite().all() and (death["events_test"] > 0).all()
    assert sorted(death.filter(pl.col("features") == "motor")["repeats_used"]) == [1, 2]
    assert pl.read_parquet(evaluated / "labels.parquet").schema == TASK_SCHEMA
    table = (evaluated / "results.md").read_text()
    assert table.startswith("| outcome | metric | train size | test (events) | MOTOR | counts |")
    assert "| death | c_index | 40 |" in table and " (all) |" in table
    assert (evaluated / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluation_is_deterministic(bundle: tuple[Path, Path], evaluated: Path,
                                     tmp_path: Path) -> None:
    meds, model = bundle
    evaluate(meds, model, tmp_path, oracle=synthetic_oracle(meds), **EVAL_SETTINGS)
    assert (tmp_path / "results.csv").read_bytes() == (evaluated / "results.csv").read_bytes()


def test_meds_label_file_is_one_binary_task(bundle: tuple[Path, Path], evaluated: Path,
                                            tmp_path: Path) -> None:
    meds, model = bundle
    deaths = pl.read_parquet(evaluated / "labels.parquet").filter(pl.col("outcome") == "death")
    labels = tmp_path / "mortality.parquet"
    deaths.select("subject_id", "prediction_time", boolean_value="event").write_parquet(labels)
    result = evaluate(meds, model, tmp_path / "out", labels_path=labels, train_sizes=(None,),
                      bootstrap=20, tokens_per_batch=1024, max_count_features=500)
    rows = result.results
    assert set(rows["outcome"]) == {"mortality"} and set(rows["metric"]) == {"auroc"}
    assert set(rows["features"]) == {"motor", "counts"}  # no oracle for a label file
    assert rows["mean"].is_finite().all()
    assert rows["n_test"][0] + rows["train_pool"][0] == deaths.height
