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

logger = logging.getLogger(__name__)

CONCEPT_FILE = "CONCEPT.csv"
RELATIONSHIP_FILE = "CONCEPT_RELATIONSHIP.csv"
ANCESTOR_FILE = "CONCEPT_ANCESTOR.csv"

# Columns read from each Athena file, with the dtype they are parsed as.
ATHENA_COLUMNS: dict[str, dict[str, pl.DataType]] = {
    CONCEPT_FILE: {"concept_id": pl.Int64(), "vocabulary_id": pl.String(),
                   "standard_concept": pl.String(), "concept_code": pl.String()},
    RELATIONSHIP_FILE: {"concept_id_1": pl.Int64(), "concept_id_2": pl.Int64(),
                        "relationship_id": pl.String(), "invalid_reason": pl.String()},
    ANCESTOR_FILE: {"ancestor_concept_id": pl.Int64(), "descendant_concept_id": pl.Int64(),
                    "min_levels_of_separation": pl.Int64()},
}

# Concepts whose parents come from the Athena hierarchy rather than from `Maps to`.
HIERARCHICAL_CONCEPTS = ("S", "C")
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


class OntologyError(ValueError):
    """An Athena folder, codes metadata or saved ontology that cannot be used; names the file."""


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


def _require_columns(path: Path, present: list[str]) -> None:
    """Raise OntologyError naming `path` and the first ATHENA_COLUMNS column it lacks."""
    for column in ATHENA_COLUMNS[path.name]:
        if column not in present:
            raise OntologyError(f"{path}: missing column {column!r}; expected tab-separated "
                                f"Athena columns including {sorted(ATHENA_COLUMNS[path.name])}")


def _scan_athena(path: Path) -> pl.LazyFrame:
    """Lazily scan CONCEPT_RELATIONSHIP or CONCEPT_ANCESTOR, selecting its ATHENA_COLUMNS."""
    wanted = ATHENA_COLUMNS[path.name]
    # No quoting (names carry bare quotes) and no inference (other columns stay strings).
    lf = pl.scan_csv(
        path, separator="\t", quote_char=None, infer_schema=False, schema_overrides=wanted,
        encoding="utf8-lossy",
    )
    try:
        present = lf.collect_schema().names()
    except pl.exceptions.PolarsError as exc:
        raise OntologyError(f"{path}: cannot read header ({exc})") from exc
    _require_columns(path, present)
    return lf.select(
        pl.col(c).str.strip_chars_end("\r") if dtype == pl.String() else pl.col(c)
        for c, dtype in wanted.items()
    )


def _scan_concepts(path: Path) -> pl.LazyFrame:
    """Lazily scan CONCEPT.csv as concept_id, vocabulary_id, standard_concept, concept_code, ragged.

    Lines are split by hand because a concept_name may hold a stray tab, which the CSV reader
    would silently shift into the next columns: columns after concept_name are taken counting
    from the end of the line. `ragged` flags lines whose field count differs from the header's.
    """
    with path.open("rb") as handle:
        header = handle.readline().decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")
    names = header.split("\t")
    _require_columns(path, names)
    name_index = names.index("concept_name") if "concept_name" in names else len(names)
    # A separator byte that Athena files never contain, so each line arrives whole.
    lines = pl.scan_csv(
        path, separator="\x1f", quote_char=None, has_header=False, skip_rows=1,
        schema={"line": pl.String()}, encoding="utf8-lossy",
    ).filter(pl.col("line").is_not_null() & (pl.col("line") != ""))
    split = pl.col("line").str.strip_chars_end("\r").str.split("\t")

    def field(column: str) -> pl.Expr:
        index = names.index(column)
        if index > name_index:
            index -= len(names)
        return split.list.get(index, null_on_oob=True).alias(column)

    return lines.select(
        field("concept_id").cast(pl.Int64), field("vocabulary_id"), field("standard_concept"),
        field("concept_code"), ragged=split.list.len() != len(names),
    )


def _collect(lf: pl.LazyFrame, path: Path) -> pl.DataFrame:
    """Collect a scan of `path` with the streaming engine, naming the file on a parse error."""
    try:
        return lf.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        raise OntologyError(f"{path}: cannot parse ({exc})") from exc


