"""Generate the synthetic MEDS dataset and Athena vocabulary, shard by shard in worker processes.

Layout written under `out/`:
- `data/<split>/<shard>.parquet` with split in train / tuning / held_out (80/10/10 per subject);
  MEDS 0.4 columns subject_id int64, time timestamp[us] (null for static rows), code string,
  numeric_value float32, text_value large_string; rows sorted by subject then time.
- `metadata/codes.parquet` (code, description, parent_codes), `metadata/dataset.json`,
  `metadata/subject_splits.parquet`, `metadata/synthetic.json` (the generator's parameters, so
  `true_hazards` can re-simulate a shard).
- `athena/`: the vocabulary (see `ehrmotor.synthetic.athena`).

Each shard draws from its own seed `(seed, shard)`, so the bytes do not depend on `--workers`.
The whole dataset is written to a sibling temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ehrmotor import __version__
from ehrmotor.artifacts import atomic_path, check_output, clean_stale_temporaries
from ehrmotor.errors import InputError, OutputError
from ehrmotor.processes import process_pool
from ehrmotor.synthetic.athena import write_athena
from ehrmotor.synthetic.catalog import build_catalog
from ehrmotor.synthetic.hazards import FIRST_MONTH, MONTH_DAYS, OUTCOMES
from ehrmotor.synthetic.pools import CodePools
from ehrmotor.synthetic.simulate import STATIC_TIME, TEXT_VALUES, ShardSimulator

log = logging.getLogger(__name__)

MEDS_VERSION = "0.4.1"
SPLITS = ("train", "tuning", "held_out")
SPLIT_SHARES = (0.8, 0.1, 0.1)
DEFAULT_SHARD_SUBJECTS = 10_000
FIRST_SUBJECT_ID = 10_001
DATA_SCHEMA = pa.schema([
    pa.field("subject_id", pa.int64(), nullable=False),
    pa.field("time", pa.timestamp("us")),
    pa.field("code", pa.string(), nullable=False),
    pa.field("numeric_value", pa.float32()),
    pa.field("text_value", pa.large_string()),
])
# The `meds` package's schemas for the metadata tables (polars would write large strings).
CODES_SCHEMA = pa.schema([("code", pa.string()), ("description", pa.string()),
                          ("parent_codes", pa.list_(pa.string()))])
SPLITS_SCHEMA = pa.schema([pa.field("subject_id", pa.int64(), nullable=False),
                           pa.field("split", pa.string(), nullable=False)])


@dataclass(frozen=True)
class ShardSpec:
    index: int
    first_subject: int  # position of the shard's first subject among all subjects
    num_subjects: int


def shard_specs(num_subjects: int, num_shards: int) -> list[ShardSpec]:
    """Contiguous blocks of subjects, as even as possible."""
    edges = np.linspace(0, num_subjects, num_shards + 1).round().astype(int)
    bounds = zip(edges[:-1], edges[1:], strict=True)
    return [ShardSpec(i, int(a), int(b - a)) for i, (a, b) in enumerate(bounds)]


# Worker processes are spawned (polars' thread pool does not survive fork) and receive the
# code strings and pools once, through the pool initializer.
@dataclass(frozen=True)
class _WorkerState:
    codes: np.ndarray  # MEDS code string of every code index
    pools: CodePools


_STATE: _WorkerState | None = None


def _init_worker(codes: np.ndarray, pools: CodePools) -> None:
    global _STATE
    _STATE = _WorkerState(codes, pools)


def _state() -> _WorkerState:
    """This process's code strings and pools (built here when not handed in by the pool)."""
    global _STATE
    if _STATE is None:
        catalog = build_catalog()
        _STATE = _WorkerState(catalog.codes, CodePools.from_catalog(catalog))
    return _STATE


def _pools() -> CodePools:
    return _state().pools


def _subject_splits(spec: ShardSpec, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, spec.index, 7])
    return rng.choice(len(SPLITS), spec.num_subjects, p=SPLIT_SHARES)


