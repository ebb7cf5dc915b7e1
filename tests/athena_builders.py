"""Tiny hand-written Athena folders (raw tab-separated text, quirks included) for the ontology and
Athena reader tests."""

from __future__ import annotations

from pathlib import Path

import polars as pl

CONCEPT_HEADER = [
    "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
    "standard_concept", "concept_code", "valid_start_date", "valid_end_date", "invalid_reason",
]
RELATIONSHIP_HEADER = [
    "concept_id_1", "concept_id_2", "relationship_id", "valid_start_date", "valid_end_date",
    "invalid_reason",
]
ANCESTOR_HEADER = [
    "ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation",
    "max_levels_of_separation",
]

# (concept_id, name, vocabulary, standard_concept, concept_code)
CONCEPTS = [
    (1, "Certain infectious and parasitic diseases", "ICD10CM", "S", "I"),
    (2, "Intestinal infectious diseases", "ICD10CM", "S", "A00-A09"),
    (3, "Cholera", "ICD10CM", "S", "A00"),
    (4, "Cholera due to Vibrio cholerae 01", "ICD10CM", "S", "A00.0"),
    (5, "Typhoid fever", "ICD10CM", "S", "A01"),
    (6, "Neoplasms", "ICD10CM", "S", "II"),
    (10, 'Cholera due to "vibrio" cholerae', "ICD9CM", "", "001.0"),
    (11, "Typhoid fever (old)", "ICD9CM", "", "002.0"),
    (20, "Office visit", "CPT4", "S", "99213"),
    (30, "ASPIRIN tablet [label \"7]", "SPL", "", "abc-123"),
    (40, "aspirin", "RxNorm", "S", "1191"),
    (41, "acetylsalicylic acid", "ATC", "C", "B01AC06"),
    (42, "cisplatin", "RxNorm", "S", "2555"),
    (50, "Cisplatin and etoposide", "HemOnc", "S", "10000"),
    (51, "Platinum regimens", "HemOnc", "C", "9000"),
]
# (concept_id_1, concept_id_2, relationship_id, invalid_reason)
RELATIONSHIPS = [
    (1, 1, "Maps to", ""),
    (4, 4, "Maps to", ""),
    (10, 10, "Maps to", ""),  # a self-map, which must be ignored
    (10, 4, "Maps to", ""),
    (4, 10, "Mapped from", ""),
    (10, 5, "Maps to", "D"),  # an invalid mapping
    (11, 5, "Maps to", ""),
    (20, 3, "Maps to", ""),  # a standard concept's Maps to is not a parent edge
    (30, 40, "Maps to", ""),
    (50, 42, "Has antineoplastic", ""),
]
# (ancestor, descendant, min_levels); self rows at level 0 are added for standard concepts
ANCESTORS = [
    (1, 2, 1), (2, 3, 1), (3, 4, 1), (2, 5, 1), (1, 3, 2), (2, 4, 2), (1, 4, 3), (1, 5, 2),
    (41, 40, 1), (51, 42, 1), (51, 50, 1), (41, 50, 1),
]


def line(fields: list[object]) -> str:
    return "\t".join(str(f) for f in fields)


def write_athena(
    folder: Path,
    concepts: list[tuple[int, str, str, str, str]] = CONCEPTS,
    relationships: list[tuple[int, int, str, str]] = RELATIONSHIPS,
    ancestors: list[tuple[int, int, int]] = ANCESTORS,
    crlf_vocabularies: tuple[str, ...] = ("CPT4",),
) -> Path:
    """Write CONCEPT, CONCEPT_RELATIONSHIP and CONCEPT_ANCESTOR as raw tab-separated text."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [line(CONCEPT_HEADER) + "\n"]
    for concept_id, name, vocabulary, standard, code in concepts:
        fields = [concept_id, name, "Condition", vocabulary, "Code", standard, code,
                  "19700101", "20991231", ""]
        rows.append(line(fields) + ("\r\n" if vocabulary in crlf_vocabularies else "\n"))
    (folder / "CONCEPT.csv").write_bytes("".join(rows).encode())
    rows = [line(RELATIONSHIP_HEADER)]
    rows += [line([a, b, rel, "19700101", "20991231", invalid])
             for a, b, rel, invalid in relationships]
    # The last relationship row ends in CRLF too.
    (folder / "CONCEPT_RELATIONSHIP.csv").write_bytes(("\n".join(rows) + "\r\n").encode())
    standard = [c[0] for c in concepts if c[3] in ("S", "C")]
    rows = [line(ANCESTOR_HEADER)]
    rows += [line([c, c, 0, 0]) for c in standard]
    rows += [line([a, d, level, level]) for a, d, level in ancestors]
    (folder / "CONCEPT_ANCESTOR.csv").write_bytes(("\n".join(rows) + "\n").encode())
    return folder


def codes_metadata(parents: dict[str, list[str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"code": list(parents), "description": [None] * len(parents),
         "parent_codes": list(parents.values())},
        schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)},
    )
