"""Prediction points, task events and sparse MOTOR labels (motor_task/occurrences.py) against hand
examples and a brute-force reference.

Hand-built inputs with hand-computed expectations."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
from prepare_builders import (
    POSITION_EDGES,
    POSITION_TREE,
    POSITION_VOCAB,
    SUBJECT_1,
    US_PER_DAY,
    build,
    event,
    events_frame,
    occurrences_frame,
    ontology,
    points_frame,
    tokenizer,
    window_labels,
)

from ehrmotor.motor_task.occurrences import (
    censor_days,
    last_event_times,
    occurrence_runs,
    prediction_points,
    run_pairs,
    task_codes_of,
    task_events,
)
from ehrmotor.prepare.shard_jobs import label_shard, window_rows

EPOCH = datetime(1970, 1, 1)


def us(moment: datetime) -> int:
    """Microseconds since 1970 of a naive datetime (as MEDS stores it)."""
    return int((moment - EPOCH).total_seconds()) * 1_000_000





def test_prediction_points_one_per_time_none_on_birth_day_or_last_time() -> None:
    positions = build(SUBJECT_1)
    last = last_event_times(events_frame(SUBJECT_1))
    assert last.rows() == [(1, us(datetime(2000, 1, 23)))]
    points = prediction_points(positions, last)
    # Positions 4 and 5 share a time: the last one (5) is the point. Position 0 never is.
    assert points["position"].to_list() == [1, 2, 3, 5, 6]
    assert points["time"].to_list() == [us(datetime(2000, 1, 11)), us(datetime(2000, 1, 11, 6)),
                                        us(datetime(2000, 1, 12)), us(datetime(2000, 1, 21, 12)),
                                        us(datetime(2000, 1, 22))]
    # When position 6 is at the subject's last event time, it is not a point.
    at_six = pl.DataFrame({"subject_id": [1], "last_time": [us(datetime(2000, 1, 22))]})
    assert prediction_points(positions, at_six)["position"].to_list() == [1, 2, 3, 5]


def test_task_events_skip_valued_and_static_events_and_expand_ancestors() -> None:
    rows = [
        event(1, None, "R/a"),  # static: never a task event
        event(1, datetime(2000, 1, 5), "R/a"),  # task R (its ancestor)
        event(1, datetime(2000, 1, 5), "R/a"),  # duplicate occurrence
        event(1, datetime(2000, 1, 6), "R/b"),  # tasks R and R/b
        event(1, datetime(2000, 1, 7), "L", 4.0),  # numeric value: not a task event
        event(1, datetime(2000, 1, 8), "L"),  # task L
        event(1, datetime(2000, 1, 9), "N", text="yes"),  # text value: not a task event
        event(2, datetime(2000, 1, 9), "X"),  # not a task
    ]
    task_codes = pl.DataFrame({"code": ["R", "R/b", "L", "N"], "task": [0, 1, 2, 3]},
                              schema={"code": pl.String, "task": pl.Int32})
    occurrences = task_events(events_frame(rows), task_codes_of(ontology(POSITION_TREE),
                                                                task_codes))
    assert sorted(set(occurrences.rows())) == [(1, 0, us(datetime(2000, 1, 5))),
                                  (1, 0, us(datetime(2000, 1, 6))),
                                  (1, 1, us(datetime(2000, 1, 6))),
                                  (1, 2, us(datetime(2000, 1, 8)))]


def sparse_labels(points: pl.DataFrame, occurrences: pl.DataFrame, last_time: pl.DataFrame
                  ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(censoring, pairs) of the points: censoring has subject_id, position, censor_days (by
    subject and position); pairs subject_id, position, task, days and `point` (its censoring
    row), every pair of `occurrence_runs` expanded with `run_pairs`."""
    points = points.sort("subject_id", "time")
    censoring = points.select("subject_id", "position",
                              censor_days=censor_days(points, last_time))
    runs = occurrence_runs(points, occurrences)
    total = int((runs["stop"] - runs["start"]).sum() or 0)
    pairs = run_pairs(runs, points["time"].to_numpy(), np.arange(total))
    return censoring, pairs.with_columns(
        subject_id=points["subject_id"].gather(pairs["point"]),
        position=points["position"].gather(pairs["point"]))