def _shard_table(spec: ShardSpec, seed: int, age_effect: float) -> tuple[pa.Table, np.ndarray]:
    """Simulate one shard; return its sorted MEDS table and each subject's split index."""
    state = _state()
    codes = state.codes
    sim = ShardSimulator(spec.num_subjects, seed, spec.index, state.pools, age_effect)
    subject, time_us, code, value, text = sim.run().columns
    order = np.lexsort((code, time_us, subject))
    subject, time_us, code = subject[order], time_us[order], code[order]
    value, text = value[order], text[order]
    static = time_us == STATIC_TIME
    first_id = FIRST_SUBJECT_ID + spec.first_subject
    table = pa.table(
        {
            "subject_id": pa.array(subject.astype(np.int64) + first_id),
            "time": pa.array(time_us, pa.timestamp("us"), mask=static),
            "code": pa.DictionaryArray.from_arrays(
                pa.array(code), pa.array(codes.tolist(), pa.string())).cast(pa.string()),
            "numeric_value": pa.array(value, pa.float32(), mask=np.isnan(value)),
            "text_value": pa.DictionaryArray.from_arrays(
                pa.array(text.astype(np.int32), mask=text < 0),
                pa.array(list(TEXT_VALUES), pa.large_string())).cast(pa.large_string()),
        },
        schema=DATA_SCHEMA,
    )
    return table, _subject_splits(spec, seed)[subject]


def _write_shard(spec: ShardSpec, seed: int, data_dir: Path,
                 age_effect: float) -> tuple[int, int, dict[str, int]]:
    """Write one shard's split files; return (subjects, events, rows per split)."""
    table, split = _shard_table(spec, seed, age_effect)
    rows = {}
    for i, name in enumerate(SPLITS):
        part = table.filter(pa.array(split == i))
        rows[name] = part.num_rows
        if part.num_rows:
            (data_dir / name).mkdir(parents=True, exist_ok=True)
            pq.write_table(part, data_dir / name / f"{spec.index}.parquet", compression="zstd")
    return spec.num_subjects, table.num_rows, rows


def _codes_metadata(out: Path) -> None:
    catalog = build_catalog()
    parents = (
        catalog.edges.filter(pl.col("relationship").is_in(["Is a", "Maps to"]))
        .group_by("child", maintain_order=True).agg(parent_codes=pl.col("parent"))
        .rename({"child": "code"})
    )
    meds_codes = pl.DataFrame({
        "code": ["MEDS_BIRTH", "MEDS_DEATH"], "description": ["Birth", "Death"],
    })
    codes = pl.concat([meds_codes, catalog.concepts.select("code", description="concept_name")])
    codes = codes.join(parents, on="code", how="left", maintain_order="left").with_columns(
        pl.col("parent_codes").fill_null(pl.lit([], dtype=pl.List(pl.String)))
    )
    pq.write_table(codes.to_arrow().cast(CODES_SCHEMA), out / "metadata" / "codes.parquet",
                   compression="zstd")


def _subject_splits_table(specs: list[ShardSpec], seed: int) -> pl.DataFrame:
    parts = []
    for spec in specs:
        ids = np.arange(spec.num_subjects) + FIRST_SUBJECT_ID + spec.first_subject
        names = np.array(SPLITS)[_subject_splits(spec, seed)]
        parts.append(pl.DataFrame({"subject_id": ids.astype(np.int64), "split": names}))
    return pl.concat(parts)


