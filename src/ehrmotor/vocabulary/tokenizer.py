"""Step 3 of `prepare`: the hierarchical tokenizer (vocabulary of codes, numeric bins, text values).

Fitting (on train subjects only; per-shard counts in workers, merged by a reduce):
- Code entries: p(code) is the share of train subjects with an event whose code is the code or
  one of its descendants (events are expanded to their ontology ancestors). Conditioned on its
  rarest parent, w = p / min parent p (capped at 1; no parent: baseline 1, w = p), the score is
  -baseline × (w ln w + (1 − w) ln(1 − w)): the information the code adds beyond its parent.
- Numeric entries: per code with numeric values, `numeric_bins` quantile bins whose edges come
  from a bounded deterministic sample of values; each bin is an entry whose parent is the code.
- Text entries: (code, text_value) pairs seen in at least `min_text_fraction` of subjects; the
  parent is the code.
- Entries with p < `min_fraction` are dropped; the rest are ranked by score (most informative
  first; ties by kind, code, bin, text) and the top `vocab_size` kept.

Encoding an event: the bag of its expanded codes that are in the vocabulary, each with weight
1 / bag size, plus, for a numeric (or text) event whose value has an entry, that entry with
weight 1 (femr's hierarchical encoding). Encoding is a join over whole shards (see
`positions.encode_events`). Every entry the fit can keep occurs in the encoding of some train
event: a code entry's subjects are counted over the same ontology expansion of every event
(valued ones included) that encoding uses, and a numeric or text entry's over the events whose
(code, bin) or (code, text) it is.

Artifact `tokenizer/dictionary.msgpack`, a msgpack map:
    format_version: 1
    entries: list of maps {kind: "code"|"numeric"|"text", code: str, bin: int (numeric),
             lower: float, upper: float (numeric bin edges; ±1e308 for open ends),
             text: str (text), score: float, probability: float}
    numeric_edges: map code -> list of inner bin edges (float)
    time_stats: map {age_mean, age_std, log_age_mean, log_age_std, log_delta_mean,
             log_delta_std}: moments of age in days, log(1 + age) and log(1 + days since the
             previous event), over the timed events of train subjects (`positions.time_moments`)
    num_train_subjects: int
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import polars as pl

from ehrmotor.errors import InputError, one_line
from ehrmotor.vocabulary.ontology import Ontology

FORMAT_VERSION = 1
OPEN_EDGE = 1e308
KIND_ORDER = {"code": 0, "numeric": 1, "text": 2}
DOCUMENT_KEYS = ("format_version", "entries", "numeric_edges", "time_stats", "num_train_subjects")
TIME_STAT_KEYS = ("age_mean", "age_std", "log_age_mean", "log_age_std", "log_delta_mean",
                  "log_delta_std")


@dataclass(frozen=True)
class ShardCounts:
    """What one shard contributes to fitting: subject counts per code / text, numeric samples."""

    num_subjects: int
    code_subjects: pl.DataFrame  # code, subjects
    text_subjects: pl.DataFrame  # code, text, subjects
    numeric_samples: pl.DataFrame  # code, value (at most sample_size per code)


def count_shard(events: pl.LazyFrame, ontology: Ontology, sample_size: int,
                seed: int) -> ShardCounts:
    """Counts for one shard's train events (columns subject_id, code, numeric_value, text_value)."""
    events = events.select("subject_id", "code", "numeric_value", "text_value")
    num_subjects = events.select(pl.col("subject_id").n_unique()).collect().item()
    code_subjects = (
        ontology.expand(events.select("subject_id", "code").unique())
        .select("subject_id", "ancestor").unique()
        .group_by("ancestor").agg(subjects=pl.len())
        .rename({"ancestor": "code"})
    )
    text_subjects = (
        events.filter(pl.col("text_value").is_not_null())
        .select("subject_id", "code", text="text_value").unique()
        .group_by("code", "text").agg(subjects=pl.len())
    )
    # A deterministic sample per code: the values with the smallest hash of (seed, row index).
    numeric_samples = (
        events.filter(pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_finite())
        .with_row_index("row")
        .with_columns(key=pl.col("row").hash(seed))
        .filter(pl.col("key").rank("ordinal").over("code") <= sample_size)
        .select("code", value=pl.col("numeric_value").cast(pl.Float64))
    )
    code_df, text_df, numeric_df = pl.collect_all([code_subjects, text_subjects, numeric_samples])
    return ShardCounts(num_subjects, code_df, text_df, numeric_df)


