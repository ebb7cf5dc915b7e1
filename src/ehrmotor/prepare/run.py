"""`ehrmotor prepare`: MEDS + Athena → ontology, split, tokenizer, MOTOR task, tokenised datasets.

Artifacts in `WORK/pretraining_files/` (each written to a temporary path and renamed, each with a
`<name>.manifest.json` recording config, input fingerprint and format version):

    config.json                resolved PrepareConfig
    ../subject_splits.parquet  only with held_out_fraction (MEDS data without
                               metadata/subject_splits.parquet): see `ehrmotor.prepare.split`
    ontology/                  see `ehrmotor.vocabulary.ontology`
    split.csv                  see `ehrmotor.prepare.split`
    tokenizer/dictionary.msgpack   see `ehrmotor.vocabulary.tokenizer`
    motor_task.json            see `ehrmotor.motor_task.tasks`
    train_batches/, val_batches/   Hugging Face datasets (save_to_disk, torch format), one row
                               per training window; see `ehrmotor.sequences.shards`

The steps are the functions of `ehrmotor.prepare.steps`, each of its inputs and its settings (see
there for the manifests). A step whose artifact exists with the same manifest is loaded, not
rebuilt; a different manifest stops with a message naming what changed. Per-shard work runs in
worker processes (spawned), or as tasks on a Ray cluster (`executor="ray"`; see
`ehrmotor.prepare.executors`), so memory is bounded by the largest shard, not the dataset. The
artifacts do not depend on the executor or the number of workers. No labels are stored: the
datasets keep each window's prediction points and task occurrences, and the collate step derives
the MOTOR labels from them (`ehrmotor.motor_task.occurrences`, `ehrmotor.sequences.batching`).

Which subjects pretraining may see comes from metadata/subject_splits.parquet (its
exclude_splits are left out). A dataset without one needs held_out_fraction (prepare writes its
own split) or no_held_out (every subject pretrained on, recorded as nothing left out).
"""

from __future__ import annotations

import json
import logging
import os
import resource
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl

from ehrmotor import artifacts
from ehrmotor.config import PrepareConfig, config_dict
from ehrmotor.lock import work_lock
from ehrmotor.meds import MedsError, data_files, require_valid
from ehrmotor.meds.read import SPLITS_FILE
from ehrmotor.motor_task.tasks import MotorTask
from ehrmotor.prepare.executors import (
    EXECUTORS,
    SHARDS_PER_CPU,
    RayExecutor,
    refuse_urls,
    shard_executor,
)
from ehrmotor.prepare.shard_jobs import ShardJob
from ehrmotor.prepare.split import read_split
from ehrmotor.prepare.steps import (
    PrepareError,
    StepContext,
    dataset_step,
    held_out_step,
    motor_task_step,
    ontology_step,
    read_dataset_stats,
    split_step,
    tokenizer_step,
)
from ehrmotor.vocabulary.athena import ANCESTOR_FILE, CONCEPT_FILE, RELATIONSHIP_FILE
from ehrmotor.vocabulary.tokenizer import Tokenizer

__all__ = ["ATHENA_FILES", "PrepareError", "PrepareSummary", "prepare"]

log = logging.getLogger(__name__)
ATHENA_FILES = (CONCEPT_FILE, RELATIONSHIP_FILE, ANCESTOR_FILE)


