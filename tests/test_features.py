"""`compute_features`: result format, label-time cut-off, no leaks, inputs, windows and the
training context, equality with training, exact label times, errors.

One tiny bundle (context 1,024 positions) is trained per session (conftest `tiny_bundle`, built by
`synthetic_data.train_bundle`); each test computes features for a few subjects only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from features_fixtures import Subjects, at, read_events, write_meds_copy

from ehrmotor.bundle import record_fingerprint
from ehrmotor.cli import main
from ehrmotor.embed import compute_features, write_embeddings
from ehrmotor.errors import InputError
from ehrmotor.model import MotorModel
from ehrmotor.sequences.batching import collate_windows, pad_batch
from ehrmotor.sequences.labelled import read_labels
from ehrmotor.sequences.shards import load_prepared
from ehrmotor.vocabulary.bags import BagTable

SECOND = timedelta(seconds=1)
HOUR = timedelta(hours=1)
CONTEXT = 1024  # max_window the tiny bundle was prepared and trained with


@pytest.fixture(scope="session")
def trained(tiny_bundle: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_bundle


@pytest.fixture(scope="session")
def meds(trained: tuple[Path, Path]) -> Path:
    return trained[0]


@pytest.fixture(scope="session")
def bundle(trained: tuple[Path, Path]) -> Path:
    return trained[1]


@pytest.fixture(scope="session")
def events(meds: Path) -> pl.DataFrame:
    return read_events(meds)


@pytest.fixture(scope="session")
def subjects(events: pl.DataFrame, bundle: Path) -> Subjects:
    return Subjects.build(events, bundle)


@pytest.fixture(scope="session")
def labels(subjects: Subjects) -> pl.DataFrame:
    """Two labels per subject, at a third and two thirds of its positions, for 6 subjects."""
    rows = []
    for subject_id in subjects.with_sizes(20, 150, 6):
        times = subjects.times(subject_id)
        rows += [(subject_id, at(times[len(times) // 3])),
                 (subject_id, at(times[2 * len(times) // 3]))]
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64,
                                      "prediction_time": pl.Datetime("us")}, orient="row")


@pytest.fixture(scope="session")
def reference(meds: Path, bundle: Path, labels: pl.DataFrame) -> dict[str, np.ndarray]:
    return compute_features(meds, bundle, labels)


def test_result_has_one_sorted_row_per_label_with_femr_dtypes(
        meds: Path, bundle: Path, labels: pl.DataFrame) -> None:
    shuffled = pl.concat([labels, labels.head(1)]).sample(fraction=1.0, shuffle=True, seed=3)
    result = compute_features(meds, bundle, shuffled)
    hidden = MotorModel.from_pretrained(bundle).config.hidden_size
    assert set(result) == {"subject_ids", "feature_times", "features"}
    assert result["subject_ids"].dtype == np.int64
    assert result["feature_times"].dtype == np.dtype("datetime64[us]")
    assert result["features"].dtype == np.float32
    assert result["features"].shape == (shuffled.height, hidden)
    expected = shuffled.sort("subject_id", "prediction_time")
    assert result["subject_ids"].tolist() == expected["subject_id"].to_list()
    assert result["feature_times"].tolist() == expected["prediction_time"].to_list()
    duplicate = np.flatnonzero(result["feature_times"] == labels["prediction_time"][0])
    assert len(duplicate) == 2
    np.testing.assert_array_equal(*result["features"][duplicate])
    assert np.isfinite(result["features"]).all()


def test_label_at_an_event_time_sees_it_and_between_events_equals_the_earlier(
        meds: Path, bundle: Path, subjects: Subjects) -> None:
    subject_id = subjects.with_sizes(20, 150, 1)[0]
    times = subjects.times(subject_id)
    k = next(k for k in range(2, len(times) - 1)
             if times[k - 1] < times[k] - 1_000_000 and times[k + 1] > times[k] + 2_000_000)
    event, following = at(times[k]), at(next(t for t in times if t > times[k]))
    between = event + (following - event) // 2
    day_after_birth = datetime.combine(at(times[0]).date() + timedelta(days=1), datetime.min.time())
    assert at(times[1]) > day_after_birth + 2 * HOUR
    result = compute_features(meds, bundle, [
        {"subject_id": subject_id, "prediction_time": event - SECOND},
        {"subject_id": subject_id, "prediction_time": event},
        {"subject_id": subject_id, "prediction_time": between},
        {"subject_id": subject_id, "prediction_time": day_after_birth},
        {"subject_id": subject_id, "prediction_time": day_after_birth + HOUR}])
    first_day, first_day_later, before, at_event, after = result["features"]
    assert not np.allclose(before, at_event, atol=1e-4)
    np.testing.assert_allclose(after, at_event, atol=1e-6)
    # Before the first event after the birth day, the label reads position 0.
    np.testing.assert_allclose(first_day, first_day_later, atol=1e-6)
    assert not np.allclose(first_day, before, atol=1e-4)


def test_future_events_never_change_features(meds: Path, bundle: Path, events: pl.DataFrame,
                                             labels: pl.DataFrame, tmp_path: Path,
                                             reference: dict[str, np.ndarray]) -> None:
    # Subjects of the first half get events between their two labels, the rest after both.
    spans = labels.group_by("subject_id").agg(start=pl.col("prediction_time").min(),
                                             end=pl.col("prediction_time").max())
    inside = spans["subject_id"].sort().head(spans.height // 2).to_list()
    common = events.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))[
        "code"].value_counts(sort=True)["code"].head(4).to_list()
    added = [(subject_id, (start if subject_id in inside else end) + SECOND + step * 7 * HOUR,
              code)
             for subject_id, start, end in spans.iter_rows() for step, code in enumerate(common)]
    future = pl.DataFrame(added, schema=["subject_id", "time", "code"], orient="row")
    changed = write_meds_copy(pl.concat([events, future], how="diagonal_relaxed"), meds,
                              tmp_path / "future")
    result = compute_features(changed, bundle, labels)
    later = labels.sort("subject_id", "prediction_time").select(
        pl.col("subject_id").is_in(inside)
        & (pl.col("prediction_time") == pl.col("prediction_time").max().over("subject_id"))
    ).to_series().to_numpy()
    np.testing.assert_allclose(result["features"][~later], reference["features"][~later],
                               atol=1e-6)
    # The events between the labels were used by the later label: the check above is not vacuous.
    assert not np.allclose(result["features"][later], reference["features"][later],
                       atol=1e-4)


def test_label_inputs_list_polars_pandas_parquet_give_identical_results(
        meds: Path, bundle: Path, labels: pl.DataFrame, tmp_path: Path,
        reference: dict[str, np.ndarray]) -> None:
    with_extra = labels.with_columns(boolean_value=pl.lit(True))
    path = tmp_path / "labels.parquet"
    with_extra.write_parquet(path)
    inputs: list[object] = [with_extra.to_dicts(), str(path), path]
    pd = pytest.importorskip("pandas")
    inputs.append(pd.DataFrame(with_extra.to_dicts()))
    frames = [read_labels(given) for given in inputs]
    for frame in frames:
        assert frame.equals(read_labels(labels))
    for given in (inputs[0], inputs[1]):
        result = compute_features(meds, bundle, given)
        for key, value in reference.items():
            np.testing.assert_array_equal(result[key], value)


def test_meds_reader_database_gives_the_meds_directory_result(
        meds: Path, bundle: Path, labels: pl.DataFrame, tmp_path: Path,
        reference: dict[str, np.ndarray]) -> None:
    meds_reader = pytest.importorskip("meds_reader")
    convert = shutil.which("meds_reader_convert") or str(Path(sys.executable).parent
                                                         / "meds_reader_convert")
    database = tmp_path / "reader"
    subprocess.run([convert, str(meds), str(database)], check=True, capture_output=True)
    with meds_reader.SubjectDatabase(str(database)) as db:
        from_object = compute_features(db, bundle, labels)
    from_path = compute_features(str(database), bundle, labels)
    for result in (from_object, from_path):
        np.testing.assert_array_equal(result["subject_ids"], reference["subject_ids"])
        np.testing.assert_allclose(result["features"], reference["features"], atol=1e-6)


def test_worker_processes_give_the_in_process_result(
        meds: Path, bundle: Path, labels: pl.DataFrame,
        reference: dict[str, np.ndarray]) -> None:
    result = compute_features(meds, bundle, labels, num_proc=2)
    np.testing.assert_allclose(result["features"], reference["features"], atol=1e-6)


def test_windows_are_position_zero_plus_the_positions_ending_at_the_label(
        meds: Path, bundle: Path, subjects: Subjects, events: pl.DataFrame) -> None:
    window = 32
    subject_id = subjects.with_sizes(80, 400, 1)[0]
    times = subjects.times(subject_id)
    late = next(p for p in range(60, len(times) - 1) if times[p] < times[p + 1])
    early = next(p for p in range(10, window - 1) if times[p] < times[p + 1])
    labels = [{"subject_id": subject_id, "prediction_time": at(times[p])} for p in (early, late)]
    small = compute_features(meds, bundle, labels, context=window)
    large = compute_features(meds, bundle, labels)
    # Within the first window - 1 positions the window is the whole history either way.
    np.testing.assert_allclose(small["features"][0], large["features"][0], atol=1e-5)
    # Later: position 0, then the window - 1 positions ending at the label, encoded directly.
    rows = subjects.positions.filter(pl.col("subject_id") == subject_id).sort("position")
    kept = rows.filter((pl.col("position") == 0) | pl.col("position").is_between(
        late - (window - 2), late))
    sizes = kept["entries"].list.len().to_numpy()
    flat = {name: kept[name].list.explode(keep_nulls=False, empty_as_null=False).to_numpy()
            for name in ("entries", "weights")}
    model = MotorModel.from_pretrained(bundle).eval()
    with torch.no_grad():
        hidden = model.encode(
            torch.tensor(flat["entries"].astype(np.int64)), torch.tensor(flat["weights"]),
            torch.tensor(np.cumsum(sizes) - sizes),
            torch.tensor(kept.select("age", "log_age", "log_delta").to_numpy()),
            torch.tensor(kept["age_days"].to_numpy()), torch.zeros(kept.height, dtype=torch.long))
    assert kept.height == window
    np.testing.assert_allclose(small["features"][1], hidden[-1].numpy(), atol=1e-5)
    assert not np.allclose(small["features"][1], large["features"][1], atol=1e-4)


def one_window_training_rows(bundle: Path, subjects: Subjects, count: int
                             ) -> list[dict[str, torch.Tensor]]:
    """`count` prepared train windows (torch format, as Trainer reads them) of subjects whose
    whole history fits the context, spread over the dataset."""
    train = load_prepared(bundle.parent / "pretraining_files" / "train_batches")
    fits = set(subjects.sizes().filter(pl.col("positions") <= CONTEXT)["subject_id"].to_list())
    index = pl.DataFrame({"subject_id": train.with_format("arrow")["subject_id"]}).with_row_index()
    chosen = index.filter(pl.col("subject_id").is_in(list(fits)))["index"].to_numpy()
    assert len(chosen) >= count
    return [train[int(i)] for i in chosen[np.linspace(0, len(chosen) - 1, count).astype(int)]]


def test_representation_at_a_training_point_equals_compute_features_there(
        meds: Path, bundle: Path, subjects: Subjects) -> None:
    rows = one_window_training_rows(bundle, subjects, 8)
    model = MotorModel.from_pretrained(bundle).eval()
    # What the model computes at the sampled points of its training windows (one packed batch).
    with torch.no_grad():
        trained = model(**collate_windows(rows, bags=BagTable.load(
            bundle.parent / "pretraining_files" / "tokenizer"))).representations
    labels = pl.DataFrame([
        (int(row["subject_id"]), at(int(row["times"][point])))
        for row in rows for point in row["points"].tolist()],
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")}, orient="row")
    assert labels.height >= 40
    order = labels.with_row_index().sort("subject_id", "prediction_time")["index"].to_numpy()
    result = compute_features(meds, bundle, labels)
    np.testing.assert_allclose(result["features"], trained.numpy()[order], atol=1e-5,
                               rtol=1e-5)


def test_embeddings_do_not_change_with_tokens_per_batch(
        meds: Path, bundle: Path, labels: pl.DataFrame,
        reference: dict[str, np.ndarray]) -> None:
    # The reference packs with the default budget, the context; 1,025 and 4 times the context
    # pack the same windows differently.
    for budget in (CONTEXT + 1, 4 * CONTEXT):
        result = compute_features(meds, bundle, labels, tokens_per_batch=budget)
        np.testing.assert_allclose(result["features"], reference["features"], atol=1e-5)


def test_context_is_the_models_from_its_config_else_it_must_be_given(
        meds: Path, bundle: Path, subjects: Subjects, tmp_path: Path) -> None:
    assert json.loads((bundle / "config.json").read_text())["max_window"] == CONTEXT
    subject_id = subjects.with_sizes(80, 400, 1)[0]
    times = subjects.times(subject_id)
    labels = [{"subject_id": subject_id, "prediction_time": at(times[p])} for p in (40, 70)]
    expected = compute_features(meds, bundle, labels, context=16)["features"]

    def edited(name: str, config: dict, summary: dict) -> Path:
        copy = shutil.copytree(bundle, tmp_path / name)
        for file, change in (("config.json", config), ("training_summary.json", summary)):
            document = {**json.loads((copy / file).read_text()), **change}
            (copy / file).write_text(json.dumps({k: v for k, v in document.items()
                                                 if v is not None}))
        record_fingerprint(copy)  # edited on purpose: tie the parts together again
        return copy

    recorded = edited("recorded", {"max_window": 16}, {})
    np.testing.assert_allclose(compute_features(meds, recorded, labels)["features"], expected,
                               atol=1e-6)
    # The summary's max_window (bundles of before 12-01) is no longer read.
    unknown = edited("unknown", {"max_window": None}, {"max_window": 16})
    with pytest.raises(InputError, match="records no training context"):
        compute_features(meds, unknown, labels)
    np.testing.assert_allclose(compute_features(meds, unknown, labels, context=16)["features"],
                               expected, atol=1e-6)


def test_tokens_per_batch_below_the_context_is_an_input_error_naming_both(
        meds: Path, bundle: Path, labels: pl.DataFrame) -> None:
    with pytest.raises(InputError, match=rf"tokens_per_batch 512 is smaller than the context of "
                                         rf"{CONTEXT} positions"):
        compute_features(meds, bundle, labels, tokens_per_batch=512)
    with pytest.raises(InputError, match="tokens_per_batch 16 is smaller than the context of 32"):
        compute_features(meds, bundle, labels, tokens_per_batch=16, context=32)


def test_batches_padded_to_one_shape_give_the_same_representations(
        bundle: Path, subjects: Subjects) -> None:
    # CUDA pads every batch to tokens_per_batch; the padding must not reach real positions.
    batch = collate_windows(one_window_training_rows(bundle, subjects, 4),
                            bags=BagTable.load(bundle.parent / "pretraining_files" / "tokenizer"))
    model = MotorModel.from_pretrained(bundle).eval()
    with torch.no_grad():
        plain = model.encode(**{k: v for k, v in batch.items() if k != "point_indices"})
        padded = model.encode(**{k: v for k, v in pad_batch(batch, CONTEXT * 2).items()
                                 if k != "point_indices"})
    assert padded.shape[0] == CONTEXT * 2
    np.testing.assert_allclose(padded[:len(plain)].numpy(), plain.numpy(), atol=1e-6)


def test_label_errors_name_the_problem(meds: Path, bundle: Path, subjects: Subjects,
                                      events: pl.DataFrame, tmp_path: Path) -> None:
    subject_id = subjects.with_sizes(20, 150, 1)[0]
    birth = subjects.birth(subject_id)
    cases = {
        "not in the data: 999999999": [{"subject_id": 999_999_999,
                                        "prediction_time": birth + timedelta(days=400)}],
        "before birth": [{"subject_id": subject_id, "prediction_time": birth - SECOND}],
        "on or before the subject's birth date": [{
            "subject_id": subject_id,
            "prediction_time": datetime.combine(birth.date(), datetime.max.time())}],
        "column 'prediction_time' is missing": [{"subject_id": subject_id}],
    }
    for message, labels in cases.items():
        with pytest.raises(ValueError, match=message):
            compute_features(meds, bundle, labels)
    # A subject with static events only has no birth, so no day after it.
    static = pl.DataFrame({"subject_id": [1], "code": [events["code"][0]]})
    copy = write_meds_copy(pl.concat([events, static], how="diagonal_relaxed"), meds, tmp_path)
    with pytest.raises(ValueError, match=r"subjects \[1\] have no timed events"):
        compute_features(copy, bundle, [{"subject_id": 1, "prediction_time": birth}])


def test_read_labels_rejects_bad_columns_in_one_line(tmp_path: Path) -> None:
    when = datetime(2020, 1, 1)
    with pytest.raises(ValueError, match="'subject_id' has type String"):
        read_labels(pl.DataFrame({"subject_id": ["a"], "prediction_time": [when]}))
    with pytest.raises(ValueError, match="'prediction_time' has 1 null values"):
        read_labels([{"subject_id": 1, "prediction_time": when},
                     {"subject_id": 2, "prediction_time": None}])
    with pytest.raises(ValueError, match=r"labels file .*missing\.parquet: not found"):
        read_labels(tmp_path / "missing.parquet")
    zoned = read_labels(pl.DataFrame({"subject_id": [1], "prediction_time": [when]}).with_columns(
        pl.col("prediction_time").dt.replace_time_zone("Etc/GMT-2")))
    assert zoned["prediction_time"].to_list() == [when - timedelta(hours=2)]


def test_write_embeddings_round_trips(reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    path = write_embeddings(reference, tmp_path / "out" / "embeddings.parquet")
    table = pq.read_table(path)
    hidden = reference["features"].shape[1]
    assert str(table.schema.field("subject_id").type) == "int64"
    assert str(table.schema.field("prediction_time").type) == "timestamp[us]"
    embedding_type = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding_type)
    assert (embedding_type.list_size, embedding_type.value_type) == (hidden, pa.float32())
    assert table["subject_id"].to_numpy().tolist() == reference["subject_ids"].tolist()
    np.testing.assert_array_equal(table["prediction_time"].to_numpy(), reference["feature_times"])
    embedding = np.stack(table["embedding"].to_pylist()).astype(np.float32)
    np.testing.assert_array_equal(embedding, reference["features"])
    assert [p.name for p in path.parent.iterdir()] == ["embeddings.parquet"]


def test_embed_output_joins_back_to_every_label_with_sub_second_times(
        meds: Path, bundle: Path, subjects: Subjects, tmp_path: Path) -> None:
    rows = []
    for offset, subject_id in enumerate(subjects.with_sizes(20, 150, 5)):
        times = subjects.times(subject_id)
        for p in (5, 10, len(times) // 2):
            # Sub-second times, a few µs or most of a second after an event (never floored).
            rows.append((subject_id, at(times[p] + 1 + 123_457 * offset * p % 999_999)))
    labels = pl.DataFrame(rows, schema={"subject_id": pl.Int64,
                                        "prediction_time": pl.Datetime("us")}, orient="row")
    assert (labels["prediction_time"].dt.microsecond() > 0).all()
    labels.write_parquet(tmp_path / "labels.parquet")
    out = tmp_path / "embeddings.parquet"
    assert main(["embed", "--model", str(bundle), "--meds", str(meds), "--labels",
                 str(tmp_path / "labels.parquet"), "--out", str(out)]) == 0
    written = pl.read_parquet(out)
    assert written.schema["prediction_time"] == pl.Datetime("us")
    joined = labels.join(written, on=["subject_id", "prediction_time"], how="left")
    assert joined.height == labels.height and joined["embedding"].null_count() == 0
