"""Patient representations at label times: `compute_features`, with femr's call and result.

`compute_features(db, model_path, labels)` returns one row per label, sorted by
(subject_id, prediction_time); labels with equal keys (duplicates included) keep their input order:

    subject_ids    int64 (n,)
    feature_times  datetime64[us] (n,)  each label's prediction_time, exactly as given
    features       float32 (n, hidden)  the model's final representation (`MotorModel.encode`)

The path is training's up to the encoder: MEDS shards (`meds.scan_shard`, or a meds_reader
database) -> `positions.build_positions` -> `windows` -> `batching.pack`, `collate_windows` ->
`MotorModel.encode`; only the windows cut differ, and no labels ride along (just the points read).

Policies:
- A label's representation is read at the last position whose time is at or before its
  prediction_time (MEDS: the label may use data at exactly that time). Before anything is built,
  each subject's events after its latest prediction_time are dropped (its static, birth and first
  events are kept so that birth never moves), so no later event can reach a label.
- Position 0 folds together the static events and every event of the birth day, so a label on the
  birth day could see events after its prediction_time: labels on or before the birth date are
  refused with an InputError (a ValueError), as are labels of subjects absent from the data.
- Windows as training sees a position (`ehrmotor.sequences.windows`): position 0, then at most
  context - 1 positions ending at the label's. The context is the model's
  (`MotorConfig.max_window`; older bundles: training_summary.json's). At a training point whose
  history fits one training window, the representation equals the one training computed.
- `tokens_per_batch` is only a packing budget (default and minimum: the context). `model.encode`
  runs under `torch.no_grad()`, under bf16 autocast where pretraining's precision "auto" picks it
  (`precision.auto_uses_bf16`: CUDA, and CPUs with AMX-BF16 for models at least 256 wide),
  else in fp32; on CUDA batches are padded to `tokens_per_batch` so the attention kernel
  keeps one shape.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from ehrmotor.artifacts import atomic_path
from ehrmotor.bundle import Bundle, load_bundle
from ehrmotor.convert.femr_features import femr_bundle_features
from ehrmotor.errors import InputError, one_line
from ehrmotor.meds import DATA_COLUMNS, DATA_DTYPES, data_files, read_prediction_times, scan_shard
from ehrmotor.model import MotorModel
from ehrmotor.precision import auto_uses_bf16
from ehrmotor.processes import process_pool
from ehrmotor.sequences.batching import collate_windows, frame_rows, pack, pad_batch
from ehrmotor.sequences.positions import BIRTH_CODE, build_positions
from ehrmotor.sequences.windows import (
    embedding_windows,
    first_rows,
    positions_per_window,
    window_sequences,
)
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import Tokenizer

log = logging.getLogger(__name__)

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


def _read_positions(db: Any, labels: pl.DataFrame, fitted: Fitted,
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


def _label_positions(labels: pl.DataFrame, positions: pl.DataFrame) -> pl.DataFrame:
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


def _check_sizes(context: int | None, tokens_per_batch: int | None) -> tuple[int, int]:
    """(context, packing budget); InputError for a context below 2 or a budget below it."""
    if context is None:
        raise InputError("the model bundle records no training context (max_window in "
                         "config.json or training_summary.json); pass context")
    if context < 2:
        raise InputError(f"context must be at least 2 (position 0 and one more); got {context}")
    budget = context if tokens_per_batch is None else tokens_per_batch
    if budget < context:
        raise InputError(f"tokens_per_batch {budget} is smaller than the context of {context} "
                         f"positions; a window must fit one batch: set it to at least {context}")
    return context, budget


def _encode(model: MotorModel, positions: pl.DataFrame, plan: pl.DataFrame,
            tokens_per_batch: int, device: torch.device, features: np.ndarray) -> None:
    """Fill `features` at each window's `labels` with the representations at its `points`.

    plan: `embedding_windows` with `first_row`, in packing order. On CUDA every batch is padded to
    `tokens_per_batch` positions.
    """
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if auto_uses_bf16(device.type, model.config.hidden_size, training=False)
                else nullcontext())
    lengths = positions_per_window(plan).to_numpy()
    for batch in tqdm(pack(lengths, np.arange(len(lengths)), tokens_per_batch),
                      desc="features", unit="batch", disable=None):
        chosen = plan.slice(batch[0], len(batch))
        rows = window_sequences(positions, chosen).with_columns(points=chosen["points"])
        inputs = collate_windows(frame_rows(rows))
        if device.type == "cuda":
            inputs = pad_batch(inputs, tokens_per_batch)
        point_indices = inputs.pop("point_indices").to(device)
        with torch.no_grad(), autocast:
            hidden = model.encode(**{k: v.to(device) for k, v in inputs.items()})  # (T, hidden)
        labels = chosen["labels"].explode().to_numpy()
        features[labels] = hidden[point_indices].float().cpu().numpy()


def compute_features(db: Any, model_path: str | Path, labels: LabelsLike, num_proc: int = 1,
                     tokens_per_batch: int | None = None,
                     device: str | torch.device | None = None,
                     ontology: Ontology | str | Path | None = None,
                     context: int | None = None) -> dict[str, np.ndarray]:
    """Representations at label times; see the module docstring for the result and policies.

    db: a MEDS directory, a `meds_reader.SubjectDatabase` or the path of one. model_path: a
    bundle written by `pretrain` (checked by `load_bundle`, which raises BundleError). labels:
    see `read_labels`. num_proc: processes reading shards (1 = in this process).
    tokens_per_batch: positions per forward pass, at least the context (default: the context).
    device: default CUDA when available, else CPU. ontology: default `model_path/ontology`.
    context: positions per window (default: the model's training context).
    """
    if context is not None:  # a bad setting fails before the bundle is read
        _check_sizes(context, tokens_per_batch)
    if isinstance(labels, str | Path):  # so does a bad label file
        labels = read_labels(labels)
    if (femr_result := femr_bundle_features(db, model_path, labels, tokens_per_batch)) is not None:
        return femr_result  # a bundle written by `ehrmotor convert-femr`
    bundle = load_bundle(model_path, ontology=ontology)
    return bundle_features(db, bundle, labels, num_proc=num_proc,
                           tokens_per_batch=tokens_per_batch, device=device, context=context)


def bundle_features(db: Any, bundle: Bundle, labels: LabelsLike, num_proc: int = 1,
                    tokens_per_batch: int | None = None,
                    device: str | torch.device | None = None,
                    context: int | None = None) -> dict[str, np.ndarray]:
    """`compute_features` with a bundle already loaded by `load_bundle`."""
    context, budget = _check_sizes(bundle.max_window if context is None else context,
                                   tokens_per_batch)
    table = read_labels(labels).sort("subject_id", "prediction_time", maintain_order=True) \
        .with_row_index("label")
    model = bundle.model.eval()
    result = {
        "subject_ids": table["subject_id"].to_numpy().astype(np.int64),
        "feature_times": table["prediction_time"].to_numpy().astype("datetime64[us]"),
        "features": np.zeros((table.height, model.config.hidden_size), dtype=np.float32),
    }
    if table.is_empty():
        return result
    positions = _read_positions(db, table, (bundle.tokenizer, bundle.ontology), num_proc)
    plan = embedding_windows(_label_positions(table, positions), context).join(
        first_rows(positions), on="subject_id", how="left", maintain_order="left")
    chosen = torch.device(device if device is not None
                          else "cuda" if torch.cuda.is_available() else "cpu")
    log.info("compute_features: %d labels of %d subjects in %d windows of up to %d positions "
             "on %s", table.height, table["subject_id"].n_unique(), plan.height, context, chosen)
    _encode(model.to(chosen), positions, plan, budget, chosen, result["features"])
    return result


def write_embeddings(result: Mapping[str, np.ndarray], out_path: str | Path) -> Path:
    """Write a `compute_features` result as parquet, atomically; return the path.

    Columns: subject_id int64, prediction_time timestamp[us] (the feature_times, exactly),
    embedding fixed_size_list<float32>[hidden].
    """
    features = np.ascontiguousarray(result["features"], dtype=np.float32)
    subjects, times = result["subject_ids"], result["feature_times"]
    if features.ndim != 2 or not len(subjects) == len(times) == features.shape[0]:
        raise ValueError(f"result: subject_ids ({len(subjects)}), feature_times ({len(times)}) "
                         f"and features {features.shape} must have one row per label")
    table = pa.table({
        "subject_id": pa.array(np.asarray(subjects, dtype=np.int64)),
        "prediction_time": pa.array(np.asarray(times).astype("datetime64[us]")),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)),
                                                       features.shape[1]),
    })
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    log.info("write_embeddings: %d rows of %d dimensions to %s", table.num_rows,
             features.shape[1], os.fspath(out))
    return out
