"""Positions (sequences/positions.py): events grouped into per-day positions with their entries.

Hand-built inputs with hand-computed expectations."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
from prepare_builders import (
    BIRTH_1,
    POSITION_EDGES,
    POSITION_TREE,
    POSITION_VOCAB,
    SUBJECT_1,
    build,
    event,
    events_frame,
    ontology,
    tokenizer,
    window_labels,
)

from ehrmotor.motor_task.occurrences import (
    task_codes_of,
)
from ehrmotor.prepare.shard_jobs import label_shard, window_rows
from ehrmotor.sequences.positions import build_positions

EPOCH = datetime(1970, 1, 1)


def us(moment: datetime) -> int:
    """Microseconds since 1970 of a naive datetime (as MEDS stores it)."""
    return int((moment - EPOCH).total_seconds()) * 1_000_000




def test_positions_birth_day_static_and_later_events() -> None:
    positions = build(SUBJECT_1)
    assert positions["position"].to_list() == list(range(7))
    assert positions["entries"].to_list() == [[0, 1, 2], [1, 2], [1, 3], [1, 2], [4, 5], [4, 7],
                                              [6]]
    # A valued event: its code bag (L alone, weight 1/1) and its value entry (weight 1).
    assert positions["weights"].to_list() == [[1.0, 0.5, 0.5], [0.5, 0.5], [0.5, 0.5],
                                              [0.5, 0.5], [1.0, 1.0], [1.0, 1.0], [1.0]]
    times = [BIRTH_1, datetime(2000, 1, 11), datetime(2000, 1, 11, 6), datetime(2000, 1, 12),
             datetime(2000, 1, 21, 12), datetime(2000, 1, 21, 12), datetime(2000, 1, 22)]
    assert positions["time"].to_list() == [us(t) for t in times]
    # Ages from the birth at 2000-01-01 08:00, in days.
    ages = [0.0, 9 + 16 / 24, 9 + 22 / 24, 10 + 16 / 24, 20 + 4 / 24, 20 + 4 / 24, 20 + 16 / 24]
    np.testing.assert_allclose(positions["age_days"].to_numpy(), ages, rtol=1e-6)
    # Identity time statistics: the normalised features are the raw ones.
    np.testing.assert_allclose(positions["age"].to_numpy(), ages, rtol=1e-6)
    np.testing.assert_allclose(positions["log_age"].to_numpy(), np.log1p(ages), rtol=1e-6)
    deltas = [0.0, ages[1], 0.25, 0.75, 9.5, 0.0, 0.5]
    np.testing.assert_allclose(positions["log_delta"].to_numpy(), np.log1p(deltas),
                               rtol=1e-5, atol=1e-6)


def test_positions_without_birth_code_start_at_the_first_event() -> None:
    rows = [event(3, datetime(1980, 1, 1, 10), "R/a"), event(3, datetime(1980, 1, 1, 23), "G/F"),
            event(3, datetime(1980, 1, 2, 10), "R/a")]
    positions = build(rows)
    assert positions["entries"].to_list() == [[0, 1, 2], [1, 2]]
    assert positions["weights"].to_list() == [[1.0, 0.5, 0.5], [0.5, 0.5]]
    assert positions["time"].to_list() == [us(datetime(1980, 1, 1, 10)),
                                           us(datetime(1980, 1, 2, 10))]
    np.testing.assert_allclose(positions["age_days"].to_numpy(), [0.0, 1.0])


def test_position_zero_is_the_birth_day_even_without_birth_day_entries() -> None:
    # MEDS_BIRTH has no vocabulary entry and there are no static events: position 0 is still
    # the (empty) birth-day position, and the first later event is position 1, not position 0.
    rows = [event(2, datetime(1990, 6, 1), "MEDS_BIRTH"),
            event(2, datetime(1990, 6, 3), "R/b"),
            event(2, datetime(1990, 6, 3), "R/b"),  # identical event at the same time: skipped
            event(2, datetime(1990, 6, 5), "X")]
    positions = build(rows)
    assert positions["position"].to_list() == [0, 1]
    assert positions["entries"].to_list() == [[], [1, 3]]
    assert positions["time"].to_list() == [us(datetime(1990, 6, 1)), us(datetime(1990, 6, 3))]
    np.testing.assert_allclose(positions["age_days"].to_numpy(), [0.0, 2.0])
    # The empty position 0 survives windowing; position 1 (before X on 06-05) is a point.
    task_codes = pl.DataFrame({"code": ["X"], "task": [0]},
                              schema={"code": pl.String, "task": pl.Int32})
    tree = ontology(POSITION_TREE)
    labelled = label_shard(events_frame(rows), tokenizer(POSITION_VOCAB, POSITION_EDGES), tree,
                           task_codes_of(tree, task_codes), max_window=10, seed=0)
    rows = window_rows(labelled, max_window=10).rows
    row = rows.row(0, named=True)
    assert (row["bag_sizes"], row["entries"], row["points"]) == ([0, 2], [1, 3], [1])
    assert window_labels(rows, 0) == [(0, 0, 2.0)]


def test_positions_of_several_subjects_are_numbered_per_subject() -> None:
    rows = [*SUBJECT_1, event(3, datetime(1980, 1, 1, 10), "R/a"),
            event(3, datetime(1980, 1, 2, 10), "R/a")]
    positions = build(rows)
    assert positions.select("subject_id", "position").rows() == (
        [(1, p) for p in range(7)] + [(3, 0), (3, 1)])


# A lab LAB/k under LAB, a lab LAB/n whose only entries are LAB and its single bin, and a note
# NOTE with no code entry. Vocabulary: LAB 0, LAB/k 1, LAB/k bin 1 (values >= 5) 2,
# NOTE "pos" 3, LAB/n bin 0 4, LAB/k "high" 5.
VALUED_TREE = {"MEDS_BIRTH": [], "LAB": [], "LAB/k": ["LAB"], "LAB/n": ["LAB"], "NOTE": []}
VALUED_VOCAB = [("code", "LAB"), ("code", "LAB/k"), ("numeric", "LAB/k", 1),
                ("text", "NOTE", "pos"), ("numeric", "LAB/n", 0), ("text", "LAB/k", "high")]
VALUED_EDGES = {"LAB/k": [5.0], "LAB/n": []}


def test_valued_events_keep_their_ancestor_bag_and_add_their_value_entry() -> None:
    rows = [
        event(1, datetime(2000, 1, 1), "MEDS_BIRTH"),
        event(1, datetime(2000, 1, 10), "LAB/k", 7.0),  # bag LAB, LAB/k (1/2 each) + bin (1)
        event(1, datetime(2000, 1, 11, 8), "LAB/k", 1.0),  # bin 0 has no entry: the bag alone
        event(1, datetime(2000, 1, 11, 9), "LAB/k", 8.0),  # bin 1's entry is new today
        event(1, datetime(2000, 1, 11, 10), "LAB/k", 2.0),  # LAB, LAB/k seen today: skipped
        event(1, datetime(2000, 1, 12), "NOTE", text="pos"),  # no code entry: the text entry
        event(1, datetime(2000, 1, 12), "NOTE", text="neg"),  # no entry at all: no position
        event(1, datetime(2000, 1, 13), "LAB/n", 3.0),  # parent LAB (1/1) + its bin (1)
        event(1, datetime(2000, 1, 14), "LAB/k", text="high"),  # bag + text entry
    ]
    positions = build_positions(events_frame(rows), tokenizer(VALUED_VOCAB, VALUED_EDGES),
                                ontology(VALUED_TREE))
    assert positions["entries"].to_list() == [[], [0, 1, 2], [0, 1], [0, 1, 2], [3], [0, 4],
                                              [0, 1, 5]]
    assert positions["weights"].to_list() == [[], [0.5, 0.5, 1.0], [0.5, 0.5], [0.5, 0.5, 1.0],
                                              [1.0], [1.0, 1.0], [0.5, 0.5, 1.0]]
    assert positions["time"].to_list() == [us(datetime(2000, 1, d, h)) for d, h in (
        (1, 0), (10, 0), (11, 8), (11, 9), (12, 0), (13, 0), (14, 0))]
