"""Training windows (sequences/windows.py, prepare/shard_jobs.py): cutting, local indices, labels
per window.

Hand-built inputs with hand-computed expectations."""

from __future__ import annotations

import polars as pl
from prepare_builders import (
    US_PER_DAY,
    positions_frame,
    window_labels,
)

from ehrmotor.motor_task.occurrences import (
    ShardLabels,
    censor_days,
    occurrence_runs,
    prediction_points,
    sample_points,
)
from ehrmotor.prepare.shard_jobs import window_rows
from ehrmotor.sequences.windows import with_windows


def test_with_windows_cuts_later_positions_into_spans_of_max_window_minus_one() -> None:
    windows = with_windows(positions_frame({1: 8}), max_window=4)
    assert windows["window"].to_list() == [0, 0, 0, 0, 1, 1, 1, 2]


def labels_for(positions: pl.DataFrame, points: list[tuple[int, int]],
               occurrences: list[tuple[int, int, float]], max_window: int,
               last_day: float) -> ShardLabels:
    """ShardLabels as `label_shard` makes them, from points (subject, position), occurrences
    (subject, task, day) and the last event's day (`positions_frame`: position p at day p)."""
    day0 = positions["time"][0]
    point_frame = pl.DataFrame(
        [(s, (p - 1) // (max_window - 1), p, day0 + p * US_PER_DAY) for s, p in sorted(points)],
        schema={"subject_id": pl.Int64, "window": pl.Int32, "position": pl.Int32,
                "time": pl.Int64}, orient="row")
    last_time = pl.DataFrame({"subject_id": positions["subject_id"].unique().sort()}).with_columns(
        last_time=pl.lit(day0 + round(last_day * US_PER_DAY), pl.Int64))
    occurrence_frame = pl.DataFrame(
        [(s, k, day0 + round(d * US_PER_DAY)) for s, k, d in occurrences],
        schema={"subject_id": pl.Int64, "task": pl.Int32, "time": pl.Int64}, orient="row")
    point_frame = point_frame.with_columns(censor_days=censor_days(point_frame, last_time))
    return ShardLabels(positions, point_frame, occurrence_runs(point_frame, occurrence_frame),
                       last_time)


def test_window_rows_layout_local_indices_and_skipped_windows() -> None:
    positions = positions_frame({1: 8, 2: 3})
    # Points at days 2, 5 and 6; task 0 at days 3.5 and 6.5, task 1 at 6 and 10, task 3 at 7.
    labelled = labels_for(positions, points=[(1, 2), (1, 5), (1, 6)], occurrences=[
        (1, 0, 3.5), (1, 0, 6.5), (1, 1, 6.0), (1, 1, 10.0), (1, 3, 7.0)],
        max_window=4, last_day=12.0)
    result = window_rows(labelled, max_window=4)
    rows = result.rows
    # Subject 1 window 2 (position 7) and subject 2's only window have no points: skipped.
    assert result.windows_skipped == 2
    assert result.subjects_skipped == 1
    assert rows.select("subject_id", "window").rows() == [(1, 0), (1, 1)]
    first, second = rows.row(0, named=True), rows.row(1, named=True)
    assert first["entries"] == [0, 1, 2, 3] and second["entries"] == [0, 4, 5, 6]
    assert first["age_days"] == [0.0, 1.0, 2.0, 3.0] and second["age_days"] == [0.0, 4.0, 5.0, 6.0]
    assert first["bag_sizes"] == [1, 1, 1, 1] and first["weights"] == [1.0] * 4
    assert second["times"][0] == first["times"][0] == positions["time"][0]
    # Points are window-local position indices; a window keeps the occurrences that are the
    # next one of their task after at least one of its points (3.5 is no later point's next).
    assert first["points"] == [2] and first["censor_days"] == [10.0]
    assert first["task_ids"] == [0, 1, 3]
    assert window_labels(rows, 0) == [(0, 0, 1.5), (0, 1, 4.0), (0, 3, 5.0)]
    assert second["points"] == [2, 3] and second["censor_days"] == [7.0, 6.0]
    assert second["task_ids"] == [0, 1, 1, 3]
    day0 = positions["time"][0]
    assert second["task_times"] == [day0 + round(d * US_PER_DAY) for d in (6.5, 6, 10, 7)]
    assert window_labels(rows, 1) == [(0, 0, 1.5), (0, 1, 1.0), (0, 3, 2.0), (1, 0, 0.5),
                                      (1, 1, 4.0), (1, 3, 1.0)]


def test_an_occurrence_after_a_long_gap_labels_the_points_of_every_window_before_it() -> None:
    positions = positions_frame({1: 8})
    labelled = labels_for(positions, points=[(1, 1), (1, 4), (1, 7)],
                          occurrences=[(1, 2, 7.5)], max_window=4, last_day=9.0)
    rows = window_rows(labelled, max_window=4).rows
    assert rows["task_ids"].to_list() == [[2], [2], [2]]
    assert [window_labels(rows, i) for i in range(3)] == [[(0, 2, 6.5)], [(0, 2, 3.5)],
                                                          [(0, 2, 0.5)]]


def test_window_rows_keep_every_later_position_once() -> None:
    positions = positions_frame({1: 8})
    labelled = labels_for(positions, points=[(1, 1), (1, 4), (1, 7)], occurrences=[],
                          max_window=4, last_day=10.0)
    result = window_rows(labelled, max_window=4)
    rows = result.rows
    assert result.windows_skipped == 0 and result.subjects_skipped == 0
    assert rows["window"].to_list() == [0, 1, 2]
    assert rows["entries"].to_list() == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7]]
    assert [e[1:] for e in rows["entries"].to_list()] == [[1, 2, 3], [4, 5, 6], [7]]
    assert rows["points"].to_list() == [[1], [1], [1]]
    assert rows["censor_days"].to_list() == [[9.0], [6.0], [3.0]]
    assert rows["task_ids"].to_list() == [[], [], []]


def test_sample_points_takes_max_of_5_and_a_tenth_of_positions_per_window() -> None:
    positions = positions_frame({1: 61, 2: 12, 3: 4})  # 60, 11 and 3 later positions
    last = pl.DataFrame({"subject_id": [1, 2, 3], "last_time": [2**62] * 3})
    points = prediction_points(positions, last)
    sampled = sample_points(points, positions, max_window=100, seed=97)
    counts = dict(sampled.group_by("subject_id").len().sort("subject_id").iter_rows())
    assert counts == {1: 6, 2: 5, 3: 3}  # max(5, 60 // 10); max(5, 1); all 3
    assert set(sampled["position"].to_list()) <= set(points["position"].to_list())
    # Two windows of 30 later positions each: 5 points in each.
    per_window = sample_points(points, positions, max_window=31, seed=97).filter(
        pl.col("subject_id") == 1).group_by("window").len().sort("window")
    assert per_window.rows() == [(0, 5), (1, 5)]
