"""Step 5 of `prepare` for one shard: training windows with their positions and sparse labels.

One row per training window (windows: `ehrmotor.prepare.windows`; points and labels:
`ehrmotor.prepare.labels`):

    subject_id      int64
    window          int32      0-based window of the subject
    bag_sizes       list<i32>  entries per position (position 0 first)
    entries         list<u32>  vocabulary entries of all positions, concatenated
    weights         list<f32>  their weights
    times           list<i64>  position timestamps, µs since 1970 (position 0: birth)
    age_days        list<f32>  days since birth (drives the rotary encoding)
    age, log_age, log_delta  list<f32>  normalised time features
    points          list<i32>  window-local indices of the sampled prediction points
    censor_days     list<f32>  per point: days to the subject's last event
    label_point     list<i32>  per (point, task) pair: index into `points`
    label_task      list<i32>  task index (model order of `motor_task.json`)
    label_days      list<f32>  days from the point to the task's next occurrence

Windows without sampled prediction points are skipped and counted. FORMAT_VERSION is the version
of this layout, recorded in the datasets' manifests.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from ehrmotor.prepare.labels import (
    last_event_times,
    prediction_points,
    sample_points,
    sparse_labels,
    task_events,
)
from ehrmotor.prepare.ontology import Ontology
from ehrmotor.prepare.positions import build_positions
from ehrmotor.prepare.tokenizer import Tokenizer
from ehrmotor.prepare.windows import local_index, training_windows, window_sequences

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardLabels:
    """A shard's positions and the sampled points' sparse labels."""

    positions: pl.DataFrame
    points: pl.DataFrame  # subject_id, window, position, time
    censoring: pl.DataFrame  # subject_id, position, censor_days (rows in the order of points)
    pairs: pl.DataFrame  # point (row in censoring), task, days


def label_shard(events: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology,
                task_codes: pl.DataFrame, max_window: int, seed: int) -> ShardLabels:
    """Positions, sampled prediction points and their labels for the subjects in `events`."""
    positions = build_positions(events, tokenizer, ontology)
    last_time = last_event_times(events)
    points = sample_points(prediction_points(positions, last_time), positions, max_window, seed)
    occurrences = task_events(events, ontology, task_codes)
    censoring, pairs = sparse_labels(points.drop("window"), occurrences, last_time)
    # A pair's subject and position are its point's: 10⁸ rows need not carry them twice.
    return ShardLabels(positions, points, censoring, pairs.select("point", "task", "days"))


@dataclass(frozen=True)
class ShardWindows:
    rows: pl.DataFrame
    windows_skipped: int
    subjects_skipped: int


def window_rows(labelled: ShardLabels, max_window: int) -> ShardWindows:
    """One row per (subject, window) with sampled points, in the layout of the module docstring."""
    windows = training_windows(labelled.positions, max_window)
    # Points in the order of `censoring` (subject, position), which pairs index by `point`.
    points = labelled.points.sort("subject_id", "position").with_columns(
        censor_days=labelled.censoring["censor_days"],
    ).join(windows.select("subject_id", "window", "start"), on=["subject_id", "window"],
           how="left", maintain_order="left").with_columns(
        local=local_index(),
        point=pl.int_range(pl.len()).over("subject_id", "window").cast(pl.Int32))
    point_lists = points.group_by("subject_id", "window", maintain_order=True).agg(
        points=pl.col("local"), censor_days=pl.col("censor_days"))
    row = labelled.pairs["point"].to_numpy()
    pair_lists = pl.DataFrame({
        "subject_id": points["subject_id"].to_numpy()[row],
        "window": points["window"].to_numpy()[row],
        "label_point": points["point"].to_numpy()[row],
        "label_task": labelled.pairs["task"].cast(pl.Int32),
        "label_days": labelled.pairs["days"],
    }).group_by("subject_id", "window", maintain_order=True).agg(
        "label_point", "label_task", "label_days")
    kept = windows.join(point_lists.select("subject_id", "window"), on=["subject_id", "window"],
                        how="semi", maintain_order="left")
    rows = (
        window_sequences(labelled.positions, kept)
        .join(point_lists, on=["subject_id", "window"], how="inner")
        .join(pair_lists, on=["subject_id", "window"], how="left")
        .with_columns([pl.col(c).fill_null(pl.lit([], dtype=dtype)) for c, dtype in (
            ("label_point", pl.List(pl.Int32)), ("label_task", pl.List(pl.Int32)),
            ("label_days", pl.List(pl.Float32)))])
        .sort("subject_id", "window")
    )
    subjects = labelled.positions["subject_id"].n_unique()
    return ShardWindows(rows=rows, windows_skipped=windows.height - rows.height,
                        subjects_skipped=subjects - rows["subject_id"].n_unique())