SCORE_DECIMALS = 12


def information_score(p: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """-baseline × (w ln w + (1−w) ln(1−w)) with w = min(p / baseline, 1); 0 ln 0 = 0."""
    w = np.clip(p / baseline, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(w > 0, w * np.log(w), 0.0) + np.where(w < 1, (1 - w) * np.log1p(-w), 0.0)
    return -baseline * terms


def fit_numeric_edges(samples: Sequence[pl.DataFrame], num_bins: int,
                      per_code: int) -> dict[str, list[float]]:
    """Inner quantile edges per numeric code from the pooled shard samples.

    Edges are distinct and sorted; values below the first edge fall in bin 0. A code whose sample
    has a single distinct value gets no edges (one bin). A code's pooled sample larger than
    `per_code` is thinned evenly over its sorted values (not cut to its smallest values), so
    every shard's values count.
    """
    pooled = pl.concat(samples).sort("code", "value")
    rank = pl.int_range(pl.len()).over("code")
    size = pl.len().over("code").cast(pl.Int64)
    # Keep the first value of each of per_code equal slices of the sorted sample.
    pooled = pooled.filter((rank == 0) | (rank * per_code // size > (rank - 1) * per_code // size))
    quantiles = [i / num_bins for i in range(1, num_bins)]
    table = pooled.group_by("code").agg(
        edges=pl.concat_list([pl.col("value").quantile(q, "nearest") for q in quantiles])
        .list.unique().list.sort(),
        low=pl.col("value").min(),
    ).sort("code")
    # One row per numeric code, not per event.
    return {code: [e for e in inner if e > low] for code, inner, low in table.iter_rows()}


def assign_bins(codes: pl.Series, values: pl.Series, edges: dict[str, list[float]]) -> pl.Series:
    """Bin index of each (code, value) under `edges` (null where the code has no bins or no value).

    Vectorised per numeric code: one searchsorted over all of that code's values.
    """
    result = np.full(len(codes), -1, dtype=np.int32)
    frame = pl.DataFrame({"code": codes, "value": values.cast(pl.Float64)}).with_row_index("row")
    numeric = frame.filter(pl.col("value").is_not_null() & pl.col("value").is_finite()
                           & pl.col("code").is_in(list(edges)))
    for (code,), part in numeric.partition_by("code", as_dict=True).items():  # per numeric code
        rows = part["row"].to_numpy()
        result[rows] = np.searchsorted(np.asarray(edges[str(code)]), part["value"].to_numpy(),
                                       "right")
    return pl.Series("bin", result).replace(-1, None)


def count_bins(events: pl.LazyFrame, edges: dict[str, list[float]]) -> pl.DataFrame:
    """Subjects per (code, bin) among one shard's numeric train events (second fitting pass)."""
    numeric = (
        events.filter(pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_finite()
                      & pl.col("code").is_in(list(edges)))
        .select("subject_id", "code", "numeric_value").collect()
    )
    binned = numeric.with_columns(bin=assign_bins(numeric["code"], numeric["numeric_value"], edges))
    return (binned.select("subject_id", "code", "bin").unique()
            .group_by("code", "bin").agg(subjects=pl.len()))


def _with_bounds(entries: pl.DataFrame, edges: dict[str, list[float]]) -> pl.DataFrame:
    """Add the index and each numeric entry's [lower, upper) value range."""
    bounds = {code: [-OPEN_EDGE, *inner, OPEN_EDGE] for code, inner in edges.items()}
    rows = entries.select("kind", "code", "bin").iter_rows()  # one row per vocabulary entry
    ranges = [(bounds[c][b], bounds[c][b + 1]) if k == "numeric" else (None, None)
              for k, c, b in rows]
    return entries.with_columns(
        lower=pl.Series([r[0] for r in ranges], dtype=pl.Float64),
        upper=pl.Series([r[1] for r in ranges], dtype=pl.Float64),
    ).with_row_index("index")


@dataclass
class Tokenizer:
    """A fitted vocabulary; see the module docstring for how it is fitted and encoded."""

    entries: pl.DataFrame  # index, kind, code, bin, text, probability, score, lower, upper
    numeric_edges: dict[str, list[float]]
    time_stats: dict[str, float]
    num_train_subjects: int

    @classmethod
    def fit(cls, counts: Sequence[ShardCounts], bin_counts: Sequence[pl.DataFrame],
            edges: dict[str, list[float]], ontology: Ontology, *, vocab_size: int,
            min_fraction: float, min_text_fraction: float) -> Tokenizer:
        """Merge per-shard counts and rank the entries (time_stats are set by the caller)."""
        total = sum(c.num_subjects for c in counts)
        if total == 0:
            raise InputError("no train subjects to fit the tokenizer on")
        codes = (pl.concat([c.code_subjects for c in counts])
                 .group_by("code").agg(pl.col("subjects").sum())
                 .with_columns(probability=pl.col("subjects") / total))
        parent_p = (
            ontology.parents.join(codes.select(parent="code", parent_p="probability"),
                                  on="parent", how="inner")
            .group_by("code").agg(baseline=pl.col("parent_p").min())
        )
        codes = codes.join(parent_p, on="code", how="left").with_columns(
            kind=pl.lit("code"), bin=pl.lit(None, pl.Int32), text=pl.lit(None, pl.String))
        code_p = codes.select("code", baseline="probability")
        texts = (pl.concat([c.text_subjects for c in counts])
                 .group_by("code", "text").agg(pl.col("subjects").sum())
                 .with_columns(probability=pl.col("subjects") / total)
                 .filter(pl.col("probability") >= min_text_fraction)
                 .join(code_p, on="code", how="left")
                 .with_columns(kind=pl.lit("text"), bin=pl.lit(None, pl.Int32)))
        numeric = (pl.concat(list(bin_counts))
                   .group_by("code", "bin").agg(pl.col("subjects").sum())
                   .with_columns(probability=pl.col("subjects") / total)
                   .join(code_p, on="code", how="left")
                   .with_columns(kind=pl.lit("numeric"), text=pl.lit(None, pl.String)))
        columns = ["kind", "code", "bin", "text", "probability", "baseline"]
        entries = pl.concat([frame.select(columns) for frame in (codes, numeric, texts)])
        entries = entries.with_columns(pl.col("baseline").fill_null(1.0)).filter(
            pl.col("probability") >= min_fraction)
        # Rounded so that scores equal in exact arithmetic (Gender/F and Gender/M: the entropy is
        # symmetric) tie on every CPU: numpy's vectorised log differs in the last bit between
        # CPU kinds, which reordered the vocabulary. Ties are broken by kind, code, bin, text.
        score = np.round(information_score(entries["probability"].to_numpy(),
                                           entries["baseline"].to_numpy()), SCORE_DECIMALS)
        entries = (
            entries.with_columns(score=pl.Series(score),
                                 kind_order=pl.col("kind").replace_strict(KIND_ORDER))
            .sort(["score", "kind_order", "code", "bin", "text"],
                  descending=[True, False, False, False, False], nulls_last=True)
            .head(vocab_size)
            .drop("kind_order", "baseline")
        )
        return cls(_with_bounds(entries, edges), edges, {}, total)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for row in self.entries.iter_rows(named=True):
            entry: dict[str, Any] = {"kind": row["kind"], "code": row["code"],
                                     "score": row["score"], "probability": row["probability"]}
            if row["kind"] == "numeric":
                entry.update(bin=row["bin"], lower=row["lower"], upper=row["upper"])
            if row["kind"] == "text":
                entry["text"] = row["text"]
            entries.append(entry)
        document = {"format_version": FORMAT_VERSION, "entries": entries,
                    "numeric_edges": self.numeric_edges, "time_stats": self.time_stats,
                    "num_train_subjects": self.num_train_subjects}
        (directory / "dictionary.msgpack").write_bytes(msgpack.packb(document, use_bin_type=True))

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        """Read `directory/dictionary.msgpack`; raises InputError naming the file when it is
        missing, not msgpack, of another format_version or lacks a field."""
        path = Path(directory) / "dictionary.msgpack"
        expected = "expected the tokenizer dictionary written by `ehrmotor prepare`"
        try:
            document = msgpack.unpackb(path.read_bytes(), raw=False)
        except FileNotFoundError as exc:
            raise InputError(f"{path}: not found; {expected}") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc}); {expected}") from exc
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise InputError(f"{path}: not a valid msgpack file ({one_line(exc)}); "
                             f"{expected}") from exc
        if not isinstance(document, dict):
            raise InputError(f"{path}: holds a msgpack {type(document).__name__}; expected a map "
                             f"with keys {', '.join(DOCUMENT_KEYS)}")
        if document.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path}: format_version {document.get('format_version')!r}; "
                             f"expected {FORMAT_VERSION}")
        missing = [key for key in DOCUMENT_KEYS if key not in document]
        if missing:
            raise InputError(f"{path}: missing keys {', '.join(missing)}; expected a map with "
                             f"keys {', '.join(DOCUMENT_KEYS)}")
        entries, edges, stats = (document["entries"], document["numeric_edges"],
                                 document["time_stats"])
        subjects = document["num_train_subjects"]
        if not isinstance(entries, list):
            raise InputError(f"{path}: entries is a {type(entries).__name__}; expected a list")
        if not (isinstance(edges, dict) and all(isinstance(v, list) for v in edges.values())):
            raise InputError(f"{path}: numeric_edges is {_shown(edges)}; expected a map of "
                             "code to a list of bin edges")
        if not (isinstance(stats, dict) and set(TIME_STAT_KEYS) <= set(stats)
                and all(_is_number(stats[k]) for k in TIME_STAT_KEYS)):
            raise InputError(f"{path}: time_stats is {_shown(stats)}; expected a map of "
                             f"{', '.join(TIME_STAT_KEYS)} to numbers")
        if not isinstance(subjects, int) or isinstance(subjects, bool):
            raise InputError(f"{path}: num_train_subjects is {_shown(subjects)}; expected an "
                             "integer")
        rows = []
        for number, entry in enumerate(entries):  # one row per vocabulary entry
            problem = _entry_problem(entry)
            if problem:
                raise InputError(f"{path}: entry {number} {problem}; expected a map with kind "
                                 "(code, numeric or text), code, probability, score, and bin, "
                                 "lower, upper (numeric) or text (text)")
            rows.append({"kind": entry["kind"], "code": entry["code"], "bin": entry.get("bin"),
                         "text": entry.get("text"), "probability": entry["probability"],
                         "score": entry["score"], "lower": entry.get("lower"),
                         "upper": entry.get("upper")})
        try:
            frame = pl.DataFrame(rows, schema={
                "kind": pl.String, "code": pl.String, "bin": pl.Int32, "text": pl.String,
                "probability": pl.Float64, "score": pl.Float64, "lower": pl.Float64,
                "upper": pl.Float64}).with_row_index("index")
        except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"{path}: entries do not fit their types ({one_line(exc)}); "
                             f"{expected}") from exc
        return cls(frame, edges, stats, subjects)

    def __len__(self) -> int:
        return self.entries.height



def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A short one-line rendering of a value for an error message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one saved vocabulary entry, or None."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}"
    missing = [key for key in ("kind", "code", "probability", "score") if key not in entry]
    if missing:
        return f"lacks {', '.join(missing)}"
    kind = entry["kind"]
    if kind not in KIND_ORDER:
        return f"has kind {_shown(kind)}"
    if not isinstance(entry["code"], str):
        return f"has code {_shown(entry['code'])}"
    needed = {"numeric": ("bin", "lower", "upper"), "text": ("text",)}.get(kind, ())
    absent = [key for key in needed if entry.get(key) is None]
    if absent:
        return f"({kind}) lacks {', '.join(absent)}"
    return None
