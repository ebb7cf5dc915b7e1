"""Write the catalogue as an OHDSI Athena vocabulary download, quirks included.

Files (tab-separated despite `.csv`, header row, dates `YYYYMMDD`, no quoting):
- `CONCEPT.csv`: every concept; some names carry a bare `"`; CPT4 rows end in CRLF.
- `CONCEPT_RELATIONSHIP.csv`: `Is a`/`Subsumes`, `Maps to`/`Mapped from` (standard concepts also
  map to themselves, as in the real download), `Has antineoplastic`/`Antineoplastic of`.
- `CONCEPT_ANCESTOR.csv`: the transitive closure of `Is a` over standard and classification
  concepts, with self rows at level 0. Non-standard concepts (ICD9CM, SPL) have no rows here and
  reach the hierarchy only through `Maps to`.
Every concept id that the relationship and ancestor files mention exists in `CONCEPT.csv`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ehrmotor.synthetic.catalog import Catalog

VALID_START = "19700101"
VALID_END = "20991231"
REVERSE = {"Is a": "Subsumes", "Maps to": "Mapped from", "Has antineoplastic": "Antineoplastic of"}
MAX_DEPTH = 12


def _concept_lines(concepts: pl.DataFrame) -> pl.Series:
    columns = [
        pl.col("concept_id").cast(pl.String), "concept_name", "domain_id", "vocabulary_id",
        "concept_class_id", "standard_concept", "concept_code",
        pl.lit(VALID_START), pl.lit(VALID_END), pl.lit(""),
    ]
    line = pl.concat_str(columns, separator="\t")
    crlf = pl.when(pl.col("vocabulary_id") == "CPT4").then(pl.lit("\r")).otherwise(pl.lit(""))
    return concepts.select(line=line + crlf)["line"]


def _relationships(catalog: Catalog) -> pl.DataFrame:
    ids = catalog.concepts.select("code", "concept_id")
    edges = (
        catalog.edges.join(ids.rename({"code": "child", "concept_id": "concept_id_1"}), on="child")
        .join(ids.rename({"code": "parent", "concept_id": "concept_id_2"}), on="parent")
        .select("concept_id_1", "concept_id_2", relationship_id="relationship")
    )
    reverse = edges.select(
        concept_id_1="concept_id_2", concept_id_2="concept_id_1",
        relationship_id=pl.col("relationship_id").replace_strict(REVERSE),
    )
    standard = catalog.concepts.filter(pl.col("standard_concept") == "S")
    self_maps = standard.select(
        concept_id_1="concept_id", concept_id_2="concept_id", relationship_id=pl.lit("Maps to")
    )
    return pl.concat([edges, reverse, self_maps]).sort(
        "concept_id_1", "relationship_id", "concept_id_2"
    ).with_columns(
        valid_start_date=pl.lit(VALID_START), valid_end_date=pl.lit(VALID_END),
        invalid_reason=pl.lit(""),
    )


def ancestor_closure(catalog: Catalog) -> pl.DataFrame:
    """All (ancestor, descendant, levels) pairs of the `Is a` hierarchy, self rows included."""
    hierarchical = catalog.concepts.filter(pl.col("standard_concept").is_in(["S", "C"]))
    ids = hierarchical.select("code", "concept_id")
    parents = (
        catalog.edges.filter(pl.col("relationship") == "Is a")
        .join(ids.rename({"code": "child", "concept_id": "descendant"}), on="child")
        .join(ids.rename({"code": "parent", "concept_id": "ancestor"}), on="parent")
        .select("descendant", "ancestor")
    )
    level = hierarchical.select(descendant="concept_id", ancestor="concept_id", level=pl.lit(0))
    found = [level]
    for depth in range(1, MAX_DEPTH + 1):
        level = (
            level.select("descendant", child="ancestor")
            .join(parents.rename({"descendant": "child"}), on="child")
            .select("descendant", "ancestor", level=pl.lit(depth))
        )
        if level.height == 0:
            break
        found.append(level)
    return (
        pl.concat(found)
        .group_by("ancestor", "descendant")
        .agg(min_levels_of_separation=pl.col("level").min(),
             max_levels_of_separation=pl.col("level").max())
        .sort("descendant", "min_levels_of_separation", "ancestor")
        .rename({"ancestor": "ancestor_concept_id", "descendant": "descendant_concept_id"})
    )


def write_athena(catalog: Catalog, out_dir: Path) -> None:
    """Write CONCEPT, CONCEPT_RELATIONSHIP and CONCEPT_ANCESTOR into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "\t".join([
        "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
        "standard_concept", "concept_code", "valid_start_date", "valid_end_date", "invalid_reason",
    ])
    lines = _concept_lines(catalog.concepts).to_list()
    (out_dir / "CONCEPT.csv").write_bytes(("\n".join([header, *lines]) + "\n").encode())
    _relationships(catalog).write_csv(
        out_dir / "CONCEPT_RELATIONSHIP.csv", separator="\t", quote_style="never"
    )
    ancestor_closure(catalog).write_csv(
        out_dir / "CONCEPT_ANCESTOR.csv", separator="\t", quote_style="never"
    )
