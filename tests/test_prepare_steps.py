"""Unit tests of the `prepare` steps on tiny hand-built inputs with hand-computed expectations.

Covers the split (split.py), tokenizer fitting and binning (tokenizer.py), positions
(positions.py), prediction points, labels and the label cache (labels.py), training windows
(windows.py, shards.py) and the MOTOR task fit (motor_task.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from prepare_builders import (
    US_PER_DAY,
    event,
    events_frame,
    ontology,
    positions_frame,
    tokenizer,
)

from ehrmotor.config import ConfigError, PrepareConfig
from ehrmotor.motor_task.occurrences import (
    ShardLabels,
    censor_days,
    last_event_times,
    occurrence_runs,
    prediction_points,
    run_pairs,
    sample_points,
    task_codes_of,
    task_events,
)
from ehrmotor.motor_task.tasks import MotorTask, TaskCounts, candidate_tasks, count_tasks
from ehrmotor.prepare.shard_jobs import label_shard, window_rows
from ehrmotor.prepare.split import split_subjects
from ehrmotor.sequences.batching import collate_windows, frame_rows
from ehrmotor.sequences.positions import build_positions, encode_events
from ehrmotor.sequences.windows import with_windows
from ehrmotor.vocabulary import tokenizer as tokenizer_module
from ehrmotor.vocabulary.tokenizer import (
    Tokenizer,
    assign_bins,
    count_bins,
    count_shard,
    fit_numeric_edges,
    information_score,
)

EPOCH = datetime(1970, 1, 1)


def us(moment: datetime) -> int:
    """Microseconds since 1970 of a naive datetime (as MEDS stores it)."""
    return int((moment - EPOCH).total_seconds()) * 1_000_000


# =========================================================================== 1. split


def reference_is_val(subject_id: int, seed: int, val_fraction: float) -> bool:
    digest = hashlib.sha256(struct.pack(">q", seed) + struct.pack(">q", subject_id)).digest()
    return int.from_bytes(digest, "big") % 65536 <= val_fraction * 65536


def test_split_matches_the_reference_sha256_formula() -> None:
    ids = [0, 1, 5, 8, 17, 42, -3, 10**12, 2**62, 123456789]
    split = split_subjects(np.array(ids), seed=97, val_fraction=0.1)
    expected = {i: "val" if reference_is_val(i, 97, 0.1) else "train" for i in ids}
    assert dict(split.iter_rows()) == expected


def test_split_of_ids_0_to_29_with_seed_97_is_the_known_list() -> None:
    split = split_subjects(np.arange(30), seed=97, val_fraction=0.1)
    assert split.filter(pl.col("split_name") == "val")["subject_id"].to_list() == [5, 8, 17]


def test_split_depends_on_the_seed() -> None:
    split = split_subjects(np.arange(30), seed=1, val_fraction=0.1)
    assert split.filter(pl.col("split_name") == "val")["subject_id"].to_list() == [27]


def test_split_is_per_subject_sorted_and_unique() -> None:
    split = split_subjects(np.array([17, 3, 17, 5, 3]), seed=97, val_fraction=0.1)
    assert split.columns == ["subject_id", "split_name"]
    assert split.rows() == [(3, "train"), (5, "val"), (17, "val")]


def test_split_val_share_is_about_ten_percent() -> None:
    split = split_subjects(np.arange(100_000), seed=97, val_fraction=0.1)
    share = (split["split_name"] == "val").mean()
    assert 0.09 <= share <= 0.11


def test_split_rejects_a_val_fraction_outside_0_1() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_subjects(np.arange(3), seed=97, val_fraction=1.0)


# =========================================================================== 2. tokenizer


def entropy(w: float) -> float:
    """-(w ln w + (1 - w) ln(1 - w)), written out independently of the code under test."""
    return -(w * math.log(w) + (1 - w) * math.log(1 - w))


def test_information_score_hand_values() -> None:
    p = np.array([0.25, 0.5, 0.3, 0.0, 0.5, 1.0])
    baseline = np.array([0.5, 1.0, 0.3, 0.5, 0.25, 1.0])
    expected = [0.5 * math.log(2), math.log(2), 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(information_score(p, baseline), expected, atol=1e-12)


# Ontology for the counting tests: R/a and R/b are children of R; S is a root.
TREE = {"R": [], "R/a": ["R"], "R/b": ["R"], "S": []}
# Four train subjects in two shards: R/a (s1, s2), R/b (s3), S (s2, s4); nobody has R itself.
SHARD_1 = [event(1, datetime(2000, 1, 1), "R/a"), event(2, datetime(2000, 1, 1), "R/a"),
           event(2, datetime(2000, 2, 1), "S"), event(2, datetime(2000, 3, 1), "R/a")]
SHARD_2 = [event(3, datetime(2001, 1, 1), "R/b"), event(4, datetime(2001, 1, 1), "S")]


def fit_tree(**kwargs: float) -> Tokenizer:
    tree = ontology(TREE)
    counts, bins = [], []
    for rows in (SHARD_1, SHARD_2):
        lazy = events_frame(rows).lazy()
        counts.append(count_shard(lazy, tree, sample_size=100, seed=0))
        bins.append(count_bins(lazy, {}))
    settings = {"vocab_size": 100, "min_fraction": 0.0, "min_text_fraction": 0.0} | kwargs
    return Tokenizer.fit(counts, bins, {}, tree, **settings)


def test_count_shard_counts_subjects_over_ancestors() -> None:
    counts = count_shard(events_frame(SHARD_1).lazy(), ontology(TREE), sample_size=10, seed=0)
    assert counts.num_subjects == 2
    # s1 and s2 only have the child R/a, yet both count for its parent R; s2 counts once.
    assert dict(counts.code_subjects.sort("code").iter_rows()) == {"R": 2, "R/a": 2, "S": 1}


def test_tokenizer_ranks_codes_by_information_with_code_tie_break() -> None:
    fitted = fit_tree()
    # p: R 3/4 (no parent), S 2/4 (no parent), R/a 2/4 and R/b 1/4 (parent R at 3/4).
    assert fitted.num_train_subjects == 4
    assert fitted.entries["code"].to_list() == ["S", "R", "R/a", "R/b"]
    assert fitted.entries["index"].to_list() == [0, 1, 2, 3]
    np.testing.assert_allclose(fitted.entries["probability"].to_numpy(), [0.5, 0.75, 0.5, 0.25])
    # R/a (w = 2/3) and R/b (w = 1/3) tie exactly: 0.75 × H(2/3) = 0.75 × H(1/3).
    expected = [entropy(0.5), entropy(0.75), 0.75 * entropy(2 / 3), 0.75 * entropy(1 / 3)]
    np.testing.assert_allclose(fitted.entries["score"].to_numpy(), expected, rtol=1e-12)


def test_tokenizer_drops_entries_rarer_than_min_fraction() -> None:
    fitted = fit_tree(min_fraction=0.3)
    assert fitted.entries["code"].to_list() == ["S", "R", "R/a"]  # R/b: 1/4 < 0.3


def test_tokenizer_keeps_the_top_vocab_size_entries() -> None:
    assert fit_tree(vocab_size=2).entries["code"].to_list() == ["S", "R"]


def test_numeric_edges_are_nearest_quantiles_of_the_sample() -> None:
    sample = pl.DataFrame({"code": ["L"] * 9 + ["K"] * 3,
                           "value": [9.0, 1, 8, 2, 7, 3, 6, 4, 5] + [2.0, 2.0, 2.0]})
    edges = fit_numeric_edges([sample], num_bins=4, per_code=100)
    # quartiles of 1..9 (nearest): 3, 5, 7; a code with one distinct value gets no edges.
    assert edges == {"K": [], "L": [3.0, 5.0, 7.0]}


def test_numeric_edges_represent_every_shard_when_the_pool_is_cut() -> None:
    shard_a = pl.DataFrame({"code": ["L"] * 9, "value": [float(v) for v in range(1, 10)]})
    shard_b = pl.DataFrame({"code": ["L"] * 9, "value": [float(v) for v in range(101, 110)]})
    edges = fit_numeric_edges([shard_a, shard_b], num_bins=2, per_code=9)
    # Half the values are 1..9 and half 101..109: the median edge lies between the two groups,
    # not inside the lower one (which is what keeping the 9 smallest pooled values gives).
    assert len(edges["L"]) == 1
    assert 9.0 <= edges["L"][0] <= 101.0


def test_assign_bins_uses_right_closed_lower_edges() -> None:
    codes = pl.Series(["L", "L", "L", "L", "L", "L", "L", "Q", "L", "L"])
    values = pl.Series([1.0, 2.9, 3.0, 5.0, 6.9, 7.0, 100.0, 4.0, None, float("nan")],
                       dtype=pl.Float32)
    bins = assign_bins(codes, values, {"L": [3.0, 5.0, 7.0]})
    assert bins.to_list() == [0, 0, 1, 2, 2, 3, 3, None, None, None]


def test_tokenizer_fits_numeric_bins_and_frequent_text_values() -> None:
    rows = [
        event(1, datetime(2000, 1, 1), "L", 1.0), event(2, datetime(2000, 1, 1), "L", 2.0),
        event(3, datetime(2000, 1, 1), "L", 3.0), event(4, datetime(2000, 1, 1), "L", 4.0),
        event(1, datetime(2000, 1, 2), "S"), event(2, datetime(2000, 1, 2), "S"),
        event(1, datetime(2000, 1, 3), "N", text="yes"),
        event(2, datetime(2000, 1, 3), "N", text="yes"),
        event(3, datetime(2000, 1, 3), "N", text="yes"),
        event(4, datetime(2000, 1, 3), "N", text="no"),
    ]
    tree = ontology({"L": [], "S": [], "N": []})
    edges = {"L": [2.5]}  # L values 1, 2 -> bin 0; 3, 4 -> bin 1
    lazy = events_frame(rows).lazy()
    fitted = Tokenizer.fit([count_shard(lazy, tree, 100, 0)], [count_bins(lazy, edges)], edges,
                           tree, vocab_size=100, min_fraction=0.0, min_text_fraction=0.5)
    got = fitted.entries.select("kind", "code", "bin", "text").rows()
    # S (p 1/2), both L bins (p 1/2 under L at 1) score ln 2 and tie: code before numeric, then
    # bin order. N "yes" (3/4 under N at 1) scores H(3/4); L and N (p 1, no parent) score 0.
    # N "no" (1/4 < min_text_fraction 0.5) gets no entry.
    assert got == [("code", "S", None, None), ("numeric", "L", 0, None),
                   ("numeric", "L", 1, None), ("text", "N", None, "yes"),
                   ("code", "L", None, None), ("code", "N", None, None)]
    np.testing.assert_allclose(fitted.entries["score"].to_numpy(),
                               [math.log(2)] * 3 + [entropy(0.75), 0.0, 0.0], atol=1e-12)
    bounds = fitted.entries.filter(pl.col("kind") == "numeric").select("lower", "upper").rows()
    assert bounds == [(-1e308, 2.5), (2.5, 1e308)]


def test_scores_equal_in_exact_arithmetic_tie_whatever_the_last_bit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's vectorised log differs in the last bit between CPU kinds; entries whose scores
    are equal in exact arithmetic (here S and both L bins, ln 2) must still be ordered by kind,
    code and bin, not by that bit."""
    score = tokenizer_module.information_score

    def last_bit_off(p: np.ndarray, baseline: np.ndarray) -> np.ndarray:
        out = score(p, baseline)
        first = np.flatnonzero(np.isclose(out, math.log(2)))[0]  # S: code entries come first
        out[first] = np.nextafter(out[first], -np.inf)
        return out

    monkeypatch.setattr(tokenizer_module, "information_score", last_bit_off)
    rows = [event(1, datetime(2000, 1, 1), "L", 1.0), event(2, datetime(2000, 1, 1), "L", 4.0),
            event(1, datetime(2000, 1, 2), "S")]
    tree = ontology({"L": [], "S": []})
    edges = {"L": [2.5]}
    lazy = events_frame(rows).lazy()
    fitted = Tokenizer.fit([count_shard(lazy, tree, 100, 0)], [count_bins(lazy, edges)], edges,
                           tree, vocab_size=100, min_fraction=0.0, min_text_fraction=0.0)
    assert fitted.entries.select("kind", "code", "bin").rows()[:3] == [
        ("code", "S", None), ("numeric", "L", 0), ("numeric", "L", 1)]


