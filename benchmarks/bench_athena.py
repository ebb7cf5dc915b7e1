"""Ontology and tokenizer steps of `ehrmotor prepare` on an Athena vocabulary of real size.

    python benchmarks/bench_athena.py [--out /tmp/athena_bench] [--concepts 5200000] [--workers 2]

Generates once, and reuses while its stamp matches (`--regenerate` forces it), in OUT:
- `meds/`: what `ehrmotor synth --subjects 10000 --seed 0` writes, whose codes live in its own
  small Athena folder `meds/athena/`;
- `athena/`: a seeded filler vocabulary of `--concepts` concepts (several vocabularies: standard
  DAG hierarchies up to 12 levels deep, a classification, non-standard ones reaching them by
  `Maps to`), ~11 CONCEPT_ANCESTOR rows per concept incl. self, `Is a`/`Subsumes` rows for every
  direct edge, with the synthetic vocabulary's rows appended and its condition/procedure roots
  hung deep in the filler SNOMED, so the data's codes reach filler ancestors.
Then it runs the ontology, split and tokenizer steps (the functions `ehrmotor prepare` runs) in a
fresh work folder, printing seconds per step, those spent fingerprinting the inputs first (as
`prepare` does; not in the steps) and the peak RSS of the whole process tree.
Target (issue 11): ontology + tokenizer <= 2 minutes and <= 4 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from memory import PeakMemory  # noqa: E402

from ehrmotor import artifacts  # noqa: E402
from ehrmotor.config import PrepareConfig  # noqa: E402
from ehrmotor.meds import data_files  # noqa: E402
from ehrmotor.prepare.shard_jobs import ShardJob  # noqa: E402
from ehrmotor.prepare.steps import StepContext, ontology_step, split_step, tokenizer_step  # noqa
from ehrmotor.processes import process_pool  # noqa: E402
from ehrmotor.synthetic import generate  # noqa: E402
from ehrmotor.vocabulary.athena import ANCESTOR_FILE, CONCEPT_FILE, RELATIONSHIP_FILE  # noqa: E402
from ehrmotor.vocabulary.ontology import Ontology  # noqa: E402

GENERATOR_VERSION = 1
STAMP = "filler.json"
SUBJECTS = 10_000
# Children per closure join: bounds the generator's memory on the widest level.
CHUNK = 200_000
# The synthetic condition and procedure roots get a parent deep in the filler SNOMED. (Only roots:
# the synthetic codes.parquet names the other codes' parents, which replace Athena's.)
LINK_VOCABULARY, LINK_LEVEL, LINK_DOMAINS = "SNOMED", 8, ("Condition", "Procedure")
COLUMNS = {
    CONCEPT_FILE: ["concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
                   "standard_concept", "concept_code", "valid_start_date", "valid_end_date",
                   "invalid_reason"],
    RELATIONSHIP_FILE: ["concept_id_1", "concept_id_2", "relationship_id", "valid_start_date",
                        "valid_end_date", "invalid_reason"],
    ANCESTOR_FILE: ["ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation",
                    "max_levels_of_separation"],
}


class Vocabulary(NamedTuple):
    """One filler vocabulary: `share` of the concepts; hierarchical ones have `depth` levels
    growing by `growth`, and a second parent on a `second_parent` share of non-root concepts;
    non-standard ones (`standard` "") map to random concepts of `maps_to`."""

    name: str
    domain: str
    concept_class: str
    standard: str
    share: float
    depth: int = 1
    growth: float = 1.0
    second_parent: float = 0.0
    maps_to: str = ""


VOCABULARIES = (
    Vocabulary("SNOMED", "Condition", "Clinical Finding", "S", 0.38, 12, 2.6, 0.12),
    Vocabulary("RxNorm Extension", "Drug", "Clinical Drug", "S", 0.22, 8, 3.5, 0.1),
    Vocabulary("OMOP Genomic", "Measurement", "Genetic Variation", "S", 0.06, 6, 4.0),
    Vocabulary("NDFRT", "Drug", "Pharmacologic Class", "C", 0.04, 7, 3.0, 0.2),
    Vocabulary("NDC", "Drug", "11-digit NDC", "", 0.18, maps_to="RxNorm Extension"),
    Vocabulary("Read", "Condition", "Read", "", 0.08, maps_to="SNOMED"),
    Vocabulary("MedDRA", "Condition", "LLT", "", 0.04, maps_to="SNOMED"),
)


def _level_sizes(count: int, depth: int, growth: float) -> np.ndarray:
    """Concepts per level (root level first), growing geometrically, summing to `count`."""
    weights = growth ** np.arange(depth, dtype=np.float64)
    sizes = np.maximum(1, np.floor(count * weights / weights.sum())).astype(np.int64)
    sizes[-1] += count - sizes.sum()
    return sizes


def _parent_edges(starts: np.ndarray, sizes: np.ndarray, second: float,
                  rng: np.random.Generator) -> list[pl.DataFrame]:
    """Per level (from level 1): (child, parent) local indices, a random parent on the level
    above for every concept and a second one for a `second` share of them."""
    levels = []
    for level in range(1, len(sizes)):  # one iteration per hierarchy level
        children = np.arange(starts[level], starts[level] + sizes[level])
        first = starts[level - 1] + rng.integers(0, sizes[level - 1], sizes[level])
        extra = rng.random(sizes[level]) < second
        other = starts[level - 1] + rng.integers(0, sizes[level - 1], int(extra.sum()))
        keep = other != first[extra]
        levels.append(pl.DataFrame({
            "child": np.concatenate([children, children[extra][keep]]),
            "parent": np.concatenate([first, other[keep]]),
        }, schema={"child": pl.Int32, "parent": pl.Int32}))
    return levels


def _closure(levels: list[pl.DataFrame], roots: np.ndarray) -> Iterator[pl.DataFrame]:
    """CONCEPT_ANCESTOR rows (descendant, ancestor, min_level, max_level) of one hierarchy, incl.
    self rows, level by level in chunks of children, each chunk sorted."""
    def own(ids: pl.Series) -> pl.DataFrame:
        return ids.to_frame("descendant").with_columns(
            ancestor="descendant", min_level=pl.lit(0, pl.Int16), max_level=pl.lit(0, pl.Int16))

    above = own(pl.Series(roots.astype(np.int32)))
    yield above
    for edges in levels:  # one iteration per hierarchy level
        children = edges["child"].unique().sort()
        parts = []
        for start in range(0, children.len(), CHUNK):  # one iteration per chunk of children
            chunk = children.slice(start, CHUNK)
            inherited = (
                edges.filter(pl.col("child").is_in(chunk.implode()))
                .join(above, left_on="parent", right_on="descendant")
                .group_by("child", "ancestor")
                .agg(pl.col("min_level").min() + 1, pl.col("max_level").max() + 1)
                .rename({"child": "descendant"})
            )
            part = pl.concat([own(chunk), inherited]).sort("descendant", "min_level", "ancestor")
            parts.append(part)
            yield part
        above = pl.concat(parts)


def _concepts(vocabulary: Vocabulary, first: int, count: int) -> pl.DataFrame:
    """CONCEPT rows (without concept_id) of one vocabulary, local index `first` onwards."""
    index = pl.int_range(first, first + count, dtype=pl.Int64, eager=True)
    code = (index - first + 1000).cast(pl.String).str.zfill(8)
    # Real names carry bare quotes now and then; the reader must not treat them as quoting.
    quirk = pl.when(index % 997 == 0).then(pl.lit(' 5" tube')).otherwise(pl.lit(""))
    return pl.DataFrame({"index": index, "concept_code": code}).with_columns(
        concept_name=pl.concat_str(pl.lit(f"{vocabulary.name} {vocabulary.concept_class} "),
                                   "concept_code", quirk),
        domain_id=pl.lit(vocabulary.domain), vocabulary_id=pl.lit(vocabulary.name),
        concept_class_id=pl.lit(vocabulary.concept_class),
        standard_concept=pl.lit(vocabulary.standard or None, pl.String),
        valid_start_date=pl.lit("19700101"), valid_end_date=pl.lit("20991231"),
        invalid_reason=pl.lit(None, pl.String),
    )


def _relationships(pairs: pl.DataFrame, forward: str, backward: str = "") -> pl.DataFrame:
    """CONCEPT_RELATIONSHIP rows for (concept_id_1, concept_id_2) `pairs`, and the reverse rows
    when `backward` names their relationship."""
    rows = pairs.with_columns(relationship_id=pl.lit(forward))
    if backward:
        back = pairs.select(concept_id_1="concept_id_2", concept_id_2="concept_id_1")
        rows = pl.concat([rows, back.with_columns(relationship_id=pl.lit(backward))])
    return rows.with_columns(valid_start_date=pl.lit("19700101"),
                             valid_end_date=pl.lit("20991231"),
                             invalid_reason=pl.lit(None, pl.String))


class Filler:
    """Writes the filler vocabulary into an open set of Athena files."""

    def __init__(self, files: dict[str, IO[bytes]], total: int, seed: int) -> None:
        self.files = files
        self.rng = np.random.default_rng(seed)
        # Shuffled, spread-out ids (< 2^31, below the synthetic vocabulary's 2,000,000,001+).
        self.ids = self.rng.permutation(total).astype(np.int64) * 9 + 1 + self.rng.integers(
            0, 9, total)
        self.ranges: dict[str, tuple[int, int]] = {}
        self.levels: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # starts, sizes
        self.link_closure = pl.DataFrame()  # rows of LINK_VOCABULARY's LINK_LEVEL concepts
        self.rows = {CONCEPT_FILE: 0, RELATIONSHIP_FILE: 0, ANCESTOR_FILE: 0}

    def concept_ids(self, local: pl.Expr) -> pl.Expr:
        return local.map_batches(lambda s: pl.Series(self.ids[s.to_numpy()]), pl.Int64)

    def emit(self, frame: pl.DataFrame, name: str) -> None:
        """Append `frame`'s rows to an Athena file (tab-separated, no quoting, empty for null)."""
        frame.select(COLUMNS[name]).write_csv(self.files[name], separator="\t",
                                              quote_style="never", include_header=False)
        self.rows[name] += frame.height

    def vocabulary(self, vocabulary: Vocabulary, first: int, count: int) -> None:
        """Write one vocabulary's concepts, hierarchy (or mappings) and relationships."""
        self.ranges[vocabulary.name] = (first, count)
        self.emit(_concepts(vocabulary, first, count).with_columns(
            concept_id=self.concept_ids(pl.col("index"))), CONCEPT_FILE)
        if vocabulary.maps_to:
            self.mappings(vocabulary, first, count)
            return
        sizes = _level_sizes(count, vocabulary.depth, vocabulary.growth)
        starts = first + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.levels[vocabulary.name] = (starts, sizes)
        edges = _parent_edges(starts, sizes, vocabulary.second_parent, self.rng)
        for level in edges:  # one iteration per hierarchy level
            pairs = level.select(concept_id_1=self.concept_ids(pl.col("child")),
                                 concept_id_2=self.concept_ids(pl.col("parent")))
            self.emit(_relationships(pairs, "Is a", "Subsumes"), RELATIONSHIP_FILE)
        own = self.ids[first:first + count]  # standard concepts map to themselves
        self.emit(_relationships(pl.DataFrame({"concept_id_1": own, "concept_id_2": own}),
                                 "Maps to"), RELATIONSHIP_FILE)
        kept = []
        for part in _closure(edges, np.arange(starts[0], starts[0] + sizes[0])):
            if vocabulary.name == LINK_VOCABULARY and part["descendant"].min() >= starts[
                    LINK_LEVEL] and part["descendant"].max() < starts[LINK_LEVEL + 1]:
                kept.append(part)
            self.emit(part.select(ancestor_concept_id=self.concept_ids(pl.col("ancestor")),
                                  descendant_concept_id=self.concept_ids(pl.col("descendant")),
                                  min_levels_of_separation="min_level",
                                  max_levels_of_separation="max_level"), ANCESTOR_FILE)
        if kept:
            self.link_closure = pl.concat(kept)

    def mappings(self, vocabulary: Vocabulary, first: int, count: int) -> None:
        """`Maps to`/`Mapped from` rows to random concepts of the target vocabulary; 2% also keep
        a deprecated (`invalid_reason` D) `Maps to` row to another one."""
        target_first, target_count = self.ranges[vocabulary.maps_to]
        local = np.arange(first, first + count)
        target = target_first + self.rng.integers(0, target_count, count)
        pairs = pl.DataFrame({"concept_id_1": self.ids[local], "concept_id_2": self.ids[target]})
        self.emit(_relationships(pairs, "Maps to", "Mapped from"), RELATIONSHIP_FILE)
        stale = self.rng.random(count) < 0.02
        old = target_first + self.rng.integers(0, target_count, int(stale.sum()))
        deprecated = pl.DataFrame({"concept_id_1": self.ids[local[stale]],
                                   "concept_id_2": self.ids[old]})
        self.emit(_relationships(deprecated, "Maps to").with_columns(invalid_reason=pl.lit("D")),
                  RELATIONSHIP_FILE)

    def link(self, synthetic: Path) -> None:
        """Give the synthetic vocabulary's standard condition/procedure roots a random LINK_LEVEL
        parent: `Is a`/`Subsumes` rows and the ancestor rows that follow for their subtrees."""
        concepts = pl.read_csv(synthetic / CONCEPT_FILE, separator="\t", quote_char=None,
                               columns=["concept_id", "domain_id", "standard_concept"])
        ancestors = pl.read_csv(synthetic / ANCESTOR_FILE, separator="\t", quote_char=None,
                                schema_overrides={c: pl.Int64 for c in COLUMNS[ANCESTOR_FILE]})
        has_parent = ancestors.filter(pl.col("min_levels_of_separation") == 1)
        linked = concepts.filter(
            pl.col("domain_id").is_in(LINK_DOMAINS) & pl.col("standard_concept").is_in(["S", "C"])
            & pl.col("concept_id").is_in(ancestors["descendant_concept_id"].implode())
            & ~pl.col("concept_id").is_in(has_parent["descendant_concept_id"].implode())
        )["concept_id"].sort()
        starts, sizes = self.levels[LINK_VOCABULARY]
        target = starts[LINK_LEVEL] + self.rng.integers(0, sizes[LINK_LEVEL], linked.len())
        links = pl.DataFrame({"root": linked, "target": target.astype(np.int32)})
        self.emit(_relationships(links.select(concept_id_1="root", concept_id_2=self.concept_ids(
            pl.col("target"))), "Is a", "Subsumes"), RELATIONSHIP_FILE)
        inherited = (
            ancestors.join(links, left_on="ancestor_concept_id", right_on="root")
            .join(self.link_closure, left_on="target", right_on="descendant")
            .group_by("descendant_concept_id", "ancestor")
            .agg((pl.col("min_levels_of_separation") + pl.col("min_level") + 1).min(),
                 (pl.col("max_levels_of_separation") + pl.col("max_level") + 1).max())
            .sort("descendant_concept_id", "min_levels_of_separation", "ancestor")
        )
        self.emit(inherited.with_columns(ancestor_concept_id=self.concept_ids(pl.col("ancestor"))),
                  ANCESTOR_FILE)


