"""MEDS label files (`ehrmotor.meds.labels`): ACES's output, the checks, time-to-event, writing."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from ehrmotor.errors import InputError, OutputError
from ehrmotor.meds import (
    LABEL_KINDS,
    VALUE_COLUMNS,
    LabelSet,
    read_label_set,
    read_prediction_times,
    time_to_event_days,
    write_label_set,
)
from ehrmotor.sequences.labelled import read_labels

# Made by tests/data/aces/make_fixture.sh: ACES 0.7.3 on `ehrmotor synth --subjects 150 --seed 3`.
ACES = Path(__file__).parent / "data" / "aces"
ACES_LABELS = ACES / "heart_failure_1y"
ACES_ROWS, ACES_SUBJECTS, ACES_POSITIVES = 2395, 136, 52

T0 = datetime(2020, 1, 1)


def write(path: Path, columns: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(columns).write_parquet(path)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(InputError) as caught:
        read_label_set(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- ACES fixture


def test_aces_output_folder_reads_as_boolean_task_named_after_folder() -> None:
    labels = read_label_set(ACES_LABELS)
    assert (labels.name, labels.kind) == ("heart_failure_1y", "boolean")
    assert labels.frame.schema == pl.Schema({"subject_id": pl.Int64,
                                             "prediction_time": pl.Datetime("us"),
                                             "boolean_value": pl.Boolean})
    assert labels.frame.height == ACES_ROWS
    assert labels.frame["subject_id"].n_unique() == ACES_SUBJECTS
    assert labels.frame["boolean_value"].sum() == ACES_POSITIVES
    assert labels.frame.equals(labels.frame.sort("subject_id", "prediction_time"))
    assert [f.relative_to(ACES_LABELS).as_posix() for f in labels.files] == [
        "held_out/0.parquet", "train/0.parquet", "tuning/0.parquet"]


def test_aces_logs_folder_is_skipped(tmp_path: Path) -> None:
    assert (ACES_LABELS / ".logs").is_dir()  # ACES wrote it beside the labels
    copy = shutil.copytree(ACES_LABELS, tmp_path / "heart_failure_1y")
    junk = {"subject_id": [1], "time": [T0], "code": ["x"]}  # not a label file
    write(copy / ".logs" / "0" / "stats.parquet", junk)
    write(copy / "_window_stats" / "0.parquet", junk)
    write(copy / "train" / ".0.parquet", junk)
    labels = read_label_set(copy)
    assert labels.frame.equals(read_label_set(ACES_LABELS).frame)
    assert len(labels.files) == 3


def test_task_name_given_wins_and_split_shard_names_the_cohort() -> None:
    assert read_label_set(ACES_LABELS, task_name="hf").name == "hf"
    one_shard = read_label_set(ACES_LABELS / "train" / "0.parquet")
    assert one_shard.name == "heart_failure_1y"
    assert one_shard.frame.height == 1874
    assert read_label_set(ACES_LABELS / "train").name == "heart_failure_1y"


def test_embed_read_labels_accepts_aces_folder() -> None:
    frame = read_labels(ACES_LABELS)
    assert frame.columns == ["subject_id", "prediction_time"]
    assert frame.height == ACES_ROWS
    assert frame.sort("subject_id", "prediction_time").equals(
        read_label_set(ACES_LABELS).frame.select("subject_id", "prediction_time"))
    assert read_labels(str(ACES_LABELS)).equals(frame)


def test_value_columns_are_meds_label_schema_columns() -> None:
    meds = pytest.importorskip("meds")
    schema = meds.LabelSchema
    assert (schema.subject_id_name, schema.prediction_time_name) == (
        "subject_id", "prediction_time")
    assert list(VALUE_COLUMNS.values()) == [
        schema.boolean_value_name, schema.integer_value_name, schema.float_value_name,
        schema.categorical_value_name]
    assert tuple(VALUE_COLUMNS) + ("time_to_event",) == LABEL_KINDS


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("stem", ["0", "17", "shard_0", "shard-3", "data-00000-of-00001",
                                  "part-00000-3f2a"])
def test_shard_file_stem_gives_way_to_folder_name(tmp_path: Path, stem: str) -> None:
    path = write(tmp_path / "readmission_30d" / f"{stem}.parquet",
                 {"subject_id": [1], "prediction_time": [T0], "boolean_value": [True]})
    assert read_label_set(path).name == "readmission_30d"


def test_file_stem_names_task(tmp_path: Path) -> None:
    path = write(tmp_path / "cohorts" / "long_los.parquet",
                 {"subject_id": [1], "prediction_time": [T0], "integer_value": [3]})
    labels = read_label_set(path)
    assert (labels.name, labels.kind, labels.files) == ("long_los", "integer", (path,))
    # a folder's one named file is its task (a folder of several files is several tasks)
    assert read_label_set(tmp_path / "cohorts").name == "long_los"


# --------------------------------------------------------------------------- reading


def test_times_in_any_unit_or_zone_become_naive_microseconds(tmp_path: Path) -> None:
    times = pl.Series([T0, T0 + timedelta(hours=5)])
    frame = pl.DataFrame({
        "subject_id": pl.Series([2, 1], dtype=pl.UInt32),
        "prediction_time": times.cast(pl.Datetime("ns")).dt.replace_time_zone("Etc/GMT-2"),
        "float_value": pl.Series([0.5, 1.5], dtype=pl.Float32),
        "note": ["dropped", "too"],
    })
    path = tmp_path / "los.parquet"
    frame.write_parquet(path)
    labels = read_label_set(path)
    assert labels.kind == "float"
    assert labels.frame.to_dict(as_series=False) == {
        "subject_id": [1, 2], "prediction_time": [T0 + timedelta(hours=3), T0 - timedelta(hours=2)],
        "float_value": [1.5, 0.5]}


def test_shards_of_a_folder_are_one_task_sorted(tmp_path: Path) -> None:
    write(tmp_path / "t" / "0.parquet", {"subject_id": [2, 1], "prediction_time": [T0, LATER],
                                         "categorical_value": ["a1", "a2"]})
    write(tmp_path / "t" / "1.parquet", {"subject_id": [1, 1], "prediction_time": [T0, EARLIER],
                                         "categorical_value": ["b1", "b2"]})
    frame = read_label_set(tmp_path / "t").frame
    assert frame["categorical_value"].to_list() == ["b2", "b1", "a2", "a1"]
    assert read_prediction_times(tmp_path / "t")["subject_id"].to_list() == [1, 1, 1, 2]


# --------------------------------------------------------------------------- checks

KEYS = {"subject_id": [1, 2], "prediction_time": [T0, T0]}
LATER, EARLIER = T0 + timedelta(days=3), T0 - timedelta(days=3)

BAD_FILES = {
    "null subject": ({"subject_id": [1, None], "prediction_time": [T0, T0],
                      "boolean_value": [True, False]}, ["column 'subject_id'", "row 1"]),
    "null time": ({"subject_id": [1, 2], "prediction_time": [T0, None],
                   "boolean_value": [True, False]},
                  ["column 'prediction_time'", "row 1", "subject 2"]),
    "missing key": ({"subject_id": [1], "boolean_value": [True]},
                    ["column 'prediction_time' is missing"]),
    "string subject": ({"subject_id": ["a", "b"], "prediction_time": [T0, T0],
                        "boolean_value": [True, False]},
                       ["column 'subject_id' has type String; expected integers"]),
    "subject too large": ({"subject_id": pl.Series([2**63, 1], dtype=pl.UInt64),
                           "prediction_time": [T0, T0], "boolean_value": [True, False]},
                          ["column 'subject_id'", "cannot convert it to Int64"]),
    "string time": ({**KEYS, "prediction_time": ["2020-01-01", "x"], "integer_value": [1, 2]},
                    ["column 'prediction_time' has type String; expected a datetime"]),
    "integer boolean": ({**KEYS, "boolean_value": [1, 0]},
                        ["column 'boolean_value' has type Int64; expected booleans"]),
    "two label columns": ({**KEYS, "boolean_value": [True, None], "float_value": [None, 1.0]},
                          ["columns boolean_value, float_value all hold labels"]),
    "no label column": ({**KEYS, "label": [True, False]}, ["no label column"]),
    "null label": ({**KEYS, "integer_value": [4, None]},
                   ["column 'integer_value'", "row 1", "subject 2", "null label"]),
    "only event_time": ({**KEYS, "event_time": [LATER, None]},
                        ["column 'censor_time' is missing"]),
    "neither time set": ({**KEYS, "event_time": [LATER, None], "censor_time": [None, None]},
                         ["column 'event_time'", "row 1", "subject 2",
                          "neither event_time nor censor_time is set"]),
    "event at prediction": ({**KEYS, "event_time": [LATER, T0], "censor_time": [None, LATER]},
                            ["column 'event_time'", "row 1", "subject 2",
                             "is not after prediction_time"]),
    "censor before prediction": ({**KEYS, "event_time": [None, None],
                                  "censor_time": [T0, EARLIER]},
                                 ["column 'censor_time'", "row 1", "subject 2",
                                  "is before prediction_time"]),
    "event after censor": ({**KEYS, "event_time": [LATER + timedelta(days=1), LATER],
                            "censor_time": [LATER, LATER]},
                           ["column 'event_time'", "row 0", "subject 1",
                            "is after censor_time"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_label_file_is_one_line_naming_file_column_row(tmp_path: Path, case: str) -> None:
    columns, expected = BAD_FILES[case]
    path = write(tmp_path / "task.parquet", columns)
    message = error_of(path)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_error_names_the_file_of_the_row_in_a_folder(tmp_path: Path) -> None:
    write(tmp_path / "tte" / "0.parquet", {**KEYS, "event_time": [LATER, LATER],
                                           "censor_time": [None, None]})
    bad = write(tmp_path / "tte" / "1.parquet", {**KEYS, "event_time": [LATER, None],
                                                 "censor_time": [LATER, EARLIER]})
    message = error_of(tmp_path / "tte")
    assert message.startswith(f"{bad}: column 'censor_time', row 1 (subject 2): censor_time")


def test_missing_path_and_folder_without_parquet(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "absent.parquet")
    (tmp_path / "empty" / ".logs").mkdir(parents=True)
    write(tmp_path / "empty" / ".logs" / "0.parquet", {**KEYS, "boolean_value": [True, True]})
    message = error_of(tmp_path / "empty")
    assert str(tmp_path / "empty") in message and "holds no parquet files" in message
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    assert "cannot read parquet" in error_of(tmp_path / "broken.parquet")


# --------------------------------------------------------------------------- time to event


def test_time_to_event_days_counts_to_event_else_to_censoring(tmp_path: Path) -> None:
    path = write(tmp_path / "death.parquet", {
        "subject_id": [3, 1, 2],
        "prediction_time": [T0, T0, T0 + timedelta(hours=12)],
        "event_time": [T0 + timedelta(days=10, hours=12), None, T0 + timedelta(days=2)],
        "censor_time": [T0 + timedelta(days=30), datetime(2020, 3, 1), None],
    })
    labels = read_label_set(path)
    assert labels.kind == "time_to_event"
    days = time_to_event_days(labels.frame)
    assert days.columns == ["subject_id", "prediction_time", "event_time", "censor_time",
                            "time_days", "event"]
    assert days.schema["time_days"] == pl.Float64 and days.schema["event"] == pl.Boolean
    assert days["subject_id"].to_list() == [1, 2, 3]
    assert days["time_days"].to_list() == [60.0, 1.5, 10.5]  # 2020 is a leap year
    assert days["event"].to_list() == [False, True, True]


def test_time_to_event_days_needs_the_time_columns() -> None:
    with pytest.raises(InputError, match="event_time, censor_time are missing"):
        time_to_event_days(pl.DataFrame({"prediction_time": [T0]}))


# --------------------------------------------------------------------------- writing

ROUND_TRIPS = {
    "boolean": pl.Series([True, False, True]),
    "integer": pl.Series([3, -1, 0]),
    "float": pl.Series([0.5, 2.25, -1.0]),
    "categorical": pl.Series(["a", "b", "a"]),
}


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_write_then_read_round_trips(tmp_path: Path, kind: str) -> None:
    keys = {"subject_id": [1, 1, 2], "prediction_time": [T0, LATER, T0]}
    if kind == "time_to_event":
        values = {"event_time": [LATER, None, None], "censor_time": [None, LATER, LATER]}
        frame = pl.DataFrame({**keys, **values}, schema_overrides={
            "event_time": pl.Datetime("us"), "censor_time": pl.Datetime("us")})
    else:
        frame = pl.DataFrame({**keys, VALUE_COLUMNS[kind]: ROUND_TRIPS[kind]})
    labels = LabelSet("task", kind, frame)
    path = write_label_set(labels, tmp_path / "out" / "task.parquet")
    back = read_label_set(path)
    assert (back.name, back.kind, back.files) == ("task", kind, (path,))
    assert back.frame.equals(frame)
    assert [p.name for p in path.parent.iterdir()] == ["task.parquet"]
    meds = pytest.importorskip("meds")
    if kind != "time_to_event":  # MEDS has no time-to-event label type
        import pyarrow.parquet as pq

        meds.LabelSchema.validate(pq.read_table(path))


def test_write_refuses_a_folder_and_bad_rows(tmp_path: Path) -> None:
    labels = LabelSet("t", "boolean", pl.DataFrame({**KEYS, "boolean_value": [True, False]}))
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        write_label_set(labels, tmp_path / "taken")
    broken = LabelSet("t", "time_to_event", pl.DataFrame(
        {**KEYS, "event_time": [T0, LATER], "censor_time": [LATER, LATER]}))
    with pytest.raises(InputError, match=r"labels t: column 'event_time', row 0 \(subject 1\)"):
        write_label_set(broken, tmp_path / "broken.parquet")
    assert not (tmp_path / "broken.parquet").exists()


def test_label_set_refuses_unknown_kind_and_missing_columns() -> None:
    with pytest.raises(InputError, match="kind 'binary'"):
        LabelSet("t", "binary", pl.DataFrame(KEYS))
    with pytest.raises(InputError, match="censor_time are missing"):
        LabelSet("t", "time_to_event", pl.DataFrame(KEYS))