@dataclass
class PrepareSummary:
    subjects: int = 0
    events: int = 0
    vocab_entries: int = 0
    vocab_entries_used: int = 0
    tasks_kept: int = 0
    tasks_dropped: int = 0
    windows: dict[str, int] = field(default_factory=dict)
    prediction_points: dict[str, int] = field(default_factory=dict)
    skipped_windows: int = 0
    skipped_subjects: int = 0
    subjects_born_late: int = 0  # subjects with timed events before their MEDS_BIRTH event
    events_before_birth: int = 0  # those events, folded into the birth position
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: float = 0.0  # largest single process (this one or a local worker)
    executor: str = "local"

    def lines(self) -> list[str]:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return [
            f"subjects {self.subjects:,}, events {self.events:,}",
            f"vocabulary entries {self.vocab_entries:,} ({self.vocab_entries_used:,} used in "
            "the datasets)",
            f"MOTOR tasks kept {self.tasks_kept:,} (dropped {self.tasks_dropped:,})",
            "windows " + ", ".join(f"{k} {v:,}" for k, v in self.windows.items())
            + f"; skipped windows {self.skipped_windows:,}, subjects {self.skipped_subjects:,}",
            "prediction points " + ", ".join(f"{k} {v:,}" for k, v in
                                             self.prediction_points.items()),
            f"events before MEDS_BIRTH {self.events_before_birth:,} of "
            f"{self.subjects_born_late:,} subject(s), folded into the birth position",
            f"seconds per step: {steps}",
            f"peak memory {self.peak_rss_gib:.2f} GiB "
            + ("(largest process)" if self.executor == "local"
               else "(this process; not the Ray workers)"),
        ]

    def add_dataset(self, split_name: str, stats: dict[str, Any]) -> None:
        """Count a finished dataset's prepare_stats.json in."""
        self.windows[split_name] = stats["windows"]
        self.prediction_points[split_name] = stats["points"]
        self.events += stats["events"]
        self.skipped_windows += stats["skipped_windows"]
        self.skipped_subjects += stats["skipped_subjects"]
        # .get: prepare_stats.json written before these counts existed still loads.
        born_late, before_birth = (stats.get("subjects_born_late", 0),
                                   stats.get("events_before_birth", 0))
        self.subjects_born_late += born_late
        self.events_before_birth += before_birth
        if born_late:  # `ehrmotor validate`'s warning says it once at the start; this is the count
            log.info("%s: %d subject(s) have %d timed event(s) before their MEDS_BIRTH "
                        "event; they were folded into the birth position (run ehrmotor "
                        "validate for an example)", split_name, born_late, before_birth)


def _fingerprint_inputs(meds_dir: Path, athena_dir: Path | None) -> dict[str, str]:
    files = data_files(meds_dir)
    metadata = [p for p in (meds_dir / "metadata").glob("*") if p.is_file()]
    inputs = {"meds": artifacts.fingerprint_files(files + metadata, meds_dir)}
    if athena_dir is not None:
        inputs["athena"] = artifacts.fingerprint_files(
            [athena_dir / name for name in ATHENA_FILES], athena_dir)
    return inputs


