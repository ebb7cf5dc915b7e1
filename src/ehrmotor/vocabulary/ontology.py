"""Code ontology: each code's parent codes, from an OHDSI Athena download and MEDS codes metadata.

Where parent edges come from (codes are `VOCABULARY_ID/concept_code`):
- `CONCEPT_ANCESTOR.csv` rows with `min_levels_of_separation == 1`, for every concept;
- `CONCEPT_RELATIONSHIP.csv` `Maps to` rows of non-standard concepts (`standard_concept` not `S`
  or `C`), self-maps and rows with an `invalid_reason` ignored;
- `metadata/codes.parquet` `parent_codes`: when non-empty they replace the Athena parents of that
  code (codes.parquet may also name codes that Athena lacks, such as `MEDS_BIRTH`).

The graph is pruned to the data's codes plus everything they reach through parent edges. Codes
of `remove_vocabularies` never enter as ancestors; such a code is kept only if the data has it.

Artifact (a directory written by `Ontology.save`)::

    parents.parquet    code (str), parent (str)                direct edges, sorted
    ancestors.parquet  code (str), ancestor (str), depth (i32)  closure incl. self at depth 0,
                       sorted by (code, depth, ancestor)
    stats.json         OntologyStats as a JSON object
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

import polars as pl

from ehrmotor.errors import OntologyError
from ehrmotor.meds.oddities import describe_cycles, parent_cycles
from ehrmotor.vocabulary.athena import CONCEPT_FILE, read_athena

__all__ = ["Ontology", "OntologyError", "OntologyStats"]

logger = logging.getLogger(__name__)

DEFAULT_REMOVE_VOCABULARIES = ("SPL", "HemOnc")
# Closure depth guard; real hierarchies (SNOMED) are under 30 levels deep.
MAX_DEPTH = 64

PARENTS_FILE = "parents.parquet"
ANCESTORS_FILE = "ancestors.parquet"
STATS_FILE = "stats.json"

EDGE_SCHEMA: dict[str, pl.DataType] = {"code": pl.String(), "parent": pl.String()}
ANCESTOR_SCHEMA: dict[str, pl.DataType] = {
    "code": pl.String(), "ancestor": pl.String(), "depth": pl.Int32(),
}

FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)


@dataclass(frozen=True)
class OntologyStats:
    """Counts from one `Ontology.build`.

    concepts_read: distinct codes known before pruning (Athena, codes.parquet, edge endpoints).
    edges_read: distinct parent edges before pruning (after codes.parquet overrides).
    missing_references: parent-edge rows naming a concept id absent from CONCEPT.csv (dropped).
    codes_kept / edges_kept: codes and direct edges after pruning.
    data_codes: distinct codes in the data; data_codes_unknown: those known nowhere (kept as roots).
    """

    concepts_read: int
    edges_read: int
    missing_references: int
    codes_kept: int
    edges_kept: int
    data_codes: int
    data_codes_unknown: int


# --------------------------------------------------------------------------- Athena reading


def _metadata_edges(codes_metadata: pl.DataFrame) -> tuple[pl.Series, pl.DataFrame]:
    """codes.parquet as (its codes, its parent edges); raises OntologyError on a missing column."""
    if "code" not in codes_metadata.columns:
        raise OntologyError("metadata/codes.parquet: missing column 'code'")
    codes = codes_metadata["code"].cast(pl.String).drop_nulls().unique()
    if "parent_codes" not in codes_metadata.columns:
        return codes, pl.DataFrame(schema=EDGE_SCHEMA)
    parent_codes = pl.col("parent_codes").cast(pl.List(pl.String))
    try:
        edges = codes_metadata.select(pl.col("code").cast(pl.String), parent=parent_codes)
    except pl.exceptions.PolarsError as exc:
        raise OntologyError(f"metadata/codes.parquet: column 'parent_codes' is not a list of "
                            f"strings ({exc})") from exc
    edges = edges.explode("parent").drop_nulls().filter(pl.col("parent") != "")
    return codes, edges.unique()


# --------------------------------------------------------------------------- graph algorithms


def _reachable(edges: pl.DataFrame, start: pl.Series) -> pl.Series:
    """All codes reachable from `start` through code→parent edges, `start` included."""
    reached = start.unique()
    frontier = reached
    while frontier.len():
        step = edges.join(frontier.to_frame("code"), on="code", how="semi")["parent"].unique()
        frontier = step.filter(~step.is_in(reached.implode()))
        reached = pl.concat([reached, frontier])
    return reached


def _closure(parents: pl.DataFrame, codes: pl.Series) -> pl.DataFrame:
    """Transitive closure (code, ancestor, depth) incl. self at depth 0, by frontier joins.

    Breadth-first, so the first time a pair appears is its minimum depth; pairs already found are
    dropped from the frontier, which also ends cycles. Sorted by (code, depth, ancestor).
    """
    found = codes.to_frame("code").select("code", ancestor="code", depth=pl.lit(0, pl.Int32))
    frontier = found.select("code", "ancestor")
    up = parents.rename({"code": "ancestor", "parent": "next"})
    depth = 0
    while frontier.height and depth < MAX_DEPTH:
        depth += 1
        frontier = (
            frontier.join(up, on="ancestor").select("code", ancestor="next").unique()
            .join(found, on=["code", "ancestor"], how="anti")
        )
        found = pl.concat([found, frontier.with_columns(depth=pl.lit(depth, pl.Int32))])
    if frontier.height:
        logger.warning("ontology closure stopped at depth %d with %d pairs left; the parent "
                       "graph is deeper than that or has a cycle", MAX_DEPTH, frontier.height)
    return found.sort("code", "depth", "ancestor")


def _vocabulary(column: str) -> pl.Expr:
    """The vocabulary part of a `VOCABULARY/code` string column (the whole string without '/')."""
    return pl.col(column).str.splitn("/", 2).struct.field("field_0")


def _warn_odd_hierarchy(parents: pl.DataFrame, metadata_edges: pl.DataFrame,
                       athena: bool) -> None:
    """Warn when the pruned graph has no edge (flat codes) or has cycles (naming a code)."""
    if not parents.height:
        source = ("the Athena folder and codes.parquet give" if athena else
                  "no Athena folder was given and codes.parquet gives")
        logger.warning("no code hierarchy: %s no parent of any data code; MOTOR's hierarchical "
                       "tokenizer and tasks fall back to flat codes (give --athena, or "
                       "parent_codes in metadata/codes.parquet)", source)
        return
    cycles = parent_cycles(parents)
    if cycles.height:
        first = cycles.head(1)
        source = ("metadata/codes.parquet parent_codes" if first.join(
            metadata_edges, on=["code", "parent"], how="semi").height else "Athena")
        logger.warning("ontology: %s (from %s); the ancestor closure stops at codes already "
                       "reached, so each code on a cycle counts the others as ancestors",
                       describe_cycles(cycles), source)


# --------------------------------------------------------------------------- the ontology


class Ontology:
    """A pruned code → parents graph and its ancestor closure.

    `parents`: code, parent (String), direct edges sorted by (code, parent).
    `ancestors`: code, ancestor (String), depth (Int32), every kept code with itself at depth 0,
    sorted by (code, depth, ancestor). `stats`: counts from the build.
    """

    def __init__(self, parents: pl.DataFrame, ancestors: pl.DataFrame, stats: OntologyStats):
        self.parents = parents
        self.ancestors = ancestors
        self.stats = stats

    @classmethod
    def build(
        cls,
        data_codes: Iterable[str] | pl.Series,
        *,
        athena_dir: Path | None = None,
        codes_metadata: pl.DataFrame | None = None,
        remove_vocabularies: Sequence[str] = DEFAULT_REMOVE_VOCABULARIES,
    ) -> Ontology:
        """Build the ontology for `data_codes` (the distinct codes of the MEDS data).

        `athena_dir`: folder with CONCEPT.csv, CONCEPT_RELATIONSHIP.csv, CONCEPT_ANCESTOR.csv (or
        None to use `codes_metadata` alone). `codes_metadata`: metadata/codes.parquet as read
        (columns code and optionally parent_codes). Raises OntologyError for unusable input.
        """
        started = time.perf_counter()
        if not isinstance(data_codes, pl.Series):
            data_codes = pl.Series(list(data_codes), dtype=pl.String)
        data = data_codes.cast(pl.String).rename("code").drop_nulls().unique().sort()
        known_parts = []
        edges = pl.DataFrame(schema=EDGE_SCHEMA)
        missing = 0
        metadata_edges = pl.DataFrame(schema=EDGE_SCHEMA)
        if athena_dir is not None:
            athena_codes, edges, missing = read_athena(Path(athena_dir))
            known_parts.append(athena_codes)
        if codes_metadata is not None:
            metadata_codes, metadata_edges = _metadata_edges(codes_metadata)
            known_parts.append(metadata_codes)
            # Non-empty parent_codes in codes.parquet replace that code's Athena parents.
            overridden = metadata_edges["code"].unique().implode()
            edges = pl.concat([edges.filter(~pl.col("code").is_in(overridden)), metadata_edges])
        if athena_dir is None and metadata_edges.height:  # else: "no code hierarchy" below
            logger.warning("no Athena vocabulary given; code parents come from codes.parquet alone")
        edges = edges.filter(pl.col("code") != pl.col("parent")).unique()
        known = pl.concat([*known_parts, edges["code"], edges["parent"]]).unique()
        unknown = data.filter(~data.is_in(known.implode()))
        if missing:
            logger.warning("%d Athena parent-edge rows name concept ids missing from %s; "
                           "they were skipped", missing, CONCEPT_FILE)

        # Removed vocabularies may not enter as ancestors unless the data itself uses the code.
        removed = list(remove_vocabularies)
        usable = edges.filter(
            ~_vocabulary("parent").is_in(removed) | pl.col("parent").is_in(data.implode())
        )
        kept = _reachable(usable, data)
        parents = usable.filter(pl.col("code").is_in(kept.implode())).sort("code", "parent")
        ancestors = _closure(parents, kept)
        _warn_odd_hierarchy(parents, metadata_edges, athena_dir is not None)
        stats = OntologyStats(
            concepts_read=known.len(), edges_read=edges.height, missing_references=missing,
            codes_kept=kept.len(), edges_kept=parents.height, data_codes=data.len(),
            data_codes_unknown=unknown.len(),
        )
        logger.info("ontology pruned from %d codes / %d edges to %d codes / %d edges "
                    "(%d data codes, %d unknown) in %.1f s", stats.concepts_read,
                    stats.edges_read, stats.codes_kept, stats.edges_kept, stats.data_codes,
                    stats.data_codes_unknown, time.perf_counter() - started)
        return cls(parents, ancestors, stats)

    def expand(self, frame: FrameT, column: str = "code") -> FrameT:
        """Add an `ancestor` column: one row per (input row, ancestor of its code, self included).

        A left join on the ancestors table, keeping input row order and ancestors ordered by depth;
        codes the ontology does not know yield one row with ancestor = the code itself.
        Returns the same frame type it was given.
        """
        schema = frame.collect_schema()
        if column not in schema:
            raise OntologyError(f"expand: frame has no column {column!r}; has {schema.names()}")
        if "ancestor" in schema:
            raise OntologyError("expand: frame already has a column 'ancestor'")
        if schema[column] != pl.String():
            raise OntologyError(f"expand: column {column!r} is {schema[column]}; expected String")
        table = self.ancestors.lazy().select(pl.col("code").alias(column), "ancestor")
        expanded = (
            frame.lazy()
            .join(table, on=column, how="left", maintain_order="left_right")
            .with_columns(ancestor=pl.coalesce("ancestor", column))
        )
        if isinstance(frame, pl.DataFrame):
            return expanded.collect()
        return expanded

    def save(self, directory: Path) -> None:
        """Write parents.parquet, ancestors.parquet and stats.json into `directory` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.parents.sort("code", "parent").write_parquet(directory / PARENTS_FILE)
        self.ancestors.sort("code", "depth", "ancestor").write_parquet(directory / ANCESTORS_FILE)
        text = json.dumps(asdict(self.stats), indent=2, sort_keys=True, allow_nan=False)
        (directory / STATS_FILE).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> Ontology:
        """Read an ontology written by `save`; raises OntologyError naming a bad or missing file."""
        directory = Path(directory)
        parents = _read_table(directory / PARENTS_FILE, EDGE_SCHEMA)
        ancestors = _read_table(directory / ANCESTORS_FILE, ANCESTOR_SCHEMA)
        stats_path = directory / STATS_FILE
        try:
            raw = json.loads(stats_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OntologyError(f"{stats_path}: cannot read ({exc})") from exc
        names = [f.name for f in fields(OntologyStats)]
        if not isinstance(raw, dict) or sorted(raw) != sorted(names):
            raise OntologyError(f"{stats_path}: expected a JSON object with keys {names}")
        return cls(parents, ancestors, OntologyStats(**{name: int(raw[name]) for name in names}))


def _read_table(path: Path, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Read a saved parquet table, checking it has exactly `schema`."""
    if not path.is_file():
        raise OntologyError(f"{path}: missing ontology file")
    try:
        table = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise OntologyError(f"{path}: cannot read parquet ({exc})") from exc
    if dict(table.schema) != schema:
        raise OntologyError(f"{path}: schema {dict(table.schema)}; expected {schema}")
    return table
