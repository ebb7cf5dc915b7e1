"""Data oddities: rows every step can read but a user wants to hear about, each one warning.

Each oddity is counted per data file by vectorised polars aggregations that run in the same
`collect_all` as the other row checks of `shard_checks.check_shard` (no loop over rows or
subjects), summed over the files by `Oddities`, and reported once per dataset: one line with the
counts, the first file, row and subject where it occurs, and what prepare does with it.

    early_birth   timed events before the subject's MEDS_BIRTH    folded into the birth position
    duplicate     rows equal in every MEDS column                 kept (not de-duplicated)
    after_death   events later than the subject's MEDS_DEATH      kept as ordinary events
    births        MEDS_BIRTH rows with different times            the earliest is the birth
    year          years before 1800 or after next year            used as given
    float16       numeric_value stored as float16                 widened to float32

`parent_cycles` finds the cycles of a code → parent graph (codes.parquet here, the ontology in
prepare).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl

from ehrmotor.errors import cut
from ehrmotor.meds.read import BIRTH_CODE, DEATH_CODE

EARLIEST_YEAR = 1800
# Longest parent path followed when looking for cycles; real hierarchies are under 30 deep.
MAX_CYCLE_DEPTH = 64
_ROW = "__row"  # the row-index column of `shard_checks`


def latest_year() -> int:
    """The last plausible event year: next year (data may be dated a little ahead)."""
    return datetime.now().year + 1


# --------------------------------------------------------------------------- per-file counts


def _counted(name: str) -> list[pl.Expr]:
    """Rows where the boolean column `name` is true, their subjects, the first such row and its
    subject."""
    mask, sid, row = pl.col(name), pl.col("subject_id"), pl.col(_ROW)
    return [
        mask.sum().alias(f"{name}_rows"),
        sid.filter(mask).n_unique().alias(f"{name}_subjects"),
        row.filter(mask).first().alias(f"{name}_row"),
        sid.filter(mask).first().alias(f"{name}_sid"),
    ]


def oddities_query(rows: pl.LazyFrame, columns: list[str], float16: bool) -> pl.LazyFrame:
    """One row counting the row oddities of one file (`<kind>_rows`, `_subjects`, `_row`, `_sid`
    and, for some, `_low` / `_high`).

    `rows`: the file's rows with a non-null integer subject_id, a timestamp `time`, a string
    `code` and the `_ROW` index; `columns` are the MEDS columns the file has (compared for
    duplicates), `float16` whether its numeric_value is float16. Each mask is computed once as a
    column, then aggregated.
    """
    sid, time = pl.col("subject_id"), pl.col("time")
    code = pl.col("code").cast(pl.String)
    birth = time.filter(code == BIRTH_CODE).min().over(sid)
    death = time.filter(code == DEATH_CODE).min().over(sid)
    year = time.dt.year()
    masks = {
        "early_birth": (time < birth).fill_null(False),
        # A 64-bit hash of the whole row: cheaper than comparing the columns, and a collision
        # (one in 2**64 per pair) would only miscount a warning.
        "duplicate": ~pl.struct(columns).hash().is_first_distinct(),
        "after_death": (time > death).fill_null(False),
        "year": ((year < EARLIEST_YEAR) | (year > latest_year())).fill_null(False),
    }
    if float16:
        masks["float16"] = pl.col("numeric_value").is_not_null()
    flagged = rows.select("subject_id", _ROW, time, death=death, year_value=year, **masks)
    odd_year = pl.col("year_value").filter(pl.col("year"))
    return flagged.select(
        *(expr for name in masks for expr in _counted(name)),
        (time - pl.col("death")).filter(pl.col("after_death")).max().dt.total_days()
        .alias("after_death_high"),
        odd_year.min().alias("year_low"),
        odd_year.max().alias("year_high"),
    )


def births_query(rows: pl.LazyFrame) -> pl.LazyFrame:
    """One row: subjects whose MEDS_BIRTH rows have different times, their birth rows, and the
    first such subject (its first birth row, earliest and latest birth).

    `rows` as for `oddities_query`; only the birth rows are grouped, so this costs little.
    """
    sid, time, row = pl.col("subject_id"), pl.col("time"), pl.col(_ROW)
    per_subject = (
        rows.filter((pl.col("code").cast(pl.String) == BIRTH_CODE) & time.is_not_null())
        .group_by(sid)
        .agg(times=time.n_unique(), rows=pl.len(), row=row.min(), low=time.min(), high=time.max())
        .filter(pl.col("times") > 1)
        .sort("row")
    )
    return per_subject.select(
        births_rows=pl.col("rows").sum(), births_subjects=pl.len(),
        births_row=pl.col("row").first(), births_sid=sid.first(),
        births_low=pl.col("low").first(), births_high=pl.col("high").first(),
    )


# --------------------------------------------------------------------------- across files


@dataclass
class Tally:
    """One oddity summed over files; the example is the first file's first row."""

    rows: int = 0
    subjects: int = 0
    files: int = 0
    file: str = ""
    row: int | None = None
    subject_id: int | None = None
    low: Any = None  # the smallest / largest value of interest (years, dates, days)
    high: Any = None


