"""The steps of `ehrmotor prepare`: `step(context, settings, *, inputs) -> artifact path`.

Each step maps over the MEDS shards in worker processes (`ehrmotor.prepare.shard_jobs`), reduces
here, and writes its artifact atomically, unless the artifact is current. Its manifest
(`<artifact>.manifest.json`) is derived from the step's settings (a frozen dataclass of
`ehrmotor.config`, recorded with `dataclasses.asdict`), the FORMAT_VERSION of the artifact's module,
the fingerprints of the MEDS and Athena files, and the digest of the manifest of the artifact built
before it (`after`), so that a change upstream reaches every later step. A different manifest stops
the run with an ArtifactMismatch naming the changed key.

    held_out_step    ../subject_splits.parquet  `ehrmotor.prepare.split` (only with a
                                                held-out fraction: no MEDS split file)
    ontology_step    ontology/                  `ehrmotor.vocabulary.ontology`
    split_step       split.csv                  `ehrmotor.prepare.split`
    tokenizer_step   tokenizer/                 `ehrmotor.vocabulary.tokenizer`
    dataset_step     train_batches/             `ehrmotor.sequences.shards` (with the candidate
                                                tasks' statistics)
    motor_task_step  motor_task.json            `ehrmotor.motor_task.tasks`
    dataset_step     val_batches/
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl
from tqdm import tqdm

from ehrmotor import artifacts
from ehrmotor.config import (
    HeldOutSettings,
    OntologySettings,
    SplitSettings,
    TaskSettings,
    TokenizerSettings,
    WindowSettings,
    config_dict,
)
from ehrmotor.errors import InputError
from ehrmotor.meds import read_codes_metadata, read_splits_file, read_subject_splits
from ehrmotor.meds.read import HELD_OUT_FILE
from ehrmotor.motor_task.tasks import FORMAT_VERSION as TASK_FORMAT_VERSION
from ehrmotor.motor_task.tasks import MotorTask, TaskCounts, candidate_tasks
from ehrmotor.prepare.shard_jobs import (
    DatasetSpec,
    ShardDataset,
    ShardJob,
    shard_codes,
    shard_dataset,
    shard_subjects,
    shard_tokenizer_bins,
    shard_tokenizer_counts,
)
from ehrmotor.prepare.split import (
    held_out_splits,
    read_split,
    split_subjects,
    write_held_out_splits,
    write_split,
)
from ehrmotor.sequences.shards import DATASET_FORMAT_VERSION, finish_dataset
from ehrmotor.sequences.time_features import time_stats_from_moments
from ehrmotor.vocabulary.bags import BagTable
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import Tokenizer, fit_numeric_edges

log = logging.getLogger(__name__)
T = TypeVar("T")
# ontology.py and split.py define no format version of their own yet.
ONTOLOGY_FORMAT_VERSION = 1
SPLIT_FORMAT_VERSION = 1
HELD_OUT_FORMAT_VERSION = 1
DATASET_STATS = "prepare_stats.json"

# The tokenizer step's manifest version: 2 adds the bag table (tokenizer/bags.npz), 3 the time
# statistics in it (BAGS_FORMAT_VERSION 2).
TOKENIZER_STEP_VERSION = 3


class PrepareError(InputError):
    """Bad input for prepare (one line); the CLI exits with status 2."""


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Digest of a manifest, less the package version (a new release alone changes nothing)."""
    kept = {k: v for k, v in manifest.items() if k != "ehrmotor_version"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def recorded_digest(artifact: Path) -> str:
    """`manifest_digest` of the manifest recorded beside a finished artifact."""
    return manifest_digest(json.loads(artifacts.manifest_path(artifact).read_text()))


@dataclass
class StepContext:
    """What every step shares: the inputs, the work folder, the shard jobs and the worker pool."""

    meds_dir: Path
    athena_dir: Path | None
    out: Path  # WORK/pretraining_files
    inputs: dict[str, str]  # fingerprints of the MEDS (and Athena) files
    jobs: list[ShardJob]
    pool: Executor
    force: bool = False
    progress: bool = True
    seconds: dict[str, float] = field(default_factory=dict)  # per step, built or loaded

    def map(self, work: Callable[[ShardJob], T], desc: str) -> list[T]:
        """`work(job)` for every shard job in the worker pool (local processes or Ray tasks:
        `ehrmotor.prepare.executors`), results in job order whatever order they finish in."""
        futures = [self.pool.submit(work, job) for job in self.jobs]
        bar = tqdm(futures, desc=desc, unit="shard", leave=False,
                   disable=None if self.progress else True)  # None: only on a terminal
        try:
            return [future.result() for future in bar]
        except BaseException:
            # Let running shards finish before the step's temporary folder is removed, so that no
            # worker writes into it afterwards; the queued ones never start.
            for future in futures:
                future.cancel()
            wait(futures)
            raise

    def manifest(self, step: str, settings: Any, format_version: int,
                 after: Path | None) -> dict[str, Any]:
        """The manifest of `step` with these settings, after the artifact `after` (None: first)."""
        upstream = "" if after is None else recorded_digest(after)
        return artifacts.make_manifest(step, format_version, config_dict(settings),
                                       {**self.inputs, "upstream": upstream})

    def build(self, artifact: Path, manifest: dict[str, Any],
              build: Callable[[Path], None]) -> bool:
        """Build `artifact` with `build(temporary path)` unless current; True when built."""
        name = manifest["step"]
        started = time.perf_counter()
        built = False
        if self.force or not artifacts.is_current(artifact, manifest):
            with artifacts.atomic_path(artifact, replace_folder=True) as tmp:
                try:
                    build(tmp)
                except PrepareError:
                    raise
                except InputError as error:  # a fit found nothing to learn from
                    raise PrepareError(f"{name}: {str(error).splitlines()[0]}") from error
            artifacts.record(artifact, manifest)
            built = True
        self.seconds[name] = time.perf_counter() - started
        log.info("%s: %s %s", name, "built" if built else "loaded", artifact)
        return built


def ontology_step(ctx: StepContext, settings: OntologySettings) -> Path:
    """Step 1: `ontology/`, the data's codes and their ancestors (from Athena when given)."""
    artifact = ctx.out / "ontology"

    def build(tmp: Path) -> None:
        found = ctx.map(shard_codes, "ontology: data codes")
        codes = pl.concat(found).unique().sort("code")
        ontology = Ontology.build(codes["code"],
                                  athena_dir=ctx.athena_dir if settings.athena else None,
                                  codes_metadata=read_codes_metadata(ctx.meds_dir),
                                  remove_vocabularies=settings.remove_vocabularies)
        tmp.mkdir()
        ontology.save(tmp)

    ctx.build(artifact, ctx.manifest("ontology", settings, ONTOLOGY_FORMAT_VERSION, None), build)
    return artifact


def held_out_step(ctx: StepContext, settings: HeldOutSettings) -> Path:
    """Step 0, for a MEDS dataset without a split file: `WORK/subject_splits.parquet`, every
    subject train or held_out by its hash (`ehrmotor.prepare.split.held_out_splits`)."""
    artifact = ctx.out.parent / HELD_OUT_FILE
    fraction = settings.fraction
    if fraction is None:
        raise ValueError("held_out_step needs a held-out fraction")

    def build(tmp: Path) -> None:
        subjects = pl.concat(ctx.map(partial(shard_subjects, excluded=np.array([], np.int64)),
                                     "held out: subjects"))
        write_held_out_splits(held_out_splits(subjects["subject_id"].to_numpy(), settings.seed,
                                              fraction), tmp)

    ctx.build(artifact, ctx.manifest("held_out", settings, HELD_OUT_FORMAT_VERSION, None), build)
    splits = read_splits_file(artifact)
    log.info("held_out: %d of %d subjects held out from pretraining (%s)",
             splits.filter(pl.col("split") == "held_out").height, splits.height, artifact)
    return artifact


def split_step(ctx: StepContext, settings: SplitSettings, *, after: Path,
               splits_file: Path | None = None) -> Path:
    """Step 2: `split.csv`, train/val of the subjects outside `settings.exclude_splits` of the
    MEDS split file, or of `splits_file` (the held-out step's) when given."""
    artifact = ctx.out / "split.csv"

    def build(tmp: Path) -> None:
        splits = (read_splits_file(splits_file) if splits_file is not None
                  else read_subject_splits(ctx.meds_dir))
        excluded = np.array([], dtype=np.int64)
        if splits is not None and settings.exclude_splits:
            excluded = splits.filter(pl.col("split").is_in(list(settings.exclude_splits)))[
                "subject_id"].to_numpy()
        subjects = pl.concat(ctx.map(partial(shard_subjects, excluded=excluded),
                                     "split: subjects"))
        if subjects.height == 0:
            raise PrepareError(f"{ctx.meds_dir}: no subjects left for pretraining after "
                               f"excluding splits {list(settings.exclude_splits)}")
        write_split(split_subjects(subjects["subject_id"].to_numpy(), settings.seed,
                                   settings.val_fraction), tmp)

    manifest = ctx.manifest("split", settings, SPLIT_FORMAT_VERSION, after)
    if splits_file is not None:  # its fraction and seed reach the split, and what follows it
        manifest["inputs"]["held_out"] = recorded_digest(splits_file)
    ctx.build(artifact, manifest, build)
    if read_split(artifact).filter(pl.col("split_name") == "train").height == 0:
        raise PrepareError(f"{artifact}: the train split is empty")
    return artifact


def tokenizer_step(ctx: StepContext, settings: TokenizerSettings, *, ontology: Path,
                   split: Path) -> Path:
    """Step 3: `tokenizer/`, the vocabulary fitted on the train subjects."""
    artifact = ctx.out / "tokenizer"

    def build(tmp: Path) -> None:
        counts = ctx.map(partial(shard_tokenizer_counts, split=split, ontology=ontology,
                                 settings=settings), "tokenizer: counts")
        edges = fit_numeric_edges([c.numeric_samples for c, _ in counts], settings.numeric_bins,
                                  settings.numeric_sample_size)
        bins = ctx.map(partial(shard_tokenizer_bins, split=split, edges=edges),
                       "tokenizer: numeric bins")
        fitted = Tokenizer.fit([c for c, _ in counts], bins, edges, Ontology.load(ontology),
                               vocab_size=settings.vocab_size, min_fraction=settings.min_fraction,
                               min_text_fraction=settings.min_text_fraction)
        fitted.time_stats = time_stats_from_moments(np.sum([m for _, m in counts], axis=0))
        fitted.save(tmp)
        BagTable.of(fitted, Ontology.load(ontology)).save(tmp)

    manifest = ctx.manifest("tokenizer", settings, TOKENIZER_STEP_VERSION, split)
    ctx.build(artifact, manifest, build)
    return artifact


def dataset_step(ctx: StepContext, settings: WindowSettings, split_name: str, *, ontology: Path,
                 split: Path, tokenizer: Path, after: Path) -> Path:
    """Step 4 (train) and 6 (val): `<split_name>_batches/`, the windows of one split as a
    Hugging Face dataset, their task occurrences numbered as the candidate tasks.

    Its `prepare_stats.json` holds the counts of `dataset_stats`; the train dataset also holds
    the candidate tasks' statistics (`TaskCounts.save`) the MOTOR task is fitted on.
    """
    artifact = ctx.out / f"{split_name}_batches"

    def build(tmp: Path) -> None:
        tmp.mkdir()
        spec = DatasetSpec(split_name, tmp, settings, split, ontology, tokenizer,
                           task_statistics=split_name == "train")
        shards = ctx.map(partial(shard_dataset, spec=spec), f"datasets: {split_name}")
        finish_dataset(tmp, len(ctx.jobs))
        (tmp / DATASET_STATS).write_text(json.dumps(dataset_stats(shards)))
        counts = [s.tasks for s in shards if s.tasks is not None]
        if counts:
            TaskCounts.combine(counts).save(tmp)

    manifest = ctx.manifest(f"{split_name}_batches", settings, DATASET_FORMAT_VERSION, after)
    ctx.build(artifact, manifest, build)
    return artifact


def motor_task_step(ctx: StepContext, settings: TaskSettings, *, tokenizer: Path,
                    train: Path) -> Path:
    """Step 5: `motor_task.json`, fitted on the candidate tasks' statistics over the train
    dataset's points (kept with the dataset: no pass over the shards)."""
    artifact = ctx.out / "motor_task.json"

    def build(tmp: Path) -> None:
        task = MotorTask.fit(candidate_tasks(Tokenizer.load(tokenizer), settings.candidate_tasks),
                             TaskCounts.load(train), num_bins=settings.num_bins,
                             final_layer_size=settings.final_layer_size,
                             min_task_events=settings.min_task_events,
                             min_task_fraction=settings.min_task_fraction)
        task.save(tmp)

    ctx.build(artifact, ctx.manifest("motor_task", settings, TASK_FORMAT_VERSION, train), build)
    if MotorTask.load(artifact).tasks.height == 0:
        raise PrepareError(
            f"{artifact}: no MOTOR task has at least {settings.min_task_events} train events; "
            "lower min_task_events or add subjects")
    return artifact


def dataset_stats(shards: list[ShardDataset]) -> dict[str, Any]:
    """The counts a dataset records in its prepare_stats.json."""
    return {"windows": sum(s.windows for s in shards),
            "points": sum(s.points for s in shards),
            "events": sum(s.events.events for s in shards),
            "skipped_windows": sum(s.skipped_windows for s in shards),
            "skipped_subjects": sum(s.skipped_subjects for s in shards),
            "subjects_born_late": sum(s.events.subjects_born_late for s in shards),
            "events_before_birth": sum(s.events.events_before_birth for s in shards),
            "entries_used": sorted(set().union(*(s.entries_used for s in shards)))}


def read_dataset_stats(dataset: Path) -> dict[str, Any]:
    """A finished dataset's prepare_stats.json (`dataset_stats`)."""
    stats: dict[str, Any] = json.loads((dataset / DATASET_STATS).read_text())
    return stats
