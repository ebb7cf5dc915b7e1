"""The bag table and the expansion of stored items at collate (`ehrmotor.vocabulary.bags`)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from prepare_builders import event, events_frame, ontology, tokenizer

from ehrmotor.errors import InputError
from ehrmotor.sequences.batching import expand_items
from ehrmotor.sequences.positions import build_positions
from ehrmotor.sequences.shards import INDEX, load_prepared
from ehrmotor.vocabulary.bags import BAGS_FILE, OLDER_LAYOUT, BagTable

# C is out of the vocabulary with two in-vocabulary parents: its events store two items, A and B.
TREE = {"A": [], "B": [], "C": ["A", "B"], "D": ["C"], "A/x": ["A"], "L": [], "MEDS_BIRTH": []}
VOCAB = [("code", "A"), ("code", "B"), ("code", "A/x"), ("code", "D"), ("code", "L"),
         ("numeric", "L", 1), ("text", "B", "yes")]
BIRTH = datetime(2000, 1, 1, 8)
EVENTS = [
    # Position 0: A/x (bag A, A/x: weights 1/2), D (bag A, B, D: weights 1/3) and B (bag B:
    # weight 1, and its text entry, weight 1) overlap in A and B, which keep their larger weight.
    event(1, None, "A/x"), event(1, BIRTH, "MEDS_BIRTH"), event(1, BIRTH, "D"),
    event(1, BIRTH, "B", text="yes"),
    event(1, datetime(2000, 2, 1), "C"),  # items A, B: bag A, B
    event(1, datetime(2000, 2, 2), "L", 4.0),  # items L and its bin entry
    event(1, datetime(2000, 2, 3), "D"),
    event(2, datetime(1990, 5, 1), "MEDS_BIRTH"),  # position 0 without any entry
    event(2, datetime(2001, 1, 1), "C", text="yes"),  # C has no text entry: items A, B
]


def expanded(positions: pl.DataFrame, table: BagTable) -> tuple[list, list, list]:
    def flat(name: str) -> torch.Tensor:
        return torch.tensor(positions[name].explode().drop_nulls().to_list(), dtype=torch.long)

    events = torch.tensor(positions["event_items"].list.len().to_list())
    entries, weights, sizes = expand_items(
        flat("items"), flat("event_items"),
        torch.repeat_interleave(torch.arange(len(events)), events), positions.height, table)
    return entries.tolist(), weights.tolist(), sizes.tolist()


def test_items_expand_to_exactly_the_encoded_bags() -> None:
    vocabulary, tree = tokenizer(VOCAB, {"L": [3.0, 5.0]}), ontology(TREE)
    table = BagTable.of(vocabulary, tree)
    positions = build_positions(events_frame(EVENTS), vocabulary, tree, table)
    encoded = build_positions(events_frame(EVENTS), vocabulary, tree)  # expanded bags
    assert positions.drop("items", "event_items").equals(encoded.drop("entries", "weights"))
    assert positions["items"].to_list()[:2] == [[2, 1, 6, 3], [0, 1]]  # events by time, code
    assert positions["event_items"].to_list()[:2] == [[1, 2, 1], [2]]
    entries, weights, sizes = expanded(positions, table)
    assert entries == encoded["entries"].explode().drop_nulls().to_list()
    assert sizes == encoded["entries"].list.len().to_list()
    # float32 bits: the weights are exactly the encoded ones.
    expected = encoded["weights"].explode().drop_nulls().to_numpy()
    assert np.array(weights, dtype=np.float32).tobytes() == expected.tobytes()
    assert encoded["entries"].to_list()[0] == [0, 1, 2, 3, 6]
    # A: 1/2 (from A/x) over 1/3 (from D); B: 1 (the B event) over 1/3; D: 1/3 only.
    assert weights[:5] == [0.5, 1.0, 0.5, pytest.approx(1 / 3), 1.0]


def test_the_table_round_trips_and_a_missing_one_names_the_older_layout(tmp_path: Path) -> None:
    table = BagTable.of(tokenizer(VOCAB), ontology(TREE))
    assert table.members[table.offsets[3]:table.offsets[4]].tolist() == [0, 1, 3]  # D
    table.save(tmp_path)
    loaded = BagTable.load(tmp_path)
    for name in ("offsets", "members", "value"):
        assert np.array_equal(getattr(loaded, name), getattr(table, name)), name
    (tmp_path / BAGS_FILE).unlink()
    with pytest.raises(InputError, match="rerun `ehrmotor prepare`"):
        BagTable.load(tmp_path)


def test_a_dataset_of_the_older_layout_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / INDEX).write_text(json.dumps({"format_version": 3, "files": []}))
    with pytest.raises(InputError) as raised:
        load_prepared(tmp_path)
    assert OLDER_LAYOUT in str(raised.value) and "\n" not in str(raised.value)
