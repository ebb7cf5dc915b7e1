"""The MOTOR task fit (motor_task/tasks.py): rates, filters, bins, candidates, round trips.

Hand-built inputs with hand-computed expectations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from prepare_builders import (
    US_PER_DAY,
    occurrences_frame,
    points_frame,
    tokenizer,
)

from ehrmotor.config import ConfigError, PrepareConfig
from ehrmotor.motor_task.occurrences import (
    censor_days,
    occurrence_runs,
)
from ehrmotor.motor_task.tasks import MotorTask, TaskCounts, candidate_tasks, count_tasks

CANDIDATES = pl.DataFrame({"task": [0, 1, 2], "code": ["T0", "T1", "T2"], "entry": [4, 7, 9]},
                          schema={"task": pl.Int32, "code": pl.String, "entry": pl.UInt32})


def shard_counts(points: list[tuple[int, int, float]], occurrences: list[tuple[int, int, float]],
                 last_day: dict[int, float]) -> TaskCounts:
    """`count_tasks` of points (subject, position, day) and occurrences (subject, task, day)."""
    frame = points_frame([(s, p, round(d * US_PER_DAY)) for s, p, d in points])
    last_time = pl.DataFrame({"subject_id": list(last_day),
                              "last_time": [round(d * US_PER_DAY) for d in last_day.values()]})
    frame = frame.with_columns(censor_days=censor_days(frame, last_time))
    runs = occurrence_runs(frame, occurrences_frame(
        [(s, k, round(d * US_PER_DAY)) for s, k, d in occurrences]))
    return count_tasks(frame, runs, last_time, seed=0)


def two_shards() -> list[TaskCounts]:
    # Points censored at 20, 10 (shard A: days 10 and 20, last event day 30) and 30 days (shard
    # B): 60 days in all. Task 1 occurs 2 and 5 days after the first two points; task 2 30 days
    # after the third.
    shard_a = shard_counts([(1, 1, 10.0), (1, 2, 20.0)], [(1, 1, 12.0), (1, 1, 25.0)],
                           {1: 30.0})
    shard_b = shard_counts([(2, 1, 0.0)], [(2, 2, 30.0)], {2: 30.0})
    return [shard_a, shard_b]


def two_shard_counts() -> TaskCounts:
    return TaskCounts.combine(two_shards())


def test_motor_task_initial_rates_are_events_over_exposure() -> None:
    task = MotorTask.fit(CANDIDATES, two_shard_counts(), num_bins=2, final_layer_size=16,
                         min_task_events=1, min_task_fraction=0.0)
    # T1: 2 events, exposure min(2,10) + min(5,20) + 30 = 37 days. T2: 1 event, 10 + 20 + 30.
    # T0 never occurs: dropped. Kept tasks are renumbered in candidate order.
    assert task.tasks.select("task", "code", "entry", "events").rows() == [
        (0, "T1", 7, 2), (1, "T2", 9, 1)]
    np.testing.assert_allclose(task.tasks["exposure_days"].to_numpy(), [37.0, 60.0])
    np.testing.assert_allclose(task.tasks["rate_per_day"].to_numpy(), [2 / 37, 1 / 60])
    np.testing.assert_allclose(task.initial_log_rates(), [math.log(2 / 37), math.log(1 / 60)])
    assert (task.dropped_tasks, task.candidate_tasks, task.points) == (1, 3, 3)
    # Event times 2, 5, 30: the median (5) is the one inner edge of 2 bins.
    assert task.bin_edges_days == [0.0, 5.0]
    assert task.task_map().tolist() == [-1, 0, 1]


def test_motor_task_drops_tasks_below_min_task_events() -> None:
    task = MotorTask.fit(CANDIDATES, two_shard_counts(), num_bins=2, final_layer_size=16,
                         min_task_events=2, min_task_fraction=0.0)
    assert task.tasks.select("task", "code").rows() == [(0, "T1")]
    assert task.dropped_tasks == 2


def test_motor_task_drops_tasks_with_events_after_too_few_points() -> None:
    # 3 points: T1 follows 2 of them, T2 1; T0 none.
    half = MotorTask.fit(CANDIDATES, two_shard_counts(), num_bins=2, final_layer_size=16,
                         min_task_events=1, min_task_fraction=0.5)
    assert half.tasks["code"].to_list() == ["T1"]
    assert half.dropped_tasks == 2
    # "At least": T2's events after exactly a third of the points keep it.
    third = MotorTask.fit(CANDIDATES, two_shard_counts(), num_bins=2, final_layer_size=16,
                          min_task_events=1, min_task_fraction=1 / 3)
    assert third.tasks["code"].to_list() == ["T1", "T2"]
    # Both conditions hold: enough points, but fewer than min_task_events events.
    both = MotorTask.fit(CANDIDATES, two_shard_counts(), num_bins=2, final_layer_size=16,
                         min_task_events=2, min_task_fraction=1 / 3)
    assert both.tasks["code"].to_list() == ["T1"]


def test_min_task_fraction_counts_points_with_a_later_occurrence_not_occurrences() -> None:
    # Task 0 occurs three times after the first point and once after the second: the first
    # point's pair is its next occurrence only, so 2 points have an event, out of 4.
    points = points_frame([(1, 1, 1 * US_PER_DAY), (1, 2, 5 * US_PER_DAY),
                           (1, 3, 8 * US_PER_DAY), (1, 4, 9 * US_PER_DAY)])
    occurrences = occurrences_frame([(1, 0, 2 * US_PER_DAY), (1, 0, 3 * US_PER_DAY),
                                     (1, 0, 4 * US_PER_DAY), (1, 0, 6 * US_PER_DAY)])
    last_time = pl.DataFrame({"subject_id": [1], "last_time": [10 * US_PER_DAY]})
    counts = count_tasks(points.with_columns(censor_days=censor_days(points, last_time)),
                         occurrence_runs(points, occurrences), last_time, seed=0)
    assert counts.points == 4
    assert counts.per_task.select("task", "events").rows() == [(0, 2)]
    kept = MotorTask.fit(CANDIDATES, counts, num_bins=2, final_layer_size=16,
                         min_task_events=1, min_task_fraction=0.5)
    assert kept.tasks["code"].to_list() == ["T0"]
    dropped = MotorTask.fit(CANDIDATES, counts, num_bins=2, final_layer_size=16,
                            min_task_events=1, min_task_fraction=0.6)
    assert dropped.tasks.height == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_min_task_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match="min_task_fraction"):
        PrepareConfig(min_task_fraction=fraction)
    assert PrepareConfig(min_task_fraction=0.0).min_task_fraction == 0.0
    assert PrepareConfig().min_task_fraction == 1e-4


def test_motor_task_bins_start_at_zero_with_num_bins_finite_edges() -> None:
    counts = TaskCounts(points=9, total_censor_days=90.0,
                        per_task=pl.DataFrame({"task": [0], "events": [9],
                                               "exposure_reduction": [0.0]},
                                              schema={"task": pl.Int32, "events": pl.UInt32,
                                                      "exposure_reduction": pl.Float64}),
                        days_sample=np.arange(1.0, 10.0))
    task = MotorTask.fit(CANDIDATES, counts, num_bins=4, final_layer_size=16, min_task_events=1,
                         min_task_fraction=0.0)
    # Quartiles (linear) of 1..9 are 3, 5, 7.
    assert task.bin_edges_days == [0.0, 3.0, 5.0, 7.0]
    assert task.num_bins == 4


def test_candidate_tasks_are_the_first_code_entries() -> None:
    vocab = tokenizer([("code", "A"), ("numeric", "L", 0), ("code", "B"), ("text", "N", "x"),
                       ("code", "C")])
    assert candidate_tasks(vocab, 2).rows() == [(0, "A", 0), (1, "B", 2)]


def test_task_counts_combine_over_shards_and_round_trip_through_the_dataset_folder(
        tmp_path: Path) -> None:
    combined = TaskCounts.combine(two_shards())
    assert (combined.points, combined.total_censor_days) == (3, 60.0)
    assert combined.per_task.select("task", "events").rows() == [(1, 2), (2, 1)]
    assert combined.days_sample.tolist() == [2.0, 5.0, 30.0]  # in shard order
    combined.save(tmp_path)
    loaded = TaskCounts.load(tmp_path)
    assert (loaded.points, loaded.total_censor_days) == (3, 60.0)
    assert_frame_equal(loaded.per_task, combined.per_task)
    assert loaded.days_sample.tolist() == combined.days_sample.tolist()


def test_task_map_gives_each_candidates_model_task_or_minus_one() -> None:
    task = MotorTask.fit(CANDIDATES, two_shard_counts(), num_bins=2,
                         final_layer_size=16, min_task_events=1, min_task_fraction=0.0)
    # T0 never occurs (dropped); T1 and T2 are model tasks 0 and 1.
    assert task.tasks.select("task", "candidate", "code").rows() == [(0, 1, "T1"), (1, 2, "T2")]
    assert task.task_map().tolist() == [-1, 0, 1]


def test_motor_task_json_is_strict_and_round_trips(tmp_path: Path) -> None:
    task = MotorTask.fit(CANDIDATES, two_shard_counts(), num_bins=2, final_layer_size=16,
                         min_task_events=1, min_task_fraction=0.0)
    path = tmp_path / "motor_task.json"
    task.save(path)

    def reject(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name}")

    document = json.loads(path.read_text(), parse_constant=reject)
    assert document["bin_edges_days"] == [0.0, 5.0]
    assert document["num_bins"] == 2 and document["final_layer_size"] == 16
    assert [t["code"] for t in document["tasks"]] == ["T1", "T2"]
    loaded = MotorTask.load(path)
    assert_frame_equal(loaded.tasks, task.tasks, check_dtypes=False)
    assert loaded.bin_edges_days == task.bin_edges_days
    assert (loaded.dropped_tasks, loaded.candidate_tasks, loaded.points) == (1, 3, 3)
