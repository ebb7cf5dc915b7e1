"""Fitting the tokenizer (vocabulary/tokenizer.py) on tiny hand-built shards: counting, ranking,
numeric bins, text values.

Hand-built inputs with hand-computed expectations."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from prepare_builders import (
    event,
    events_frame,
    ontology,
)

from ehrmotor.sequences.positions import encode_events
from ehrmotor.vocabulary import tokenizer as tokenizer_module
from ehrmotor.vocabulary.tokenizer import (
    Tokenizer,
    assign_bins,
    count_bins,
    count_shard,
    fit_numeric_edges,
    information_score,
)


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