def _days(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _date(value: object) -> str:
    return value.date().isoformat() if isinstance(value, datetime) else str(value)


# kind -> (column, what (from its tally), expected); in report order.
_MESSAGES: dict[str, tuple[str | None, Callable[[Tally], str], str]] = {
    "early_birth": (
        "time",
        lambda t: f"{t.subjects} subject(s) have {t.rows} timed event(s) before their "
        f"{BIRTH_CODE} event (prepare folds them into the birth position)",
        f"{BIRTH_CODE} no later than a subject's first timed event"),
    "duplicate": (
        None,
        lambda t: f"{t.rows:,} duplicate row(s) of {t.subjects:,} subject(s) repeat an earlier "
        "row in every column (subject_id, time, code, numeric_value, text_value); prepare does "
        "not de-duplicate them: a copy adds no position (its entries were seen that day) but "
        "counts twice in event totals and numeric-value bins",
        "each event once"),
    "after_death": (
        "time",
        lambda t: f"{t.rows:,} event(s) of {t.subjects:,} subject(s) are dated after their "
        f"{DEATH_CODE} event, up to {_days(t.high)} day(s) after death; prepare keeps them as "
        "ordinary events",
        f"no events after {DEATH_CODE}"),
    "births": (
        "time",
        lambda t: f"{t.subjects:,} subject(s) have {BIRTH_CODE} rows with different times "
        f"({t.rows:,} rows; here {_date(t.low)} and {_date(t.high)}); prepare takes the "
        "earliest as the birth, the later ones are ordinary events",
        f"one {BIRTH_CODE} time per subject"),
    "year": (
        "time",
        lambda t: f"{t.rows:,} event(s) of {t.subjects:,} subject(s) have implausible years "
        f"(from {t.low} to {t.high}); prepare uses them as given",
        f"years {EARLIEST_YEAR} to {latest_year()}"),
    "float16": (
        "numeric_value",
        lambda t: f"numeric_value is float16 ({t.rows:,} value(s)); read widened to float32, "
        "but the values keep float16's precision (about 3 significant digits, at most 65504)",
        "float32"),
}


@dataclass
class Oddities:
    """The oddities of a dataset, summed over its files as they are checked."""

    tallies: dict[str, Tally] = field(default_factory=dict)

    def add_file(self, rel: str, result: dict[str, Any]) -> None:
        """Count in one file's results (`oddities_query` and `births_query` outputs)."""
        for kind in _MESSAGES:
            if not result.get(f"{kind}_rows"):
                continue
            tally = self.tallies.setdefault(kind, Tally())
            low, high = result.get(f"{kind}_low"), result.get(f"{kind}_high")
            if not tally.files:  # the example: this file's first row
                tally.file, tally.row, tally.subject_id = (
                    rel, result.get(f"{kind}_row"), result.get(f"{kind}_sid"))
                tally.low, tally.high = low, high
            elif kind in ("year", "after_death"):  # extremes over every file
                tally.low = low if tally.low is None or low is None else min(tally.low, low)
                tally.high = high if tally.high is None or high is None else max(tally.high, high)
            tally.rows += int(result[f"{kind}_rows"])
            tally.subjects += int(result.get(f"{kind}_subjects") or 0)
            tally.files += 1

    def warn(self, found: Any) -> None:
        """Record one warning per oddity on `found` (a `shard_checks.Findings`)."""
        for kind, (column, what, expected) in _MESSAGES.items():
            tally = self.tallies.get(kind)
            if tally is None:
                continue
            where = f" (in {tally.files} files; the first here)" if tally.files > 1 else ""
            found.warn(tally.file, what(tally) + where, expected,
                       column=column, row=tally.row, subject_id=tally.subject_id)


# --------------------------------------------------------------------------- parent cycles


def parent_cycles(edges: pl.DataFrame) -> pl.DataFrame:
    """The edges (code, parent) of `edges` that lie on a cycle, sorted; self-edges (a code its
    own parent) are left out: the ontology drops them.

    Codes without a parent or without a child lie on no cycle; dropping their edges until none
    is left to drop leaves the cycles and the paths between them (nothing, for a hierarchy).
    On that remainder an edge code → parent is on a cycle when the parent reaches the code.
    """
    edges = edges.select(pl.col("code").cast(pl.String), pl.col("parent").cast(pl.String))
    edges = edges.drop_nulls().filter(pl.col("code") != pl.col("parent")).unique()
    while edges.height:
        kept = edges.filter(pl.col("code").is_in(edges["parent"].implode())
                            & pl.col("parent").is_in(edges["code"].implode()))
        if kept.height == edges.height:
            break
        edges = kept
    # (start, node): node is reached from start in one or more steps up.
    reached = edges.select(start="code", node="parent")
    frontier = reached
    up = edges.rename({"code": "node", "parent": "next"})
    for _ in range(MAX_CYCLE_DEPTH):
        frontier = (frontier.join(up, on="node").select("start", node="next").unique()
                    .join(reached, on=["start", "node"], how="anti"))
        if not frontier.height:
            break
        reached = pl.concat([reached, frontier])
    back = reached.select(code="node", parent="start")  # parent reaches code
    return edges.join(back, on=["code", "parent"], how="semi").sort("code", "parent")


def describe_cycles(cycles: pl.DataFrame) -> str:
    """'N code(s) on parent cycles, e.g. 'A' has parent 'B', which has 'A' as an ancestor'."""
    code, parent = cycles.row(0)
    codes = pl.concat([cycles["code"], cycles["parent"]]).n_unique()
    example = f"{cut(code)!r} has parent {cut(parent)!r}, which has {cut(code)!r} as an ancestor"
    return f"{codes:,} code(s) lie on parent cycles, e.g. {example}"
