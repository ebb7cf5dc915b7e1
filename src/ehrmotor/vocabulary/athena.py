"""Reading an OHDSI Athena vocabulary download (CONCEPT, CONCEPT_RELATIONSHIP, CONCEPT_ANCESTOR).

The files are tab-separated with the real download's quirks (bare `"` in names, CRLF rows). Each is
checked as it is read, with one-line errors naming the file and line: truncated rows (a cut
download), non-integer or duplicate concept ids; a file with only its header is a warning (an
empty vocabulary). `read_athena` returns the concept codes and the parent edges the ontology is
built from (see `ehrmotor.vocabulary.ontology`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from ehrmotor.errors import OntologyError, cut, first_line

logger = logging.getLogger(__name__)

CONCEPT_FILE = "CONCEPT.csv"
RELATIONSHIP_FILE = "CONCEPT_RELATIONSHIP.csv"
ANCESTOR_FILE = "CONCEPT_ANCESTOR.csv"
# What the lossy UTF-8 reader puts in place of bytes that are not UTF-8.
REPLACEMENT = "\ufffd"
# Concepts whose parents come from the Athena hierarchy rather than from `Maps to`.
HIERARCHICAL_CONCEPTS = ("S", "C")

# Columns read from each Athena file, with the dtype they are parsed as.
ATHENA_COLUMNS: dict[str, dict[str, pl.DataType]] = {
    CONCEPT_FILE: {"concept_id": pl.Int64(), "vocabulary_id": pl.String(),
                   "standard_concept": pl.String(), "concept_code": pl.String()},
    RELATIONSHIP_FILE: {"concept_id_1": pl.Int64(), "concept_id_2": pl.Int64(),
                        "relationship_id": pl.String(), "invalid_reason": pl.String()},
    ANCESTOR_FILE: {"ancestor_concept_id": pl.Int64(), "descendant_concept_id": pl.Int64(),
                    "min_levels_of_separation": pl.Int64()},
}


def _require_columns(path: Path, present: list[str]) -> None:
    """Raise OntologyError naming `path` and the first ATHENA_COLUMNS column it lacks."""
    for column in ATHENA_COLUMNS[path.name]:
        if column not in present:
            raise OntologyError(f"{path}: missing column {column!r}; expected tab-separated "
                                f"Athena columns including {sorted(ATHENA_COLUMNS[path.name])}")


def _scan_athena(path: Path) -> pl.LazyFrame:
    """Lazily scan CONCEPT_RELATIONSHIP or CONCEPT_ANCESTOR: its ATHENA_COLUMNS and `line`.

    `line` is the 1-based file line (the header is line 1). Raises OntologyError for a missing
    column or a truncated last line; logs a warning when the file has no rows.
    """
    wanted = ATHENA_COLUMNS[path.name]
    # No quoting (names carry bare quotes) and no inference (other columns stay strings).
    lf = pl.scan_csv(
        path, separator="\t", quote_char=None, infer_schema=False, schema_overrides=wanted,
        encoding="utf8-lossy",
    )
    try:
        present = lf.collect_schema().names()
    except pl.exceptions.PolarsError as exc:
        raise OntologyError(f"{path}: cannot read header ({first_line(exc)})") from exc
    _require_columns(path, present)
    if _has_rows(path):
        _check_last_line(path, len(present))
    # The reader keeps blank lines as null rows, so row index + 2 is the file line.
    return lf.with_row_index("line", offset=2).select(
        "line",
        *(pl.col(c).str.strip_chars_end("\r") if dtype == pl.String() else pl.col(c)
          for c, dtype in wanted.items()),
    )



def _has_rows(path: Path) -> bool:
    """False, with a logged warning, when `path` holds nothing but its header (and blank lines)."""
    with path.open("rb") as handle:
        handle.readline()
        # Reading a bounded block keeps this O(1) on multi-GB files; blank padding is rare.
        if handle.read(1 << 16).strip():
            return True
    _warn_empty(path)
    return False


def _warn_empty(path: Path) -> None:
    """Log that an Athena file has no rows: the build goes on, but without what it would give."""
    logger.warning("%s: empty vocabulary (only a header line); it contributes no %s", path,
                   "concepts" if path.name == CONCEPT_FILE else "parent edges")


def _check_last_line(path: Path, num_fields: int) -> None:
    """Raise OntologyError when the file's last line has fewer fields than its header.

    A download cut mid-row ends that way, and its cut value (an id missing digits) would read
    as a different concept. Only the end of the file is read; counting lines, to name the bad
    one, happens only when it is truncated.
    """
    size = path.stat().st_size
    start = max(0, size - (1 << 16))
    with path.open("rb") as handle:
        handle.seek(start)
        tail = handle.read().rstrip(b"\r\n")
    cut = tail.rfind(b"\n") + 1
    if cut == 0 and start > 0:
        return  # a last line longer than the block read: not an Athena row, leave it to the parser
    fields = tail[cut:].count(b"\t") + 1
    if fields >= num_fields:
        return
    line = _count_newlines(path, start + cut) + 1
    raise OntologyError(
        f"{path}: line {line}: last line has {fields} of the header's {num_fields} tab-separated "
        "fields (truncated download?); expected complete rows"
    )


def _count_newlines(path: Path, end: int) -> int:
    """Number of newline bytes in the first `end` bytes of `path`, read in 16 MiB blocks."""
    count = 0
    with path.open("rb") as handle:
        while end > 0:
            block = handle.read(min(end, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            end -= len(block)
    return count


def _scan_concepts(path: Path) -> tuple[pl.LazyFrame, int]:
    """Lazily scan CONCEPT.csv as line, concept_id, id_text, vocabulary_id, standard_concept,
    concept_code, fields; also return the header's field count.

    Lines are split by hand because a concept_name may hold a stray tab, which the CSV reader
    would silently shift into the next columns: columns after concept_name are taken counting
    from the end of the line. `line` is the 1-based file line (header = 1), `fields` the line's
    field count, and `id_text` the raw concept_id where it is not an integer (else null).
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
    ).with_row_index("number", offset=2).filter(
        pl.col("line").is_not_null() & (pl.col("line").str.strip_chars_end("\r") != "")
    )
    split = pl.col("line").str.strip_chars_end("\r").str.split("\t")

    def field(column: str) -> pl.Expr:
        index = names.index(column)
        if index > name_index:
            index -= len(names)
        return split.list.get(index, null_on_oob=True).alias(column)

    concept_id = field("concept_id").cast(pl.Int64, strict=False)
    return lines.select(
        pl.col("number").alias("line"), concept_id,
        id_text=pl.when(concept_id.is_null()).then(field("concept_id")),
        vocabulary_id=field("vocabulary_id"), standard_concept=field("standard_concept"),
        concept_code=field("concept_code"), fields=split.list.len(),
        # The lossy reader puts U+FFFD where bytes are not UTF-8 (a Latin-1 export, say).
        not_utf8=pl.col("line").str.contains(REPLACEMENT, literal=True),
    ), len(names)


