"""Count features for `ehrmotor.evaluate`: the baseline for the MOTOR representations.

Per label (`count_features`), using only events at or before its prediction time:
`lifetime/<code>` = log1p of the number of events (static rows included) whose code or
ancestor is `<code>`; `recent/<code>` the same over the last `recent_days` days; `last/<code>`
the last numeric value of a code; `age_years` the age at the prediction time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ehrmotor.evaluate.tasks import US_PER_DAY, birth_days, days_between, subject_events
from ehrmotor.vocabulary.ontology import Ontology

AGE_FEATURE = "age_years"
LONG_SCHEMA = pl.Schema({"row": pl.UInt32(), "feature": pl.String(), "value": pl.Float64()})


def _shard_count_features(events: pl.LazyFrame, points: pl.LazyFrame,
                          ontology: Ontology | None, recent_days: float) -> pl.DataFrame:
    """The long feature table (LONG_SCHEMA) of the labels in `points` from one shard."""
    seen = events.join(points, on="subject_id").filter(
        pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time")))
    recent_start = pl.col("prediction_time") - pl.duration(
        microseconds=int(recent_days * US_PER_DAY))
    per_code = seen.group_by("row", "code").agg(
        lifetime=pl.len(), recent=(pl.col("time") > recent_start).fill_null(False).sum())
    # Counting per (label, code) first keeps the ancestor join small.
    expanded = ontology.expand(per_code) if ontology is not None else per_code.with_columns(
        ancestor=pl.col("code"))
    counts = expanded.group_by("row", "ancestor").agg(pl.col("lifetime", "recent").sum())
    lifetime = counts.select("row", feature=pl.lit("lifetime/") + pl.col("ancestor"),
                             value=pl.col("lifetime").cast(pl.Float64).log1p())
    recent = counts.filter(pl.col("recent") > 0).select(
        "row", feature=pl.lit("recent/") + pl.col("ancestor"),
        value=pl.col("recent").cast(pl.Float64).log1p())
    last = (
        seen.filter(pl.col("numeric_value").is_not_null() & pl.col("time").is_not_null())
        .group_by("row", "code")
        .agg(value=pl.col("numeric_value").sort_by("time", "numeric_value").last())
        .select("row", feature=pl.lit("last/") + pl.col("code"),
                value=pl.col("value").cast(pl.Float64))
    )
    age = birth_days(events).join(points, on="subject_id").select(
        "row", feature=pl.lit(AGE_FEATURE),
        value=days_between("birth_day", "prediction_time") / 365.25)
    return pl.concat([lifetime, recent, last, age]).cast(LONG_SCHEMA).collect()


def count_features(meds_dir: Path, points: pl.DataFrame, ontology: Ontology | None, *,
                   recent_days: float = 365.0) -> pl.DataFrame:
    """Long table (row, feature, value) of the count features of each label in `points`.

    `points`: subject_id, prediction_time; `row` is the index of the label in `points`. Only
    events at or before a label's prediction time count (static rows count as lifetime events);
    `recent_days` is the length of the recent window in days. See the module docstring.
    """
    labelled = points.select("subject_id", "prediction_time").with_row_index("row").lazy()
    parts = [_shard_count_features(events, labelled, ontology, recent_days)
             for events in subject_events(meds_dir, points["subject_id"].unique())]
    return pl.concat(parts).sort("row", "feature")


def select_features(long: pl.DataFrame, train_rows: np.ndarray, max_features: int) -> list[str]:
    """The `max_features` features present in the most `train_rows`, ties by name."""
    rows = pl.Series(np.asarray(train_rows, dtype=np.uint32)).implode()
    frequency = (
        long.filter(pl.col("row").is_in(rows)).group_by("feature").agg(rows=pl.len())
        .sort(["rows", "feature"], descending=[True, False])
    )
    return frequency.head(max_features)["feature"].to_list()


def feature_matrix(long: pl.DataFrame, names: list[str], num_rows: int) -> np.ndarray:
    """Dense float64 matrix (num_rows, len(names)): counts 0 and numeric values NaN when absent."""
    columns = pl.DataFrame({"feature": names, "column": np.arange(len(names), dtype=np.int64)})
    cells = long.join(columns, on="feature")
    missing = np.array([np.nan if name.startswith("last/") else 0.0 for name in names])
    matrix = np.tile(missing, (num_rows, 1))
    matrix[cells["row"].to_numpy().astype(np.int64), cells["column"].to_numpy()] = (
        cells["value"].to_numpy())
    return matrix
