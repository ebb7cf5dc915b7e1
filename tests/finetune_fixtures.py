"""Label files for fine-tuning tests, built from a MEDS dataset: one prediction time per subject
(its middle event day, noon), with a time-to-event or a binary label of an outcome code."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ehrmotor.meds import data_files


def events(meds: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f, columns=["subject_id", "time", "code"])
                      for f in data_files(meds)]).drop_nulls("time")


def write_labels(meds: Path, out: Path, code: str, kind: str = "time_to_event",
                 horizon_days: float = 365.0) -> Path:
    """A label file at `out` for `code` (kind "time_to_event" or "boolean": the code within
    `horizon_days`); subjects with fewer than three event days are left out."""
    table = events(meds)
    days = table.select("subject_id", day=pl.col("time").dt.date()).unique().sort("subject_id",
                                                                                   "day")
    middle = days.group_by("subject_id").agg(pl.col("day").sort().get(pl.len() // 2),
                                             n=pl.len()).filter(pl.col("n") >= 3)
    points = middle.select("subject_id", prediction_time=pl.col("day").cast(pl.Datetime("us"))
                           + pl.duration(hours=12))
    later = table.join(points, on="subject_id").filter(pl.col("time") > pl.col("prediction_time"))
    event = later.filter(pl.col("code") == code).group_by("subject_id").agg(
        event_time=pl.col("time").min())
    last = table.group_by("subject_id").agg(censor_time=pl.col("time").max())
    labels = (points.join(event, on="subject_id", how="left").join(last, on="subject_id")
              .filter(pl.col("censor_time") > pl.col("prediction_time"))
              .with_columns(event_time=pl.when(pl.col("event_time") <= pl.col("censor_time"))
                            .then("event_time"))
              .sort("subject_id"))
    if kind == "boolean":
        within = pl.col("event_time") <= pl.col("prediction_time") + pl.duration(
            days=horizon_days)
        labels = labels.select("subject_id", "prediction_time",
                               boolean_value=within.fill_null(False))
    out.parent.mkdir(parents=True, exist_ok=True)
    labels.write_parquet(out)
    return out