def test_sparse_labels_hand_example() -> None:
    day = US_PER_DAY
    points = points_frame([(1, 1, 1 * day), (1, 2, 2 * day), (1, 3, 3 * day)])
    occurrences = occurrences_frame([
        (1, 0, 2 * day), (1, 0, 5 * day + day // 2),  # task 0 at days 2 and 5.5
        (1, 1, 1 * day),  # task 1 only at the first point's own time: never after a point
        (1, 2, 6 * day),  # task 2 at the last event time
    ])
    last_time = pl.DataFrame({"subject_id": [1], "last_time": [6 * day]})
    censoring, pairs = sparse_labels(points, occurrences, last_time)
    assert censoring.rows() == [(1, 1, 5.0), (1, 2, 4.0), (1, 3, 3.0)]
    got = pairs.select("subject_id", "position", "task", "days").sort(pl.all()).rows()
    # Day 2 is not strictly after the point at day 2: its next task-0 occurrence is day 5.5.
    assert got == [(1, 1, 0, 1.0), (1, 1, 2, 5.0), (1, 2, 0, 3.5), (1, 2, 2, 4.0),
                   (1, 3, 0, 2.5), (1, 3, 2, 3.0)]
    # `point` is the row of the pair's point in the censoring (points 1, 2, 3 are rows 0, 1, 2).
    assert (pairs["point"] == pairs["position"] - 1).all()


def brute_force_labels(points: list[tuple[int, int, int]], occurrences: list[tuple[int, int, int]],
                       last: dict[int, int]) -> tuple[list, list]:
    """Per point and task: days to the first occurrence strictly after the point, by loops."""
    censoring, pairs = [], []
    tasks = sorted({task for _, task, _ in occurrences})
    for subject, position, t in points:
        censoring.append((subject, position, (last[subject] - t) / US_PER_DAY))
        for task in tasks:
            later = [o for s, k, o in occurrences if s == subject and k == task and o > t]
            if later:
                pairs.append((subject, position, task, (min(later) - t) / US_PER_DAY))
    return sorted(censoring), sorted(pairs)


def test_sparse_labels_equal_a_brute_force_reference() -> None:
    rng = np.random.default_rng(20240607)
    half_day = US_PER_DAY // 2
    points, occurrences, last = [], [], {}
    for subject in range(1, 9):
        grid = 40  # times on a half-day grid, so points and occurrences often tie
        n_points = int(rng.integers(0, 12))
        times = sorted(rng.choice(grid, size=n_points, replace=False).tolist())
        points += [(subject, 1 + 2 * i, t * half_day) for i, t in enumerate(times)]
        for task in range(5):
            # repeated occurrences, sometimes duplicated, before / between / after the points
            for t in rng.integers(0, grid, size=int(rng.integers(0, 7))).tolist():
                occurrences.append((subject, task, t * half_day))
        last[subject] = (grid + int(rng.integers(0, 3))) * half_day
    assert len(points) > 30 and len(occurrences) > 100
    order = rng.permutation(len(occurrences))
    shuffled = [occurrences[i] for i in order]
    point_order = rng.permutation(len(points))
    censoring, pairs = sparse_labels(
        points_frame([points[i] for i in point_order]), occurrences_frame(shuffled),
        pl.DataFrame({"subject_id": list(last), "last_time": list(last.values())}))
    want_censoring, want_pairs = brute_force_labels(points, occurrences, last)
    # censoring: one row per point, sorted by (subject, position); pairs point at their row.
    assert censoring.rows() == sorted(censoring.rows())
    rows = censoring.select("subject_id", "position").rows()
    assert [rows[i] for i in pairs["point"]] == pairs.select("subject_id", "position").rows()
    got_censoring = censoring.rows()
    assert [r[:2] for r in got_censoring] == [r[:2] for r in want_censoring]
    np.testing.assert_allclose([r[2] for r in got_censoring], [r[2] for r in want_censoring])
    got_pairs = sorted(pairs.select("subject_id", "position", "task", "days").rows())
    assert len(want_pairs) > 50
    assert [r[:3] for r in got_pairs] == [r[:3] for r in want_pairs]
    np.testing.assert_allclose([r[3] for r in got_pairs], [r[3] for r in want_pairs])


def test_label_shard_and_window_rows_on_a_hand_example() -> None:
    # Tasks R (0), R/b (1), X (2) for SUBJECT_1; points at positions 1, 2, 3, 5, 6 (7 positions,
    # so max(5, 6 // 10) = 5 points wanted: all of them); last event 2000-01-23 (X).
    task_codes = pl.DataFrame({"code": ["R", "R/b", "X"], "task": [0, 1, 2]},
                              schema={"code": pl.String, "task": pl.Int32})
    tree = ontology(POSITION_TREE)
    labelled = label_shard(events_frame(SUBJECT_1), tokenizer(POSITION_VOCAB, POSITION_EDGES),
                           tree, task_codes_of(tree, task_codes), max_window=100, seed=97)
    assert labelled.points["position"].to_list() == [1, 2, 3, 5, 6]
    np.testing.assert_allclose(labelled.points["censor_days"].to_numpy(),
                               [12.0, 11.75, 11.0, 1.5, 1.0])
    result = window_rows(labelled, max_window=100)
    assert (result.windows_skipped, result.subjects_skipped) == (0, 0)
    row = result.rows.row(0, named=True)
    assert row["points"] == [1, 2, 3, 5, 6]
    assert row["bag_sizes"] == [3, 2, 2, 2, 2, 2, 1]
    # R occurs (as R/a, R/b) on Jan 1 20:00, Jan 11 00:00 and 06:00, Jan 12; R/b on Jan 11 06:00;
    # X on Jan 23. From Jan 11 00:00: R and R/b 0.25 days later; from 06:00: R 0.75 days later.
    assert window_labels(result.rows, 0) == [
        (0, 0, 0.25), (0, 1, 0.25), (0, 2, 12.0), (1, 0, 0.75), (1, 2, 11.75), (2, 2, 11.0),
        (3, 2, 1.5), (4, 2, 1.0)]