def _check_concepts(path: Path, concepts: pl.DataFrame, header_fields: int) -> None:
    """Raise OntologyError naming the first short line, non-integer id or duplicate concept_id.

    A line with fewer fields than the header is a cut row (a truncated download): its columns
    counted from the end are wrong, giving bogus concepts such as `Drug/`. More fields are a
    tab inside concept_name, handled by reading from both ends, and only warned about.
    """
    short = concepts.filter(pl.col("fields") < header_fields)
    if short.height:
        row = short.row(0, named=True)
        raise OntologyError(
            f"{path}: line {row['line']}: {row['fields']} of the header's {header_fields} "
            f"tab-separated fields ({short.height} such line(s); truncated download?); "
            "expected complete rows"
        )
    bad = concepts.filter(pl.col("concept_id").is_null())
    if bad.height:
        row = bad.row(0, named=True)
        raise OntologyError(
            f"{path}: line {row['line']}, column 'concept_id': {cut(row['id_text'])!r} is not an "
            f"integer ({bad.height} such line(s)); expected integer concept ids"
        )
    repeated = (
        concepts.select("line", "concept_id")
        .with_columns(first=pl.col("line").min().over("concept_id"))
        .filter(pl.col("line") != pl.col("first"))
    )
    if repeated.height:
        row = repeated.sort("line").row(0, named=True)
        raise OntologyError(
            f"{path}: line {row['line']}, column 'concept_id': concept_id {row['concept_id']} "
            f"is also on line {row['first']} ({repeated.height} repeated line(s)); expected "
            "each concept_id once"
        )
    _warn_not_utf8(path, concepts)
    more = int((concepts["fields"] > header_fields).sum())
    if more:
        logger.warning("%s: %d lines have more fields than the header (tabs in concept_name?); "
                       "read from both ends of the line", path, more)


def _warn_not_utf8(path: Path, concepts: pl.DataFrame) -> None:
    """Warn, naming the first line, when lines of CONCEPT.csv are not valid UTF-8.

    They are read with U+FFFD in place of each bad byte: harmless in concept_name (not used),
    but a concept_code or vocabulary_id so read matches no data code.
    """
    bad = concepts.filter("not_utf8")
    if not bad.height:
        return
    in_code = bad.filter(pl.col("code").str.contains(REPLACEMENT, literal=True)).height
    logger.warning("%s: line %d: %d line(s) are not valid UTF-8 (Latin-1?); they are read with "
                   "U+FFFD in place of each bad byte, %d of them in the code (vocabulary_id/"
                   "concept_code), which then matches no data code; re-encode the file as "
                   "UTF-8 (iconv -f latin1 -t utf-8)", path, bad["line"].min(), bad.height,
                   in_code)


def _collect(lf: pl.LazyFrame, path: Path) -> pl.DataFrame:
    """Collect a scan of `path` with the streaming engine, naming the file on a parse error.

    A value the reader cannot parse as an integer is located (column and line) by a second,
    string-typed scan, which only runs on that error path.
    """
    try:
        return lf.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        located = _locate_non_integer(path)
        raise OntologyError(located or f"{path}: cannot parse ({first_line(exc)})") from exc