def _id_edges_to_codes(id_edges: pl.DataFrame, concepts: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """(child_id, parent_id) rows → (code, parent) rows, and the count of rows with unknown ids."""
    ids = concepts.select("concept_id", "code")
    all_ids = ids["concept_id"].implode()
    known = id_edges["child_id"].is_in(all_ids) & id_edges["parent_id"].is_in(all_ids)
    missing = id_edges.height - int(known.sum())
    edges = (
        id_edges.filter(known)
        .join(ids.rename({"concept_id": "child_id"}), on="child_id")
        .join(ids.rename({"concept_id": "parent_id", "code": "parent"}), on="parent_id")
        .select("code", "parent")
    )
    return edges, missing


def read_athena(athena_dir: Path) -> tuple[pl.Series, pl.DataFrame, int]:
    """Read an Athena folder into (concept codes, parent edges code→parent, missing references).

    Only level-1 ancestor rows and valid `Maps to` rows are collected, so a full download
    (~6M concepts, tens of millions of ancestor rows) stays within a few GB.
    Raises OntologyError naming missing files, missing columns or unparsable values.
    """
    athena_dir = Path(athena_dir)
    missing_files = [name for name in ATHENA_COLUMNS if not (athena_dir / name).is_file()]
    if missing_files:
        raise OntologyError(f"{athena_dir}: missing Athena file(s) {', '.join(missing_files)}")
    concept_path = athena_dir / CONCEPT_FILE
    code = pl.concat_str("vocabulary_id", pl.lit("/"), "concept_code")
    hierarchical = pl.col("standard_concept").is_in(HIERARCHICAL_CONCEPTS).fill_null(False)
    concepts = _collect(
        _scan_concepts(concept_path)
        .select("concept_id", "ragged", code=code, hierarchical=hierarchical)
        .filter(pl.col("concept_id").is_not_null() & pl.col("code").is_not_null()),
        concept_path,
    )
    if ragged := int(concepts["ragged"].sum()):
        logger.warning("%s: %d lines have more or fewer fields than the header (tabs in "
                       "concept_name?); read from both ends of the line", concept_path, ragged)
    ancestor_path = athena_dir / ANCESTOR_FILE
    hierarchy = _collect(
        _scan_athena(ancestor_path)
        .filter(pl.col("min_levels_of_separation") == 1)
        .select(child_id="descendant_concept_id", parent_id="ancestor_concept_id"),
        ancestor_path,
    )
    relationship_path = athena_dir / RELATIONSHIP_FILE
    maps_to = _collect(
        _scan_athena(relationship_path)
        .filter(
            (pl.col("relationship_id") == "Maps to")
            & (pl.col("invalid_reason").fill_null("") == "")
            & (pl.col("concept_id_1") != pl.col("concept_id_2"))
        )
        .select(child_id="concept_id_1", parent_id="concept_id_2"),
        relationship_path,
    )
    # Standard and classification concepts take their parents from the hierarchy alone.
    hierarchical_ids = concepts.filter("hierarchical")["concept_id"].implode()
    maps_to = maps_to.filter(~pl.col("child_id").is_in(hierarchical_ids))
    hierarchy_edges, missing_hierarchy = _id_edges_to_codes(hierarchy, concepts)
    maps_edges, missing_maps = _id_edges_to_codes(maps_to, concepts)
    edges = pl.concat([hierarchy_edges, maps_edges]).unique()
    logger.info("athena: %d concepts, %d level-1 ancestor rows, %d Maps to rows from %s",
                concepts.height, hierarchy.height, maps_to.height, athena_dir)
    return concepts["code"].unique(), edges, missing_hierarchy + missing_maps


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
        if athena_dir is None:
            logger.warning("no Athena vocabulary given; code parents come from codes.parquet alone")
        else:
            athena_codes, edges, missing = read_athena(Path(athena_dir))
            known_parts.append(athena_codes)
        if codes_metadata is not None:
            metadata_codes, metadata_edges = _metadata_edges(codes_metadata)
            known_parts.append(metadata_codes)
            # Non-empty parent_codes in codes.parquet replace that code's Athena parents.
            overridden = metadata_edges["code"].unique().implode()
            edges = pl.concat([edges.filter(~pl.col("code").is_in(overridden)), metadata_edges])
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

    def ancestors_of(self, code: str) -> list[str]:
        """Ancestors of `code` (self excluded), nearest first, ties by name; [] if unknown."""
        rows = self.ancestors.filter((pl.col("code") == code) & (pl.col("depth") > 0))
        return rows.sort("depth", "ancestor")["ancestor"].to_list()

    def parents_of(self, code: str) -> list[str]:
        """Direct parents of `code`, sorted; [] for a root or an unknown code."""
        return self.parents.filter(pl.col("code") == code)["parent"].sort().to_list()

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