def _append_rows(source: Path, handle: IO[bytes]) -> int:
    """Append `source`'s rows (all but its header) to `handle`; return how many."""
    with source.open("rb") as rows:
        rows.readline()
        block = rows.read()
    if block and not block.endswith(b"\n"):
        block += b"\n"
    handle.write(block)
    return block.count(b"\n")


def write_vocabulary(out: Path, synthetic: Path, concepts: int, seed: int) -> dict[str, int]:
    """Write the filler vocabulary plus `synthetic`'s rows into `out` (replaced); rows per file."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = np.floor(concepts * np.array([v.share for v in VOCABULARIES])).astype(np.int64)
    counts[0] += concepts - counts.sum()
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    with ExitStack() as stack:
        files = {name: stack.enter_context((tmp / name).open("wb")) for name in COLUMNS}
        for name, handle in files.items():
            handle.write(("\t".join(COLUMNS[name]) + "\n").encode())
        filler = Filler(files, concepts, seed)
        for vocabulary, first, count in zip(VOCABULARIES, firsts, counts, strict=True):
            filler.vocabulary(vocabulary, int(first), int(count))
        filler.link(synthetic)
        for name, handle in files.items():
            filler.rows[name] += _append_rows(synthetic / name, handle)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return filler.rows


def prepare_inputs(out: Path, concepts: int, seed: int, regenerate: bool) -> dict[str, Any]:
    """The synthetic MEDS data and the filler vocabulary under `out`, generated when missing or
    stale; returns the vocabulary's stamp (parameters, rows per file, generation seconds)."""
    meds, athena = out / "meds", out / "athena"
    if regenerate or not (meds / "metadata" / "synthetic.json").is_file():
        generate(meds, SUBJECTS, seed=0, force=True, progress=False)
    wanted = {"generator": GENERATOR_VERSION, "concepts": concepts, "seed": seed,
              "synthetic": artifacts.fingerprint_files(
                  [meds / "athena" / name for name in COLUMNS], meds / "athena")}
    stamp_path = athena / STAMP
    if not regenerate and stamp_path.is_file():
        stamp: dict[str, Any] = json.loads(stamp_path.read_text())
        if {key: stamp.get(key) for key in wanted} == wanted:
            return stamp
    started = time.perf_counter()
    rows = write_vocabulary(athena, meds / "athena", concepts, seed)
    stamp = {**wanted, "rows": rows, "generation_seconds": time.perf_counter() - started}
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def measure(meds: Path, athena: Path, work: Path, workers: int) -> dict[str, Any]:
    """Fingerprint the inputs, then run the ontology, split and tokenizer steps in `work`."""
    config = PrepareConfig()
    files = data_files(meds)
    metadata = [p for p in (meds / "metadata").glob("*") if p.is_file()]
    with PeakMemory() as memory:
        started = time.perf_counter()
        inputs = {"meds": artifacts.fingerprint_files(files + metadata, meds),
                  "athena": artifacts.fingerprint_files([athena / n for n in COLUMNS], athena)}
        fingerprint = time.perf_counter() - started
        jobs = [ShardJob(path, index, len(files)) for index, path in enumerate(files)]
        with process_pool(min(workers, len(files))) as pool:
            ctx = StepContext(meds, athena, work / "pretraining_files", inputs, jobs, pool,
                              progress=False)
            ctx.out.mkdir(parents=True)
            ontology = ontology_step(ctx, config.ontology_settings(athena=True))
            split = split_step(ctx, config.split_settings(), after=ontology)
            tokenizer_step(ctx, config.tokenizer_settings(), ontology=ontology, split=split)
    return {"fingerprint": fingerprint, "seconds": dict(ctx.seconds),
            "peak_gib": memory.peak_gib, "ontology": Ontology.load(ontology).stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/athena_bench"))
    parser.add_argument("--concepts", type=int, default=5_200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--regenerate", action="store_true", help="regenerate the inputs")
    args = parser.parse_args()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ehrmotor.prepare").setLevel(logging.INFO)
    started = time.perf_counter()
    # In a child process, so that the generator's memory does not count in the measurement.
    child = multiprocessing.get_context("spawn").Process(
        target=prepare_inputs, args=(args.out, args.concepts, args.seed, args.regenerate))
    child.start()
    child.join()
    if child.exitcode:
        raise SystemExit(f"generating the inputs failed (exit code {child.exitcode})")
    inputs_seconds = time.perf_counter() - started
    stamp = json.loads((args.out / "athena" / STAMP).read_text())
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    result = measure(args.out / "meds", args.out / "athena", work, args.workers)
    seconds, rows, stats = result["seconds"], stamp["rows"], result["ontology"]
    athena_bytes = sum((args.out / "athena" / name).stat().st_size for name in COLUMNS)
    print(f"vocabulary          {args.out / 'athena'} ({athena_bytes / 2**30:.2f} GiB)")
    for name, label in ((CONCEPT_FILE, "concepts"), (ANCESTOR_FILE, "ancestor rows"),
                        (RELATIONSHIP_FILE, "relationship rows")):
        print(f"  {label:<17} {rows[name]:,}")
    print(f"  generated in      {stamp['generation_seconds']:.1f} s (inputs ready in "
          f"{inputs_seconds:.1f} s this run)")
    print(f"fingerprint inputs  {result['fingerprint']:7.1f} s (before the steps, not in them)")
    for step in ("ontology", "split", "tokenizer"):
        print(f"  {step:<17} {seconds[step]:7.1f} s")
    both = seconds["ontology"] + seconds["tokenizer"]
    print(f"ontology+tokenizer  {both:7.1f} s (target <= 120 s)")
    print(f"peak RSS            {result['peak_gib']:7.2f} GiB (process tree; target <= 3.73 GiB)")
    print(f"ontology            {stats.codes_kept:,} codes kept, {stats.edges_kept:,} edges, "
          f"{stats.data_codes:,} data codes ({stats.data_codes_unknown:,} unknown)")
    print(f"load average        {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