def _locate_non_integer(path: Path) -> str | None:
    """Message naming the first line and column of `path` whose integer column is not one."""
    columns = [c for c, dtype in ATHENA_COLUMNS[path.name].items() if dtype == pl.Int64()]
    if path.name == CONCEPT_FILE or not columns:
        return None  # CONCEPT.csv ids are checked in `_check_concepts`
    value = {c: pl.col(c).str.strip_chars_end("\r") for c in columns}
    fails = {c: value[c].is_not_null() & value[c].cast(pl.Int64, strict=False).is_null()
             for c in columns}
    try:
        found = (
            pl.scan_csv(path, separator="\t", quote_char=None, infer_schema=False,
                        encoding="utf8-lossy")
            .with_row_index("line", offset=2)
            .filter(pl.any_horizontal(*fails.values()))
            .select("line", *columns, *(f.alias(f"{c}_bad") for c, f in fails.items()))
            .head(1)
            .collect(engine="streaming")
        )
    except pl.exceptions.PolarsError:
        return None
    if not found.height:
        return None
    row = found.row(0, named=True)
    column = next(c for c in columns if row[f"{c}_bad"])
    return (f"{path}: line {row['line']}, column {column!r}: {cut(row[column])!r} is not an "
            "integer; expected integer concept ids and levels")


def _check_ids_present(path: Path, frame: pl.DataFrame, columns: dict[str, str]) -> pl.DataFrame:
    """Raise OntologyError naming the first kept row of `path` with an empty id; else drop `line`.

    `columns` maps each id column of `frame` to its name in the file.
    """
    for column, name in columns.items():
        empty = frame.filter(pl.col(column).is_null())
        if empty.height:
            line = empty.select(pl.col("line").min()).item()
            raise OntologyError(
                f"{path}: line {line}, column {name!r}: empty concept id "
                f"({empty.height} such row(s)); expected integer concept ids"
            )
    return frame.drop("line")


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
    Raises OntologyError naming missing files or columns, or the file line of a truncated row,
    a non-integer or empty id, or a repeated concept_id. A header-only file is only warned about.
    """
    athena_dir = Path(athena_dir)
    missing_files = [name for name in ATHENA_COLUMNS if not (athena_dir / name).is_file()]
    if missing_files:
        raise OntologyError(f"{athena_dir}: missing Athena file(s) {', '.join(missing_files)}")
    concept_path = athena_dir / CONCEPT_FILE
    code = pl.concat_str("vocabulary_id", pl.lit("/"), "concept_code")
    hierarchical = pl.col("standard_concept").is_in(HIERARCHICAL_CONCEPTS).fill_null(False)
    concept_scan, header_fields = _scan_concepts(concept_path)
    concepts = _collect(
        concept_scan.select(
            "line", "concept_id", "id_text", "fields", "not_utf8", code=code,
            hierarchical=hierarchical
        ),
        concept_path,
    )
    _check_concepts(concept_path, concepts, header_fields)
    if not concepts.height:
        _warn_empty(concept_path)
    concepts = concepts.select("concept_id", "code", "hierarchical")
    ancestor_path = athena_dir / ANCESTOR_FILE
    hierarchy = _collect(
        _scan_athena(ancestor_path)
        .filter(pl.col("min_levels_of_separation") == 1)
        .select("line", child_id="descendant_concept_id", parent_id="ancestor_concept_id"),
        ancestor_path,
    )
    hierarchy = _check_ids_present(ancestor_path, hierarchy, {
        "child_id": "descendant_concept_id", "parent_id": "ancestor_concept_id"})
    relationship_path = athena_dir / RELATIONSHIP_FILE
    maps_to = _collect(
        _scan_athena(relationship_path)
        .filter(
            (pl.col("relationship_id") == "Maps to")
            & (pl.col("invalid_reason").fill_null("") == "")
            # ne_missing: a row with an empty id must reach the check below, not vanish here.
            & pl.col("concept_id_1").ne_missing(pl.col("concept_id_2"))
        )
        .select("line", child_id="concept_id_1", parent_id="concept_id_2"),
        relationship_path,
    )
    maps_to = _check_ids_present(relationship_path, maps_to, {
        "child_id": "concept_id_1", "parent_id": "concept_id_2"})
    # Standard and classification concepts take their parents from the hierarchy alone.
    hierarchical_ids = concepts.filter("hierarchical")["concept_id"].implode()
    maps_to = maps_to.filter(~pl.col("child_id").is_in(hierarchical_ids))
    hierarchy_edges, missing_hierarchy = _id_edges_to_codes(hierarchy, concepts)
    maps_edges, missing_maps = _id_edges_to_codes(maps_to, concepts)
    edges = pl.concat([hierarchy_edges, maps_edges]).unique()
    logger.info("athena: %d concepts, %d level-1 ancestor rows, %d Maps to rows from %s",
                concepts.height, hierarchy.height, maps_to.height, athena_dir)
    return concepts["code"].unique(), edges, missing_hierarchy + missing_maps