def test_tokenizer_save_load_round_trip(tmp_path: Path) -> None:
    rows = [event(1, datetime(2000, 1, 1), "L", 1.0), event(2, datetime(2000, 1, 1), "L", 4.0),
            event(1, datetime(2000, 1, 2), "N", text="yes"), event(2, datetime(2000, 1, 2), "S")]
    tree = ontology({"L": [], "S": [], "N": []})
    edges = {"L": [2.5]}
    lazy = events_frame(rows).lazy()
    fitted = Tokenizer.fit([count_shard(lazy, tree, 100, 0)], [count_bins(lazy, edges)], edges,
                           tree, vocab_size=100, min_fraction=0.0, min_text_fraction=0.0)
    fitted.time_stats = {"age_mean": 1.5, "age_std": 2.0, "log_age_mean": 0.25,
                         "log_age_std": 1.0, "log_delta_mean": 0.0, "log_delta_std": 3.0}
    assert set(fitted.entries["kind"]) == {"code", "numeric", "text"}
    fitted.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert_frame_equal(loaded.entries, fitted.entries)
    assert loaded.numeric_edges == {"L": [2.5]}
    assert loaded.time_stats == fitted.time_stats
    assert loaded.num_train_subjects == 2


def test_every_fitted_entry_occurs_in_the_encoding_of_the_train_events() -> None:
    # L and K only ever carry values; their code entries are still used, through the ancestor
    # bags of their valued events (and LAB, the parent of both, through theirs).
    rows = [
        event(1, datetime(2000, 1, 1), "L", 1.0), event(2, datetime(2000, 1, 1), "L", 2.0),
        event(3, datetime(2000, 1, 1), "L", 3.0), event(4, datetime(2000, 1, 1), "L", 4.0),
        event(1, datetime(2000, 1, 2), "K", 9.0), event(3, datetime(2000, 1, 2), "K", 9.0),
        event(1, datetime(2000, 1, 3), "N", text="yes"),
        event(2, datetime(2000, 1, 3), "N", text="no"), event(2, datetime(2000, 1, 4), "S"),
    ]
    tree = ontology({"LAB": [], "L": ["LAB"], "K": ["LAB"], "N": [], "S": []})
    lazy = events_frame(rows).lazy()
    counts = count_shard(lazy, tree, 100, 0)
    edges = fit_numeric_edges([counts.numeric_samples], num_bins=2, per_code=100)
    fitted = Tokenizer.fit([counts], [count_bins(lazy, edges)], edges, tree, vocab_size=100,
                           min_fraction=0.0, min_text_fraction=0.0)
    assert set(fitted.entries.filter(pl.col("kind") == "code")["code"]) == {
        "LAB", "L", "K", "N", "S"}
    assert set(fitted.entries["kind"]) == {"code", "numeric", "text"}
    encoded = encode_events(events_frame(rows), fitted, tree)
    assert sorted(encoded["entry"].unique().to_list()) == fitted.entries["index"].to_list()


