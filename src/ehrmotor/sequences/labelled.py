"""The labelled subjects' positions and each label's position: what featurization starts from.

`read_labels` takes labels in any of the accepted forms (`subject_id`, `prediction_time`);
`read_positions` builds the positions (`ehrmotor.sequences.positions.build_positions`) of the
labelled subjects from MEDS shards (`meds.scan_shard`) or a meds_reader database, each subject's
events after its latest prediction_time dropped first (its static, birth and first events are
kept, so that birth never moves); `label_positions` gives each label the last position whose time
is at or before its prediction_time (MEDS: the label may use data at exactly that time), refusing
labels of subjects absent from the data and labels on or before the birth date (position 0 folds
together the static events and every event of the birth day). `ehrmotor.representations` turns
them into the model's representations; fine-tuning (`ehrmotor.finetune.data`) into its inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from ehrmotor.errors import InputError, one_line
from ehrmotor.meds import DATA_COLUMNS, DATA_DTYPES, data_files, read_prediction_times, scan_shard
from ehrmotor.processes import process_pool
from ehrmotor.sequences.positions import BIRTH_CODE, build_positions
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import Tokenizer

LABEL_COLUMNS = ("subject_id", "prediction_time")
SHOWN = 5  # offending subjects or labels named in an error message
MEDS_READER_CHUNK = 10_000  # subjects per chunk when reading a meds_reader database

LabelsLike = Any  # list of dicts, polars or pandas DataFrame, parquet file or folder (str/Path)
Fitted = tuple[Tokenizer, Ontology]


def read_labels(labels: LabelsLike) -> pl.DataFrame:
    """Labels as `subject_id` Int64, `prediction_time` Datetime("us"), in input order.

    Accepts a sequence of dicts, a polars DataFrame/LazyFrame, a pandas DataFrame, or the path of
    a label file or folder of one task (`ehrmotor.meds.read_prediction_times`: every label file's
    checks, repeated keys refused, no label column needed). Labels given in memory keep femr's
    contract: repeated keys give repeated rows. Other columns are dropped; zoned times become
    naive UTC. InputError naming the column (and file) for a missing, mistyped or null column.
    """
    if isinstance(labels, str | Path):
        return read_prediction_times(labels)
    source = "labels"
    if isinstance(labels, pl.LazyFrame):
        frame = labels.collect()
    elif isinstance(labels, pl.DataFrame):
        frame = labels
    elif type(labels).__module__.split(".")[0] == "pandas":
        frame = pl.from_pandas(labels)
    elif isinstance(labels, Sequence):
        frame = _frame_from_dicts(labels)
    else:
        raise InputError(f"labels: unsupported type {type(labels).__name__}; expected a list of "
                         "dicts, a polars or pandas DataFrame, or a parquet path")
    for column in LABEL_COLUMNS:
        if column not in frame.columns:
            raise InputError(f"{source}: column '{column}' is missing; expected columns "
                             f"{', '.join(LABEL_COLUMNS)}")
    subject, time = frame.schema["subject_id"], frame.schema["prediction_time"]
    if not subject.is_integer():
        raise InputError(f"{source}: column 'subject_id' has type {subject}; expected integers")
    if not isinstance(time, pl.Datetime):
        raise InputError(f"{source}: column 'prediction_time' has type {time}; expected a "
                         "datetime (timestamp)")
    prediction_time = pl.col("prediction_time")
    if time.time_zone is not None:
        prediction_time = prediction_time.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    frame = frame.select(pl.col("subject_id").cast(pl.Int64),
                         prediction_time.cast(pl.Datetime("us")))
    for column in LABEL_COLUMNS:
        nulls = frame[column].null_count()
        if nulls:
            row = int(frame[column].is_null().arg_true()[0])
            raise InputError(f"{source}: column '{column}' has {nulls} null values (first at row "
                             f"{row}); expected none")
    return frame


def _frame_from_dicts(rows: Sequence[Any]) -> pl.DataFrame:
    if not all(isinstance(row, Mapping) for row in rows):
        raise InputError("labels: a list of labels must hold dicts with subject_id and "
                         "prediction_time")
    if not rows:
        return pl.DataFrame(schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})
    # Per label, bookkeeping only: extra columns of mixed types must not break inference.
    kept = [{c: row[c] for c in LABEL_COLUMNS if c in row} for row in rows]
    try:
        return pl.from_dicts(kept, infer_schema_length=None)
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"labels: cannot build a table from the dicts ({one_line(exc)})") from exc


def _trim(events: pl.LazyFrame, horizons: pl.DataFrame) -> pl.LazyFrame:
    """Events of the labelled subjects up to their horizon (latest prediction_time).

    Static events, MEDS_BIRTH and each subject's first timed event are always kept, so the birth
    that `build_positions` derives does not depend on the horizon.
    """
    time = pl.col("time")
    # is_in lets the parquet reader skip row groups without labelled subjects.
    wanted = events.filter(pl.col("subject_id").is_in(horizons["subject_id"].implode()))
    return wanted.join(horizons.lazy(), on="subject_id", how="inner").filter(
        time.is_null() | (time <= pl.col("horizon")) | (pl.col("code") == BIRTH_CODE)
        | (time == time.min().over("subject_id"))
    ).select(DATA_COLUMNS)


_worker_fitted: Fitted | None = None


def _init_worker(tokenizer: Tokenizer, ontology: Ontology) -> None:
    global _worker_fitted
    _worker_fitted = (tokenizer, ontology)


def _shard_positions(path: Path, horizons: pl.DataFrame, fitted: Fitted | None = None
                     ) -> pl.DataFrame:
    """Positions of the labelled subjects of one MEDS shard, trimmed to their horizons."""
    fitted = fitted or _worker_fitted
    if fitted is None:
        raise RuntimeError("feature worker started without a tokenizer and ontology")
    events = _trim(scan_shard(path), horizons).collect()
    return build_positions(events, *fitted) if events.height else pl.DataFrame()


def _meds_positions(meds_dir: Path, horizons: pl.DataFrame, fitted: Fitted,
                    num_proc: int) -> list[pl.DataFrame]:
    files = data_files(meds_dir)
    if num_proc <= 1 or len(files) == 1:
        bar = tqdm(files, desc="feature shards", unit="shard", disable=None)
        return [_shard_positions(file, horizons, fitted) for file in bar]
    with process_pool(min(num_proc, len(files)), initializer=_init_worker,
                      initargs=fitted) as pool:
        futures = [pool.submit(_shard_positions, file, horizons) for file in files]
        bar = tqdm(futures, desc="feature shards", unit="shard", disable=None)
        return [future.result() for future in bar]


def meds_reader_events(subjects: Iterable[Any]) -> pl.DataFrame:
    """MEDS event rows (DATA_COLUMNS) of meds_reader `Subject` objects.

    meds_reader hands out one Python object per event, so this is the one per-event Python step.
    """
    columns: dict[str, list[Any]] = {name: [] for name in DATA_COLUMNS}
    for subject in subjects:
        events = subject.events
        columns["subject_id"] += [subject.subject_id] * len(events)
        for name in DATA_COLUMNS[1:]:  # absent properties read as None
            columns[name] += [getattr(event, name) for event in events]
    return pl.DataFrame(columns, schema=DATA_DTYPES)


def _meds_reader_positions(db: Any, horizons: pl.DataFrame, fitted: Fitted,
                           num_proc: int) -> list[pl.DataFrame]:
    import meds_reader

    if not hasattr(db, "path_to_database"):
        db = meds_reader.SubjectDatabase(str(db))
    known = np.fromiter(iter(db), dtype=np.int64)
    wanted = horizons["subject_id"].to_numpy()
    wanted = wanted[np.isin(wanted, known)]  # unknown subjects are reported with the labels
    chunks = [wanted[i:i + MEDS_READER_CHUNK] for i in range(0, len(wanted), MEDS_READER_CHUNK)]
    pool = (meds_reader.SubjectDatabase(db.path_to_database, num_threads=num_proc)
            if num_proc > 1 else nullcontext(db))
    positions = []
    with pool as reader:
        for chunk in tqdm(chunks, desc="feature subjects", unit="chunk", disable=None):
            if num_proc > 1:
                parts = list(reader.filter(chunk.tolist()).map(meds_reader_events))
            else:
                parts = [meds_reader_events(reader[int(i)] for i in chunk)]
            events = _trim(pl.concat(parts).lazy(), horizons).collect()
            positions.append(build_positions(events, *fitted))
    return positions


def read_positions(db: Any, labels: pl.DataFrame, fitted: Fitted,
                    num_proc: int) -> pl.DataFrame:
    """Positions of the labelled subjects, sorted by subject and position, rows contiguous."""
    horizons = labels.group_by("subject_id").agg(horizon=pl.col("prediction_time").max())
    is_meds_reader = hasattr(db, "path_to_database") or (Path(db) / "meds_reader.version").exists()
    if is_meds_reader:
        parts = _meds_reader_positions(db, horizons, fitted, num_proc)
    else:
        parts = _meds_positions(Path(db), horizons, fitted, num_proc)
    parts = [part for part in parts if not part.is_empty()]
    if not parts:
        return pl.DataFrame(schema={"subject_id": pl.Int64, "position": pl.Int32,
                                    "time": pl.Int64})
    positions = pl.concat(parts, how="vertical")
    starts = positions.filter(pl.col("position") == 0)["subject_id"]
    if starts.n_unique() != starts.len():
        split = starts.filter(starts.is_duplicated()).unique().sort().head(SHOWN).to_list()
        raise InputError(f"{db}: subjects {split} appear in more than one shard; MEDS keeps each "
                         "subject in one shard")
    return positions.sort("subject_id", "position")


def label_positions(labels: pl.DataFrame, positions: pl.DataFrame) -> pl.DataFrame:
    """label, subject_id and `position`: the last position at or before each label's time.

    Raises InputError for unknown subjects and for labels on or before the birth date.
    """
    births = positions.filter(pl.col("position") == 0).select(
        "subject_id", birth=pl.col("time").cast(pl.Datetime("us")))
    unknown = labels.join(births, on="subject_id", how="anti")["subject_id"].unique().sort()
    if unknown.len():
        raise InputError(f"labels: {unknown.len()} subjects are not in the data: "
                         f"{', '.join(map(str, unknown.head(SHOWN).to_list()))}"
                         f"{' ...' if unknown.len() > SHOWN else ''}")
    labels = labels.join(births, on="subject_id", how="left", maintain_order="left")
    unborn = labels.filter(pl.col("birth").is_null())["subject_id"].unique().sort()
    if unborn.len():
        raise InputError(f"labels: subjects {unborn.head(SHOWN).to_list()} have no timed events, "
                         "hence no birth time; features need one")
    early = labels.filter(pl.col("prediction_time").dt.date() <= pl.col("birth").dt.date())
    if early.height:
        before = early.filter(pl.col("prediction_time") < pl.col("birth"))
        example = (before if before.height else early).row(0, named=True)
        raise InputError(
            f"labels: {early.height} labels fall on or before the subject's birth date "
            f"({before.height} before birth), e.g. subject {example['subject_id']} at "
            f"{example['prediction_time']} (birth {example['birth']}); the first position holds "
            "every event of the birth day, so features start the day after birth")
    ends = positions.group_by("subject_id", "time").agg(pl.col("position").max()).sort("time")
    located = labels.with_columns(time=pl.col("prediction_time").dt.epoch("us")).sort("time") \
        .join_asof(ends, on="time", by="subject_id", strategy="backward",
                   check_sortedness=False).sort("label")
    if located["position"].null_count():  # unreachable: every subject has position 0 at birth
        raise ValueError("labels: some labels found no position at or before their time")
    return located.select("label", "subject_id", "position")
