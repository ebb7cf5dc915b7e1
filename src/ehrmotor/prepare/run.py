"""`ehrmotor prepare`: MEDS + Athena → ontology, split, tokenizer, MOTOR task, tokenised datasets.

Artifacts in `WORK/pretraining_files/` (each written to a temporary path and renamed, each with a
`<name>.manifest.json` recording config, input fingerprint and format version):

    config.json                resolved PrepareConfig
    ontology/                  see `ehrmotor.prepare.ontology`
    split.csv                  see `ehrmotor.prepare.split`
    tokenizer/dictionary.msgpack   see `ehrmotor.prepare.tokenizer`
    motor_task.json            see `ehrmotor.prepare.motor_task`
    train_batches/, val_batches/   Hugging Face datasets (save_to_disk, torch format), one row
                               per training window; see `ehrmotor.prepare.examples`

A step whose artifact exists with the same manifest is loaded, not rebuilt; a different manifest
stops with a message naming what changed. Per-shard work runs in worker processes (spawned), so
memory is bounded by the largest shard, not the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import Executor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl
from tqdm import tqdm

from ehrmotor import artifacts
from ehrmotor.config import PrepareConfig, config_dict
from ehrmotor.errors import InputError
from ehrmotor.lock import work_lock
from ehrmotor.meds import (
    MedsError,
    data_files,
    read_codes_metadata,
    read_subject_splits,
    require_valid,
)
from ehrmotor.prepare.datasets import finish_dataset
from ehrmotor.prepare.motor_task import MotorTask, TaskCounts, candidate_tasks
from ehrmotor.prepare.ontology import Ontology
from ehrmotor.prepare.positions import time_stats_from_moments
from ehrmotor.prepare.shards import (
    ShardJob,
    shard_codes,
    shard_dataset,
    shard_subjects,
    shard_task_counts,
    shard_tokenizer_bins,
    shard_tokenizer_counts,
)
from ehrmotor.prepare.split import read_split, split_subjects, write_split
from ehrmotor.prepare.tokenizer import Tokenizer, fit_numeric_edges
from ehrmotor.processes import process_pool

log = logging.getLogger(__name__)
T = TypeVar("T")
ATHENA_FILES = ("CONCEPT.csv", "CONCEPT_RELATIONSHIP.csv", "CONCEPT_ANCESTOR.csv")


class PrepareError(InputError):
    """Bad input for prepare (one line); the CLI exits with status 2."""


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
    peak_rss_gib: float = 0.0  # largest single process (this one or a worker)

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
            f"peak memory {self.peak_rss_gib:.2f} GiB (largest process)",
        ]


def _fingerprint_inputs(meds_dir: Path, athena_dir: Path | None) -> dict[str, str]:
    files = data_files(meds_dir)
    metadata = [p for p in (meds_dir / "metadata").glob("*") if p.is_file()]
    inputs = {"meds": artifacts.fingerprint_files(files + metadata, meds_dir)}
    if athena_dir is not None:
        inputs["athena"] = artifacts.fingerprint_files(
            [athena_dir / name for name in ATHENA_FILES], athena_dir)
    return inputs


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class Preparer:
    """Runs the five steps, loading finished artifacts and building the missing ones."""

    def __init__(self, meds_dir: Path, work_dir: Path, athena_dir: Path | None,
                 config: PrepareConfig, workers: int | None, force: bool, progress: bool):
        self.meds_dir = Path(meds_dir)
        self.athena_dir = Path(athena_dir) if athena_dir else None
        self.out = Path(work_dir) / "pretraining_files"
        self.config = config
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.force = force
        self.progress = progress
        self.summary = PrepareSummary()
        self.upstream = ""  # digest of the previous step's manifest, chaining the steps

    # ------------------------------------------------------------------ helpers
    def _map(self, pool: Executor, fn: Callable[[ShardJob], T], jobs: list[ShardJob],
             desc: str) -> list[T]:
        futures = [pool.submit(fn, job) for job in jobs]
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

    def _step(self, name: str, artifact: Path, config: dict[str, Any], fmt: int,
              build: Callable[[Path], None]) -> bool:
        """Build `artifact` unless current; returns True when it was built."""
        manifest = artifacts.make_manifest(name, fmt, config,
                                           {**self.inputs, "upstream": self.upstream})
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
        self.summary.seconds[name] = time.perf_counter() - started
        log.info("%s: %s %s", name, "built" if built else "loaded", artifact)
        # The package version is left out: a new release alone must not invalidate artifacts.
        self.upstream = _digest({k: v for k, v in manifest.items() if k != "ehrmotor_version"})
        return built

    # ------------------------------------------------------------------ run
    def run(self) -> PrepareSummary:
        artifacts.check_output(self.out.parent, "folder")
        self._check_inputs()  # before anything is created
        created = [folder for folder in (self.out.parent, self.out) if not folder.exists()]
        try:
            with work_lock(self.out.parent, "prepare"):
                artifacts.check_output(self.out, "folder")
                self.out.mkdir(exist_ok=True)
                for stale in artifacts.clean_stale_temporaries(self.out):
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
        if self.athena_dir is not None:
            missing = [n for n in ATHENA_FILES if not (self.athena_dir / n).is_file()]
            if missing:
                raise PrepareError(f"{self.athena_dir}: Athena folder lacks {', '.join(missing)}")

    def _run(self) -> PrepareSummary:
        self.inputs = _fingerprint_inputs(self.meds_dir, self.athena_dir)
        files = data_files(self.meds_dir)
        with process_pool(min(self.workers, len(files))) as pool:
            self._run_steps(pool, files)
        resolved = self.out / "config.json"
        if not resolved.exists() or json.loads(resolved.read_text()) != config_dict(self.config):
            artifacts.write_json(resolved, config_dict(self.config))
        kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        self.summary.peak_rss_gib = kib / 2**20
        return self.summary

    def _run_steps(self, pool: Executor, files: list[Path]) -> None:
        cfg = self.config
        excluded = self._excluded_subjects()
        jobs = [ShardJob(path=f, meds_dir=self.meds_dir, work=self.out, excluded=excluded,
                         config=cfg, index=i, shards=len(files)) for i, f in enumerate(files)]

        # 1. ontology
        def build_ontology(tmp: Path) -> None:
            found = self._map(pool, shard_codes, jobs, "ontology: data codes")
            codes = pl.concat(found).unique().sort("code")
            ontology = Ontology.build(codes["code"], athena_dir=self.athena_dir,
                                      codes_metadata=read_codes_metadata(self.meds_dir),
                                      remove_vocabularies=cfg.remove_vocabularies)
            tmp.mkdir()
            ontology.save(tmp)
        self._step("ontology", self.out / "ontology",
                   {"remove_vocabularies": list(cfg.remove_vocabularies),
                    "athena": self.athena_dir is not None}, 1, build_ontology)

        # 2. split
        def build_split(tmp: Path) -> None:
            subjects = pl.concat(self._map(pool, shard_subjects, jobs, "split: subjects"))
            if subjects.height == 0:
                raise PrepareError(f"{self.meds_dir}: no subjects left for pretraining after "
                                   f"excluding splits {list(cfg.exclude_splits)}")
            write_split(split_subjects(subjects["subject_id"].to_numpy(), cfg.split_seed,
                                       cfg.val_fraction), tmp)
        self._step("split", self.out / "split.csv",
                   {"seed": cfg.split_seed, "val_fraction": cfg.val_fraction,
                    "exclude_splits": list(cfg.exclude_splits)}, 1, build_split)
        split = read_split(self.out / "split.csv")
        if split.filter(pl.col("split_name") == "train").height == 0:
            raise PrepareError(f"{self.out / 'split.csv'}: the train split is empty")
        self.summary.subjects = split.height

        # 3. tokenizer
        def build_tokenizer(tmp: Path) -> None:
            counts = self._map(pool, shard_tokenizer_counts, jobs, "tokenizer: counts")
            edges = fit_numeric_edges([c.numeric_samples for c, _ in counts], cfg.numeric_bins,
                                      cfg.numeric_sample_size)
            bin_jobs = [job.with_edges(edges) for job in jobs]
            bins = self._map(pool, shard_tokenizer_bins, bin_jobs, "tokenizer: numeric bins")
            tokenizer = Tokenizer.fit([c for c, _ in counts], bins, edges,
                                      Ontology.load(self.out / "ontology"),
                                      vocab_size=cfg.vocab_size, min_fraction=cfg.min_fraction,
                                      min_text_fraction=cfg.min_text_fraction)
            tokenizer.time_stats = time_stats_from_moments(np.sum([m for _, m in counts], axis=0))
            tokenizer.save(tmp)
        self._step("tokenizer", self.out / "tokenizer",
                   {k: getattr(cfg, k) for k in ("vocab_size", "min_fraction", "numeric_bins",
                                                 "numeric_sample_size", "min_text_fraction",
                                                 "seed")},
                   1, build_tokenizer)
        tokenizer = Tokenizer.load(self.out / "tokenizer")
        self.summary.vocab_entries = len(tokenizer)

        # 4. MOTOR task
        def build_task(tmp: Path) -> None:
            counts: list[TaskCounts] = self._map(pool, shard_task_counts, jobs,
                                                 "MOTOR task: labels")
            task = MotorTask.fit(candidate_tasks(tokenizer, cfg.num_tasks), counts,
                                 num_bins=cfg.num_bins, final_layer_size=cfg.final_layer_size,
                                 min_task_events=cfg.min_task_events,
                                 min_task_fraction=cfg.min_task_fraction)
            task.save(tmp)
        self._step("motor_task", self.out / "motor_task.json",
                   {k: getattr(cfg, k) for k in ("num_tasks", "num_bins", "final_layer_size",
                                                 "min_task_events", "min_task_fraction",
                                                 "max_window", "seed")},
                   1, build_task)
        task = MotorTask.load(self.out / "motor_task.json")
        if task.tasks.height == 0:
            raise PrepareError(
                f"{self.out / 'motor_task.json'}: no MOTOR task has at least "
                f"{cfg.min_task_events} train events; lower min_task_events or add subjects")
        self.summary.tasks_kept = task.tasks.height
        self.summary.tasks_dropped = task.dropped_tasks

        # 5. datasets
        used: set[int] = set()
        for split_name in ("train", "val"):

            def build_dataset(tmp: Path, split_name: str = split_name) -> None:
                tmp.mkdir()
                split_jobs = [job.for_split(split_name, tmp) for job in jobs]
                shards = self._map(pool, shard_dataset, split_jobs, f"datasets: {split_name}")
                finish_dataset(tmp, len(split_jobs))
                stats = {"windows": sum(s.windows for s in shards),
                         "points": sum(s.points for s in shards),
                         "events": sum(s.events for s in shards),
                         "skipped_windows": sum(s.skipped_windows for s in shards),
                         "skipped_subjects": sum(s.skipped_subjects for s in shards),
                         "subjects_born_late": sum(s.subjects_born_late for s in shards),
                         "events_before_birth": sum(s.events_before_birth for s in shards),
                         "entries_used": sorted(set().union(*(s.entries_used for s in shards)))}
                (tmp / "prepare_stats.json").write_text(json.dumps(stats))
            self._step(f"{split_name}_batches", self.out / f"{split_name}_batches",
                       {"max_window": cfg.max_window, "seed": cfg.seed}, 1, build_dataset)
            stats = json.loads((self.out / f"{split_name}_batches" / "prepare_stats.json")
                               .read_text())
            self.summary.windows[split_name] = stats["windows"]
            self.summary.prediction_points[split_name] = stats["points"]
            self.summary.events += stats["events"]
            self.summary.skipped_windows += stats["skipped_windows"]
            self.summary.skipped_subjects += stats["skipped_subjects"]
            # .get: prepare_stats.json written before these counts existed still loads.
            born_late, before_birth = (stats.get("subjects_born_late", 0),
                                       stats.get("events_before_birth", 0))
            self.summary.subjects_born_late += born_late
            self.summary.events_before_birth += before_birth
            if born_late:
                log.warning("%s: %d subject(s) have %d timed event(s) before their MEDS_BIRTH "
                            "event; they were folded into the birth position (run ehrmotor "
                            "validate for an example)", split_name, born_late, before_birth)
            used.update(stats["entries_used"])
            self.summary.vocab_entries_used = len(used)  # train and val together

    def _excluded_subjects(self) -> np.ndarray:
        splits = read_subject_splits(self.meds_dir)
        if splits is None or not self.config.exclude_splits:
            return np.array([], dtype=np.int64)
        excluded = splits.filter(pl.col("split").is_in(list(self.config.exclude_splits)))
        return excluded["subject_id"].to_numpy()


def prepare(meds_dir: Path, work_dir: Path, *, athena_dir: Path | None = None,
            config: PrepareConfig | None = None, workers: int | None = None,
            force: bool = False, progress: bool = True) -> PrepareSummary:
    """Run `ehrmotor prepare`; see the module docstring. Returns the run's summary."""
    preparer = Preparer(meds_dir, work_dir, athena_dir, config or PrepareConfig(), workers,
                        force, progress)
    return preparer.run()