class Preparer:
    """Runs the steps under the work folder's lock, loading finished artifacts and building the
    missing ones."""

    def __init__(self, meds_dir: Path, work_dir: Path, athena_dir: Path | None,
                 config: PrepareConfig, workers: int | None, force: bool, progress: bool,
                 executor: str = "local", ray_address: str | None = None):
        if executor not in EXECUTORS:
            raise PrepareError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        refuse_urls([meds_dir, work_dir, athena_dir])
        # Ray workers on other hosts start in other folders: give them absolute paths.
        where = Path.absolute if executor == "ray" else Path
        self.meds_dir = where(Path(meds_dir))
        self.athena_dir = where(Path(athena_dir)) if athena_dir else None
        self.out = where(Path(work_dir)) / "pretraining_files"
        # Nothing left out: config.json records it so, and evaluate refuses every split.
        self.config = replace(config, exclude_splits=()) if config.no_held_out else config
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.force = force
        self.progress = progress
        self.executor, self.ray_address = executor, ray_address
        self.summary = PrepareSummary(executor=executor)

    def run(self) -> PrepareSummary:
        artifacts.check_output(self.out.parent, "folder")
        self._check_inputs()  # before anything is created
        created = [folder for folder in (self.out.parent, self.out) if not folder.exists()]
        try:
            with work_lock(self.out.parent, "prepare"):
                artifacts.check_output(self.out, "folder")
                self.out.mkdir(exist_ok=True)
                for stale in [*artifacts.clean_stale_temporaries(self.out.parent),
                              *artifacts.clean_stale_temporaries(self.out)]:
                    log.info("removed %s, left by an interrupted run", stale)
                return self._run()
        except BaseException:
            artifacts.remove_empty_folders(created)  # a run that built nothing leaves nothing
            raise

    def _check_inputs(self) -> None:
        try:
            require_valid(self.meds_dir)
        except MedsError as error:
            raise PrepareError(str(error).splitlines()[0]) from error
        self._check_split_source()
        if self.athena_dir is not None:
            missing = [n for n in ATHENA_FILES if not (self.athena_dir / n).is_file()]
            if missing:
                raise PrepareError(f"{self.athena_dir}: Athena folder lacks {', '.join(missing)}")

    def _check_split_source(self) -> None:
        """Who is held out must be known: the MEDS split file, or held_out_fraction, or
        no_held_out (PrepareError otherwise, and for a fraction given beside a split file)."""
        splits_file = self.meds_dir / SPLITS_FILE
        if splits_file.is_file():
            if self.config.held_out_fraction is not None:
                raise PrepareError(f"{splits_file}: exists, and its splits decide who is held "
                                   "out; drop --held-out-fraction (held_out_fraction)")
        elif self.config.held_out_fraction is None and not self.config.no_held_out:
            raise PrepareError(
                f"{splits_file}: not found, so no subject would be held out for evaluation; "
                "give --held-out-fraction F (prepare writes WORK/subject_splits.parquet, a "
                "hashed share F of the subjects held out) or --no-held-out (pretrain on every "
                "subject)")

    def _run(self) -> PrepareSummary:
        files = data_files(self.meds_dir)
        jobs = [ShardJob(path, index, len(files)) for index, path in enumerate(files)]
        with shard_executor(self.executor, min(self.workers, len(files)),
                            self.ray_address) as pool:
            if isinstance(pool, RayExecutor) and len(files) < SHARDS_PER_CPU * pool.cpus:
                log.warning("ray: %d shards for %g CPUs leave CPUs idle; use at least %d shards "
                            "per CPU (see README)", len(files), pool.cpus, SHARDS_PER_CPU)
            ctx = StepContext(self.meds_dir, self.athena_dir, self.out,
                              _fingerprint_inputs(self.meds_dir, self.athena_dir), jobs, pool,
                              self.force, self.progress, self.summary.seconds)
            self._run_steps(ctx)
        resolved = self.out / "config.json"
        if not resolved.exists() or json.loads(resolved.read_text()) != config_dict(self.config):
            artifacts.write_json(resolved, config_dict(self.config))
        kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        self.summary.peak_rss_gib = kib / 2**20
        return self.summary

    def _run_steps(self, ctx: StepContext) -> None:
        """The steps in order, each after the one it chains its manifest to."""
        config = self.config
        held_out = config.held_out_settings()
        splits_file = held_out_step(ctx, held_out) if held_out.fraction is not None else None
        ontology = ontology_step(ctx, config.ontology_settings(athena=self.athena_dir is not None))
        split = split_step(ctx, config.split_settings(), after=ontology, splits_file=splits_file)
        tokenizer = tokenizer_step(ctx, config.tokenizer_settings(), ontology=ontology,
                                   split=split)
        fitted = {"ontology": ontology, "split": split, "tokenizer": tokenizer}
        train = dataset_step(ctx, config.window_settings(), "train", **fitted, after=tokenizer)
        task = motor_task_step(ctx, config.task_settings(), tokenizer=tokenizer, train=train)
        val = dataset_step(ctx, config.window_settings(), "val", **fitted, after=train)
        self._summarize(split, tokenizer, task, {"train": train, "val": val})

    def _summarize(self, split: Path, tokenizer: Path, task: Path,
                   datasets: dict[str, Path]) -> None:
        subjects = read_split(split)
        self.summary.subjects = subjects.height
        self.summary.vocab_entries = len(Tokenizer.load(tokenizer))
        fitted = MotorTask.load(task)
        self.summary.tasks_kept = fitted.tasks.height
        self.summary.tasks_dropped = fitted.dropped_tasks
        used: set[int] = set()
        for split_name, dataset in datasets.items():
            stats = read_dataset_stats(dataset)
            self.summary.add_dataset(split_name, stats)
            used.update(stats["entries_used"])
        self.summary.vocab_entries_used = len(used)  # train and val together
        if not self.summary.windows.get("val"):
            val = subjects.filter(pl.col("split_name") == "val").height
            log.warning("no validation data: the val split has %d of the %d subject(s) and no "
                        "training window; pretrain will train without evaluation or early "
                        "stopping and keep the last step's weights (add subjects or raise "
                        "val_fraction)", val, subjects.height)


def prepare(meds_dir: Path, work_dir: Path, *, athena_dir: Path | None = None,
            config: PrepareConfig | None = None, workers: int | None = None,
            force: bool = False, progress: bool = True, executor: str = "local",
            ray_address: str | None = None) -> PrepareSummary:
    """Run `ehrmotor prepare`; see the module docstring. Returns the run's summary.

    `executor` "local" runs the shards in `workers` local processes (default: one per core);
    "ray" runs them as Ray tasks on the cluster at `ray_address` (default: the running one, else
    a local Ray instance of `workers` CPUs started and stopped with the run), whose nodes must
    see these paths.
    """
    preparer = Preparer(meds_dir, work_dir, athena_dir, config or PrepareConfig(), workers,
                        force, progress, executor, ray_address)
    return preparer.run()
