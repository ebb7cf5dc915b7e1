"""Ancestor bags stored once: the table the tokenizer writes, and their expansion at collate.

A prepared window stores, for each event of its positions, the event's *items*: the vocabulary
entries its bag is built from, not the bag itself. An event's code items are its code's minimal
in-vocabulary ancestors (usually the code's own entry; an out-of-vocabulary code with several
in-vocabulary parents has several), and its value item is its numeric-bin or text entry.

The bag table (`tokenizer/bags.npz`, CSR, written with the tokenizer) holds, per vocabulary entry,
its row: for a code entry the in-vocabulary ancestors of its code (itself included, ascending), for
a value entry the entry itself. `ehrmotor.sequences.batching.expand_items` turns items back into the
positions' bags, exactly as `ehrmotor.sequences.positions` encodes them: an event's bag is the union
of its code items' rows, each entry with weight 1 / size of that union, plus its value entry with
weight 1; a position's bag is the union of its events' bags (several at position 0), each entry with
the largest of its weights, entries ascending. The expansion is gathers and sorts over the batch
(torch), no loop per event.

The table also carries the tokenizer's time statistics (`Tokenizer.time_stats`), from which the
collate computes the positions' time features (`ehrmotor.sequences.time_features`): it holds
everything the collate needs to turn a prepared row into the model's inputs besides the row.

    bags.npz: offsets int64 (entries + 1), members u32 (ascending in each row), value bool
              (per entry: a numeric-bin or text entry), time_stats float64 (`TIME_STAT_KEYS`
              order), format_version int64 (one value)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ehrmotor.errors import InputError
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import TIME_STAT_KEYS, Tokenizer

BAGS_FILE = "bags.npz"
BAGS_FORMAT_VERSION = 2
OLDER_LAYOUT = "prepared with an older layout: rerun `ehrmotor prepare`"


@dataclass(frozen=True)
class BagTable:
    """Each vocabulary entry's bag row (see the module docstring). numpy arrays, so that prepare's
    workers need no torch; collate wraps them without copying (`torch.from_numpy`)."""

    offsets: np.ndarray  # int64, entries + 1
    members: np.ndarray  # int64
    value: np.ndarray  # bool, per entry
    time_stats: dict[str, float]  # `Tokenizer.time_stats`

    @property
    def size(self) -> int:
        return len(self.value)

    @classmethod
    def of(cls, tokenizer: Tokenizer, ontology: Ontology) -> BagTable:
        entries = tokenizer.entries.select("index", "kind", "code")
        rows = pl.concat([
            _ancestor_pairs(entries.filter(pl.col("kind") == "code").select(code_id="index",
                                                                             code="code"),
                            tokenizer, ontology).rename({"code_id": "index"}),
            entries.filter(pl.col("kind") != "code").select("index", member="index"),
        ]).sort("index", "member")
        sizes = np.bincount(rows["index"].to_numpy(), minlength=entries.height)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        value = (entries["kind"] != "code").to_numpy()
        return cls(offsets, rows["member"].to_numpy().astype(np.int64), value,
                   dict(tokenizer.time_stats))

    def save(self, directory: Path) -> None:
        """Write `directory/bags.npz` (the caller's folder is a temporary one, renamed whole)."""
        np.savez(directory / BAGS_FILE, offsets=self.offsets,
                 members=self.members.astype(np.uint32), value=self.value,
                 time_stats=np.array([self.time_stats[key] for key in TIME_STAT_KEYS]),
                 format_version=np.array([BAGS_FORMAT_VERSION]))

    @classmethod
    def load(cls, directory: Path) -> BagTable:
        """Read `directory/bags.npz`; a missing or other-version table raises InputError with
        `OLDER_LAYOUT`."""
        path = Path(directory) / BAGS_FILE
        if not path.is_file():
            raise InputError(f"{path}: missing; {OLDER_LAYOUT}")
        try:
            with np.load(path, allow_pickle=False) as table:
                version = int(table["format_version"][0])
                if version != BAGS_FORMAT_VERSION:
                    raise InputError(f"{path}: format_version {version}; {OLDER_LAYOUT}")
                offsets, members, value = table["offsets"], table["members"], table["value"]
                stats = table["time_stats"]
        except InputError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: not a bag table ({exc}); {OLDER_LAYOUT}") from exc
        return cls(offsets.astype(np.int64), members.astype(np.int64), value.astype(bool),
                   dict(zip(TIME_STAT_KEYS, stats.astype(float).tolist(), strict=True)))


def _ancestor_pairs(codes: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology
                    ) -> pl.DataFrame:
    """code_id, member: the in-vocabulary code entries among each code's ancestors (itself
    included), one row per pair. codes: code_id, code."""
    code_entries = tokenizer.entries.filter(pl.col("kind") == "code").select(
        ancestor="code", member="index")
    return (ontology.expand(codes).join(code_entries, on="ancestor", how="inner")
            .select(pl.col("code_id"), pl.col("member").cast(pl.UInt32)).unique())


def code_items(codes: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology,
               table: BagTable) -> pl.DataFrame:
    """code_id, item: the fewest entries whose table rows' union is each code's ancestor bag
    (its minimal in-vocabulary ancestors; any member a row union misses is added itself, so
    the union is the bag whatever the ontology's shape). codes: code_id, code."""
    bag = _ancestor_pairs(codes, tokenizer, ontology)
    rows = _table_rows(table)
    # A member that is a strict ancestor of another member is covered by that member's row.
    covered = (bag.join(rows, left_on="member", right_on="index", how="inner")
               .filter(pl.col("ancestor") != pl.col("member"))
               .select("code_id", member="ancestor").unique())
    items = bag.join(covered, on=["code_id", "member"], how="anti")
    reached = (items.join(rows, left_on="member", right_on="index", how="inner")
               .select("code_id", member="ancestor").unique())
    missed = bag.join(reached, on=["code_id", "member"], how="anti")
    return pl.concat([items, missed]).unique().sort("code_id", "member").rename(
        {"member": "item"})


def _table_rows(table: BagTable) -> pl.DataFrame:
    """index, ancestor (u32): the table's rows as pairs."""
    index = np.repeat(np.arange(table.size, dtype=np.uint32), np.diff(table.offsets))
    return pl.DataFrame({"index": index, "ancestor": table.members.astype(np.uint32)})