def generate(out: Path, num_subjects: int, seed: int = 0, num_shards: int | None = None,
             workers: int | None = None, force: bool = False, progress: bool = True,
             age_effect: float = 1.0) -> Path:
    """Write a synthetic MEDS 0.4 dataset and Athena vocabulary to `out`; return `out`.

    `num_shards` defaults to one per 10,000 subjects; `workers` to the number of cores;
    `age_effect` scales the outcomes' age slopes (`hazards.monthly_hazards`; 1 by default).
    Raises OutputError if `out` exists and is not empty, unless `force` and `out` is a dataset
    this generator wrote (it never replaces anything else).
    """
    if num_subjects < 1:
        raise InputError(f"--subjects must be at least 1, got {num_subjects}")
    if not 0 <= age_effect <= 10:
        raise InputError(f"age_effect must be between 0 and 10, got {age_effect}")
    out = Path(out)
    check_output(out, "folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputError(f"{out}: exists and is not empty; pass --force to replace it")
        if not (out / "metadata" / "synthetic.json").is_file():
            raise OutputError(f"{out}: exists and is not a dataset written by `ehrmotor synth` "
                              "(no metadata/synthetic.json); refusing to replace it")
    num_shards = num_shards or max(1, -(-num_subjects // DEFAULT_SHARD_SUBJECTS))
    num_shards = min(num_shards, num_subjects)
    workers = max(1, min(workers or os.cpu_count() or 1, num_shards))
    specs = shard_specs(num_subjects, num_shards)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent)
    with atomic_path(out, replace_folder=True) as tmp:
        totals = _write_dataset(tmp, specs, seed, num_subjects, workers, progress, age_effect)
    log.info("wrote %d subjects, %d events in %d shards to %s", num_subjects, totals[1],
             num_shards, out)
    return out


def _write_dataset(tmp: Path, specs: list[ShardSpec], seed: int, num_subjects: int,
                   workers: int, progress: bool, age_effect: float) -> np.ndarray:
    (tmp / "metadata").mkdir(parents=True)
    catalog = build_catalog()
    totals = np.zeros(2, dtype=np.int64)
    with process_pool(workers, initializer=_init_worker,
                      initargs=(catalog.codes, _pools())) as pool:
        futures = [pool.submit(_write_shard, spec, seed, tmp / "data", age_effect)
                   for spec in specs]
        # The vocabulary and code metadata are written here while the workers simulate.
        write_athena(catalog, tmp / "athena")
        _codes_metadata(tmp)
        # disable=None shows the bar only on a terminal.
        bar = tqdm(futures, desc="synth shards", unit="shard", disable=None if progress else True)
        for future in bar:
            subjects, events, _ = future.result()
            totals += (subjects, events)
            bar.set_postfix(events=int(totals[1]))
    pq.write_table(_subject_splits_table(specs, seed).to_arrow().cast(SPLITS_SCHEMA),
                   tmp / "metadata" / "subject_splits.parquet")
    dataset = {
        "dataset_name": "ehrmotor-synthetic", "dataset_version": f"seed{seed}-n{num_subjects}",
        "etl_name": "ehrmotor.synthetic", "etl_version": __version__, "meds_version": MEDS_VERSION,
    }
    (tmp / "metadata" / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    params = {"seed": seed, "num_subjects": num_subjects, "num_shards": len(specs),
              "first_subject_id": FIRST_SUBJECT_ID, "generator_version": __version__,
              "age_effect": age_effect}
    (tmp / "metadata" / "synthetic.json").write_text(json.dumps(params, indent=2) + "\n")
    return totals


def true_hazards(meds_dir: Path, subject_ids: np.ndarray, times: np.ndarray,
                 outcome: str) -> np.ndarray:
    """The generator's true monthly hazard of `outcome` for each (subject, time) pair.

    Re-simulates the shards holding the subjects (same seed, same draws) and reads the hazard of
    the month containing each time. `outcome` is one of OUTCOMES; nan where the subject was not
    under observation (before enrolment, after death or the cut-off) at that time.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
    params = json.loads((Path(meds_dir) / "metadata" / "synthetic.json").read_text())
    specs = shard_specs(params["num_subjects"], params["num_shards"])
    starts = np.array([s.first_subject for s in specs])
    position = np.asarray(subject_ids, dtype=np.int64) - params["first_subject_id"]
    days = (np.asarray(times, dtype="datetime64[us]") - FIRST_MONTH).astype("timedelta64[us]")
    month = np.floor(days.astype(np.int64) / 86_400e6 / MONTH_DAYS).astype(np.int64)
    shard_of = np.searchsorted(starts, position, side="right") - 1
    result = np.full(len(position), np.nan)
    for shard in np.unique(shard_of):
        rows = np.flatnonzero(shard_of == shard)
        spec = specs[shard]
        local = position[rows] - spec.first_subject
        sim = ShardSimulator(spec.num_subjects, params["seed"], spec.index, _pools(),
                             float(params.get("age_effect", 1.0)))  # absent: written before it
        hazards = sim.run(local, month[rows]).hazards
        if hazards is not None:
            result[rows] = hazards[outcome]
    return result
