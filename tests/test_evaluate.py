"""Tests of `ehrmotor.evaluate` without a model: landmark labels, evaluation subjects and label
files, count features, the k-shot draws and the report's cells (the whole evaluation on a model:
test_evaluate_protocol.py)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from meds_builders import rows_table, write_table

from ehrmotor.cli import main
from ehrmotor.errors import InputError, OutputError
from ehrmotor.evaluate import LandmarkSettings, landmark_label_sets
from ehrmotor.evaluate.counts import count_features, feature_matrix, select_features
from ehrmotor.evaluate.landmarks import write_landmark_labels
from ehrmotor.evaluate.metrics import subject_resamples
from ehrmotor.evaluate.protocol import (
    Draw,
    Fit,
    Method,
    Targets,
    TaskData,
    fit_task,
    kshot_draws,
    split_subjects,
)
from ehrmotor.evaluate.report import Report, markdown
from ehrmotor.evaluate.run import unseen_splits
from ehrmotor.evaluate.scoring import (
    RESULT_SCHEMA,
    metrics_for,
    score_difference,
    score_method,
    task_scoring,
)
from ehrmotor.evaluate.tasks import Task, evaluation_subjects, tasks_from_label_sets
from ehrmotor.meds import LabelSet, read_label_set
from ehrmotor.vocabulary.ontology import Ontology

BIRTH = datetime(1950, 1, 1)
LAST = datetime(2013, 1, 1)
HF = {"heart_failure": ["ICD10CM/I50"]}


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


def subject(visits: list[datetime], *extra: tuple[datetime, str, float | None],
            last: datetime = LAST) -> list[tuple[Any, str, Any]]:
    """Born 1950-01-01 (a birth-day visit, never a landmark), `visits`, a last event at `last`."""
    return [(None, "Gender/F", None), (BIRTH, "MEDS_BIRTH", None), (BIRTH, "Visit/IP", None),
            *[(time, "Visit/OP", None) for time in visits], (last, "CPT4/99213", None), *extra]


VISITS = [datetime(2010, 1, 1, 9), datetime(2010, 3, 1, 9), datetime(2010, 9, 1, 9),
          datetime(2011, 6, 1, 9), datetime(2012, 1, 1, 9)]


@pytest.fixture
def landmark_meds(tmp_path: Path) -> Path:
    events = {
        1: subject(VISITS, (datetime(2011, 1, 1), "ICD10CM/I50.9", None),
                   (datetime(2012, 6, 1), "ICD10CM/I50.22", None)),
        2: subject(VISITS),  # never: censored at its last event
        3: subject(VISITS, (datetime(2010, 9, 1, 9), "ICD10CM/I50", None)),  # at a visit
        4: subject(VISITS),  # train split: never evaluated
        5: [(BIRTH, "MEDS_BIRTH", None), (datetime(2000, 1, 1), "Visit/OP", None),
            (datetime(2000, 1, 1), "CPT4/99213", None),
            (datetime(2000, 1, 1), "MEDS_DEATH", None)],  # its only visit is its last event
        6: subject(VISITS, (datetime(2010, 6, 1), "ICD10CM/I509", None)),  # not under I50.
    }
    splits = {1: "held_out", 2: "tuning", 3: "held_out", 4: "train", 5: "held_out",
              6: "held_out"}
    return write_dataset(tmp_path / "meds", events, splits)


def frame_rows(label_set: LabelSet) -> dict[tuple[int, datetime], tuple[Any, Any]]:
    return {(sid, time): (event, censor) for sid, time, event, censor in label_set.frame.select(
        "subject_id", "prediction_time", "event_time", "censor_time").iter_rows()}


def test_landmarks_every_visit_drop_prevalent_and_censor_at_the_last_event(
        landmark_meds: Path) -> None:
    everything = LandmarkSettings(landmarks=10, min_gap_days=0, landmark_codes=("Visit/",))
    (hf,) = landmark_label_sets(landmark_meds, HF, everything)
    assert (hf.name, hf.kind) == ("heart_failure", "time_to_event")
    rows = frame_rows(hf)
    first_event = datetime(2011, 1, 1)
    assert {key for key in rows if key[0] == 1} == {(1, t) for t in VISITS[:3]}  # later: prevalent
    assert all(rows[(1, t)] == (first_event, None) for t in VISITS[:3])
    assert {key: value for key, value in rows.items() if key[0] == 2} == {
        (2, t): (None, LAST) for t in VISITS}
    assert {t for s, t in rows if s == 3} == set(VISITS[:2])  # the event at a visit: prevalent
    assert {t for s, t in rows if s == 6} == set(VISITS)  # I509 is not under I50.
    assert all(rows[(6, t)] == (None, LAST) for t in VISITS)
    assert {s for s, _ in rows} == {1, 2, 3, 6}  # 4: train; 5: no visit before its last event


def test_landmarks_are_seeded_visits_at_least_the_gap_apart(landmark_meds: Path) -> None:
    drawn = set()
    for seed in range(8):
        settings = LandmarkSettings(landmarks=3, min_gap_days=180, seed=seed,
                                    landmark_codes=("Visit/",))
        (death,) = landmark_label_sets(landmark_meds, {"death": ["MEDS_DEATH"]}, settings)
        for _, times in death.frame.group_by("subject_id"):
            chosen = sorted(times["prediction_time"])
            assert set(chosen) <= set(VISITS) and len(chosen) <= 3
            assert all(b - a >= timedelta(days=180) for a, b in zip(chosen, chosen[1:],
                                                                    strict=False))
            # a draw stops early only when every other visit is within the gap of a chosen one
            if len(chosen) < 3:
                assert all(any(abs(v - c) < timedelta(days=180) for c in chosen) for v in VISITS)
        drawn.add(tuple(death.frame.filter(pl.col("subject_id") == 2)["prediction_time"]))
        again = landmark_label_sets(landmark_meds, {"death": ["MEDS_DEATH"]}, settings)[0]
        assert again.frame.equals(death.frame)
    assert len(drawn) > 1


def test_evaluation_subjects_are_the_chosen_splits_never_train(landmark_meds: Path) -> None:
    assert evaluation_subjects(landmark_meds).to_list() == [1, 2, 3, 5, 6]
    assert evaluation_subjects(landmark_meds, ("tuning",)).to_list() == [2]
    with pytest.raises(InputError, match="train split is what pretraining saw"):
        evaluation_subjects(landmark_meds, ("held_out", "train"))
    with pytest.raises(InputError, match=r"no subject in validation \(splits found: held_out"):
        evaluation_subjects(landmark_meds, ("validation",))


def test_evaluation_leaves_out_the_splits_pretraining_saw(
        caplog: pytest.LogCaptureFixture) -> None:
    model = Path("WORK/model")
    assert unseen_splits(("held_out", "tuning"), None, model) == ("held_out", "tuning")
    assert unseen_splits(("held_out", "tuning"), ("held_out", "tuning"), model) == (
        "held_out", "tuning")
    assert unseen_splits(("held_out", "tuning"), ("held_out",), model) == ("held_out",)
    assert "tuning left out: the model was pretrained on those subjects" in caplog.text
    with pytest.raises(InputError, match=r"pretrained on the tuning subjects \(prepare left out "
                                         r"only held_out\)"):
        unseen_splits(("tuning",), ("held_out",), model)


def test_label_files_keep_evaluation_subjects_after_their_birth_day(landmark_meds: Path) -> None:
    frame = pl.DataFrame({
        "subject_id": [1, 1, 4, 99, 2],
        "prediction_time": [BIRTH, VISITS[0], VISITS[0], VISITS[0], VISITS[1]],
        "boolean_value": [True, True, True, True, False]},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"),
                "boolean_value": pl.Boolean})
    (task,) = tasks_from_label_sets(landmark_meds, [LabelSet("mortality", "boolean", frame)],
                                    evaluation_subjects(landmark_meds), from_outcomes=False)
    assert (task.name, task.kind, task.target) == ("mortality", "binary", "label")
    # the birth day, a train subject and an unknown subject go
    assert task.labels.rows() == [(1, VISITS[0], True), (2, VISITS[1], False)]
    numbers = LabelSet("los", "float", frame.select(
        "subject_id", "prediction_time", float_value=pl.lit(2.0)), (Path("los.parquet"),))
    with pytest.raises(InputError, match="los.parquet: float labels are not evaluated yet"):
        tasks_from_label_sets(landmark_meds, [numbers], pl.Series([1]), from_outcomes=False)


def test_label_command_writes_label_files_and_replaces_only_its_own_folder(
        landmark_meds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "labels"
    assert main(["label", "--meds", str(landmark_meds), "--out", str(out), "--outcomes",
                 "heart_failure,death", "ICD10CM/I50.9", "--landmarks", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "ICD10CM_I50.9.parquet", "death.parquet", "heart_failure.parquet", "labels.json"]
    hf = read_label_set(out / "heart_failure.parquet")
    assert hf.kind == "time_to_event" and hf.frame.group_by("subject_id").len()["len"].max() == 2
    record = json.loads((out / "labels.json").read_text())
    assert record["outcomes"]["heart_failure"] == ["ICD10CM/I50"] and record["landmarks"] == 2
    assert main(["label", "--meds", str(landmark_meds), "--out", str(out), "--outcomes",
                 "death"]) == 0  # its own folder: replaced
    assert sorted(p.name for p in out.iterdir()) == ["death.parquet", "labels.json"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep\n")
    capsys.readouterr()
    assert main(["label", "--meds", str(landmark_meds), "--out", str(mine), "--outcomes",
                 "death"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("ehrmotor label: error: ") and "not a folder written by" in error
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(OutputError, match="not a folder written by"):
        write_landmark_labels(landmark_meds, mine, HF)


def test_cli_refuses_an_outcome_code_absent_from_the_data(
        landmark_meds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["label", "--meds", str(landmark_meds), "--out", str(tmp_path / "out"),
                 "--outcomes", "death", "flu"]) == 2
    assert "outcome flu: no event with code flu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- count features


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


# --------------------------------------------------------------------------- the protocol


def test_test_set_is_a_fixed_share_of_subjects() -> None:
    ids = np.repeat(np.arange(100, 200), 3)  # three labels per subject
    test, pool = split_subjects(ids, 0.5, seed=0)
    assert len(test) == len(pool) == 50 and not set(test) & set(pool)
    assert set(test) | set(pool) == set(range(100, 200))
    again, _ = split_subjects(ids[::-1], 0.5, seed=0)
    assert np.array_equal(test, again)
    assert not np.array_equal(test, split_subjects(ids, 0.5, seed=1)[0])


class Recorder:
    """A head that records the subjects it was trained on and scores risk = first feature."""

    def __init__(self) -> None:
        self.trained_on: list[np.ndarray] = []
        self.designs: list[tuple[int, int]] = []  # (columns, unpenalised) of each fit

    def fit(self, x: np.ndarray, targets: Targets, context: Any, unpenalised: int) -> Any:
        self.trained_on.append(np.unique(context.groups))
        self.designs.append((x.shape[1], unpenalised))
        return self

    def risk(self, x: np.ndarray) -> np.ndarray:
        return x[:, 0]

    def survival(self, x: np.ndarray, days: np.ndarray) -> None:
        return None


def test_kshot_draws_count_subjects_and_are_deterministic() -> None:
    pool = np.arange(1000, 1100)
    draws = kshot_draws(pool, (16, 32, 100, 128, None), 5, seed=3)
    assert [(d.k, d.replicate) for d in draws] == [
        *[(16, r) for r in range(5)], *[(32, r) for r in range(5)], (None, 0)]
    assert all(len(np.unique(d.subjects)) == (d.k or 100) for d in draws)
    assert set(draws[-1].subjects) == set(pool)
    same = kshot_draws(pool, (16, 32, 100, 128, None), 5, seed=3)
    assert all(np.array_equal(a.subjects, b.subjects) for a, b in zip(draws, same, strict=True))
    assert not np.array_equal(draws[0].subjects, draws[1].subjects)

    # every label of a drawn subject trains the head: k counts subjects, not label rows
    subjects = np.repeat(np.arange(1000, 1100), 7)
    data = TaskData(rows=np.arange(len(subjects)), subjects=subjects,
                    targets=Targets(None, np.arange(len(subjects)) % 3 == 0),
                    test=np.arange(0), pool_subjects=pool)
    recorder = Recorder()
    method = Method("fake", "fake", "motor", "binary", "motor", recorder.fit)
    features = {"motor": np.ones((len(subjects), 2)), "demographics": np.zeros((len(subjects), 1))}
    fits = fit_task(data, [method], features, draws[:6], seed=0, bin_edges_days=[0.0],
                    horizon_days=365)
    assert [len(s) for s in recorder.trained_on] == [16] * 5 + [32]
    # the demographics appended as the last column, unpenalised
    assert recorder.designs == [(3, 1)] * 6
    assert all(fit.skipped is None for fit in fits["fake"])


def scored_task(events: int, name: str = "rare") -> tuple[Task, list[dict[str, Any]]]:
    """A time-to-event task whose 40 test labels hold `events` events, scored with fake fits."""
    rng = np.random.default_rng(0)
    subjects = np.arange(80)
    event = np.zeros(80, dtype=bool)
    event[:events] = True
    event[40:60] = True
    time = rng.uniform(10, 500, 80)
    data = TaskData(rows=np.arange(80), subjects=subjects, targets=Targets(time, event),
                    test=np.arange(40), pool_subjects=subjects[40:], days=np.array([50., 100.]))
    methods = [Method("motor_cox", "MOTOR Cox", "motor", "time_to_event", "motor", Recorder().fit),
               Method("counts_cox", "counts Cox", "counts", "time_to_event", "counts",
                      Recorder().fit)]
    fits = {m.name: [Fit(Draw(None, 0, subjects[40:]), risk=rng.normal(size=40) - time[:40] / 100,
                         survival=np.full((40, 2), 0.9))] for m in methods}
    scoring = task_scoring(name, "time_to_event", data, subject_resamples(subjects[:40], 20, 0))
    rows = []
    for metric in metrics_for("time_to_event", 365):
        cells = {m.name: score_method(scoring, m, metric, None, fits[m.name]) for m in methods}
        rows += [*cells.values(), score_difference(scoring, metric, None, cells, methods, fits)]
    labels = pl.DataFrame({"subject_id": subjects, "prediction_time": [datetime(2010, 1, 1)] * 80,
                           "time_days": time, "event": event})
    return Task(name, "time_to_event", labels, False), rows


def test_too_few_test_events_print_the_reason_instead_of_a_number() -> None:
    rare, rare_rows = scored_task(3, "rare")
    common, common_rows = scored_task(20, "common")  # 10 or more events before tau
    results = pl.DataFrame([*rare_rows, *common_rows], schema=RESULT_SCHEMA)
    assert results.filter(pl.col("task") == "rare")["mean"].is_nan().all()
    assert results.filter(pl.col("task") == "common")["mean"].is_finite().all()
    text = markdown(Report(results, [rare, common], [], [], 365))
    rare_text, common_text = text.split("## common")
    table_rows = [line for line in rare_text.splitlines() if line.startswith("| all")]
    assert len(table_rows) == 3  # Harrell's C, Uno's C, integrated Brier
    for line in table_rows:
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert cells == ["too few events (3 < 10)"] * 3
    assert "Test set: 40 subjects, 40 labels, 3 events (3 subjects with one)." in rare_text
    assert "too few" not in common_text and "| all (40) | 0." in common_text


def test_difference_is_best_motor_minus_best_count_at_the_same_k_on_shared_draws() -> None:
    rng = np.random.default_rng(1)
    time = rng.uniform(10, 500, 60)
    event = rng.random(60) < 0.4
    data = TaskData(rows=np.arange(60), subjects=np.arange(60), targets=Targets(time, event),
                    test=np.arange(40), pool_subjects=np.arange(40, 60),
                    days=np.array([50.0, 100.0]))
    scoring = task_scoring("t", "time_to_event", data, subject_resamples(np.arange(40), 20, 0))
    methods = [Method(name, name, name.split("_")[0], "time_to_event", "x", Recorder().fit)
               for name in ("motor_a", "motor_b", "counts_a", "counts_b")]
    quality = {"motor_a": (3.0, 0.0), "motor_b": (1.0, 0.5), "counts_a": (0.0, 4.0),
               "counts_b": (0.5, 0.2)}  # signal at k=16 and at k=all
    draws = [Draw(16, 0, np.arange(40, 56)), Draw(16, 1, np.arange(44, 60)),
             Draw(None, 0, np.arange(40, 60))]
    fits = {name: [Fit(d, risk=-time[:40] / 100 * signal[d.k is None] + rng.normal(size=40))
                   for d in draws] for name, signal in quality.items()}
    fits["counts_a"][0] = Fit(draws[0], skipped="no event")  # k=16: one draw left to pair with
    harrell = metrics_for("time_to_event", 365)[0]
    for k, motor, counts in ((16, "motor_a", "counts_b"), (None, "motor_b", "counts_a")):
        cells = {m.name: score_method(scoring, m, harrell, k,
                                      [f for f in fits[m.name] if f.draw.k == k])
                 for m in methods}
        best_motor = max(("motor_a", "motor_b"), key=lambda n: cells[n]["mean"])
        best_counts = max(("counts_a", "counts_b"), key=lambda n: cells[n]["mean"])
        assert (best_motor, best_counts) == (motor, counts)
        row = score_difference(scoring, harrell, k, cells, methods, fits)
        assert row is not None and row["note"] == f"{motor} - {counts}"
        assert row["mean"] == pytest.approx(cells[motor]["mean"] - cells[counts]["mean"])
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    cells = {m.name: score_method(scoring, m, harrell, 16,
                                  [f for f in fits[m.name] if f.draw.k == 16]) for m in methods}
    cells["counts_b"]["mean"] = 0.0  # now counts_a, fitted on draw 1 only, is the best
    row = score_difference(scoring, harrell, 16, cells, methods, fits)
    assert row is not None and row["note"] == "motor_a - counts_a"
    assert (row["replicates_fitted"], row["replicates_skipped"]) == (1, 1)
    draw_1 = [f for f in fits["motor_a"] if f.draw.k == 16][1:]
    assert row["mean"] == pytest.approx(
        score_method(scoring, methods[0], harrell, 16, draw_1)["mean"] - cells["counts_a"]["mean"])