# =========================================================================== 3. positions

POSITION_TREE = {"G/F": [], "R": [], "R/a": ["R"], "R/b": ["R"], "L": [], "N": [],
                 "MEDS_BIRTH": [], "X": []}
# Vocabulary: MEDS_BIRTH, N and X have no code entry; L values in [3, 5) have entry 5, values
# from 7 entry 7; L values below 3 or in [5, 7) have no bin entry.
POSITION_VOCAB = [("code", "G/F"), ("code", "R"), ("code", "R/a"), ("code", "R/b"),
                  ("code", "L"), ("numeric", "L", 1), ("text", "N", "yes"), ("numeric", "L", 3)]
POSITION_EDGES = {"L": [3.0, 5.0, 7.0]}
BIRTH_1 = datetime(2000, 1, 1, 8)
SUBJECT_1 = [
    event(1, None, "G/F"),
    event(1, BIRTH_1, "MEDS_BIRTH"),
    event(1, datetime(2000, 1, 1, 20), "R/a"),  # birth day: part of position 0
    event(1, datetime(2000, 1, 11, 0), "R/a"),  # position 1: R, R/a
    event(1, datetime(2000, 1, 11, 6), "R/a"),  # R, R/a already seen that day: skipped
    event(1, datetime(2000, 1, 11, 6), "R/b"),  # position 2: R/b is new that day
    event(1, datetime(2000, 1, 12, 0), "R/a"),  # position 3: a new day
    event(1, datetime(2000, 1, 21, 12), "L", 4.0),  # position 4: code L and its bin entry
    event(1, datetime(2000, 1, 21, 12), "L", 6.0),  # bin 2 has no entry, L seen: skipped
    event(1, datetime(2000, 1, 21, 12), "L", 100.0),  # position 5: bin 3's entry is new today
    event(1, datetime(2000, 1, 22, 0), "N", text="yes"),  # position 6: text entry (N: no code)
    event(1, datetime(2000, 1, 22, 0), "N", text="no"),  # no entry at all: no position
    event(1, datetime(2000, 1, 23, 0), "X"),  # no entry: no position (but the last event)
]


def build(rows: list) -> pl.DataFrame:
    return build_positions(events_frame(rows), tokenizer(POSITION_VOCAB, POSITION_EDGES),
                           ontology(POSITION_TREE))


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


# =========================================================================== 4. labels


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


def points_frame(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "position": pl.Int32,
                                      "time": pl.Int64}, orient="row")


def occurrences_frame(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "task": pl.Int32,
                                      "time": pl.Int64}, orient="row")


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


# =========================================================================== 5. windows


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


def window_labels(rows: pl.DataFrame, index: int) -> list[tuple[int, int, float]]:
    """Row `index`'s (point, task, days) labels as the training collate derives them, sorted."""
    batch = collate_windows(frame_rows(rows[index:index + 1]), labels=True)
    return sorted(zip(batch["label_point"].tolist(), batch["label_task"].tolist(),
                      batch["label_days"].tolist(), strict=True))


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


# =========================================================================== 6. MOTOR task

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
