"""Throughput and peak memory of `ehrmotor prepare` on synthetic data.

    python benchmarks/bench_prepare.py --subjects 100000 [--workers 2] [--keep]
                                       [--candidate-tasks 256]
    python benchmarks/bench_prepare.py --meds DIR        # an existing MEDS folder (kept)

Generates the synthetic dataset (not timed), runs prepare with the default vocabulary and task
sizes, and prints wall and CPU seconds per step (CPU: this process and its workers, from /proc;
steady where other jobs share the cores and wall seconds are not), events/s, peak RSS (all
processes together) and the bytes on disk of the MEDS data and of the prepared datasets (also per
MEDS event of the split's subjects).
Targets: 100k subjects (~13M events) in <= 45 s on 2 cores, with the defaults and with 256 tasks
(issue 11); <= 3 GB peak RSS and <= 40 bytes per event (issue 12).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import PeakMemory  # noqa: E402

from ehrmotor.config import PrepareConfig  # noqa: E402
from ehrmotor.prepare import prepare  # noqa: E402
from ehrmotor.synthetic import generate  # noqa: E402


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (0 without /proc)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime, stime
    family = {os.getpid()}
    while grown := {pid for pid, parent in parents.items() if parent in family} - family:
        family |= grown
    return sum(ticks.get(pid, 0) for pid in family) / os.sysconf("SC_CLK_TCK")


class StepCpu(logging.Handler):
    """CPU seconds per prepare step, sampled at each step's closing log line ("NAME: built ...")."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}
        self.last = tree_cpu_seconds()

    def emit(self, record: logging.LogRecord) -> None:
        step, _, rest = record.getMessage().partition(": ")
        if rest.startswith(("built ", "loaded ")):
            now = tree_cpu_seconds()
            self.seconds[step] = now - self.last
            self.last = now


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def column_bytes(folders: list[Path]) -> dict[str, int]:
    """Bytes of each column (its Arrow buffers: values, offsets, validity) in the datasets'
    shard files under `folders`, read as memory-mapped streams."""
    import pyarrow as pa

    sizes: dict[str, int] = {}
    for folder in folders:
        for path in sorted(folder.glob("data-*.arrow")):
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
            for name in table.column_names:
                sizes[name] = sizes.get(name, 0) + table.column(name).nbytes
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--candidate-tasks", type=int, default=PrepareConfig().candidate_tasks)
    parser.add_argument("--meds", type=Path, help="an existing MEDS folder (with athena/)")
    parser.add_argument("--keep", action="store_true", help="keep the data and work folders")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    meds = args.meds or root / "meds"
    if args.meds is None:
        generate(meds, args.subjects, seed=args.seed, workers=args.workers, progress=False)

    cpu = StepCpu()
    logger = logging.getLogger("ehrmotor.prepare")
    logger.setLevel(logging.INFO)
    logger.addHandler(cpu)
    with PeakMemory() as memory:
        started = time.perf_counter()
        summary = prepare(meds, root / "work", athena_dir=meds / "athena",
                          config=PrepareConfig(candidate_tasks=args.candidate_tasks),
                          workers=args.workers, progress=False)
        seconds = time.perf_counter() - started
    print(f"subjects (pretraining)  {summary.subjects:,}; {args.candidate_tasks:,} candidate tasks")
    print(f"events                  {summary.events:,}")
    print(f"{'step':<22}  {'wall':>7}  {'CPU':>7}")
    for step, step_seconds in summary.seconds.items():
        print(f"  {step:<20}  {step_seconds:7.1f}  {cpu.seconds.get(step, 0.0):7.1f} s")
    print(f"total                   {seconds:7.1f}  {sum(cpu.seconds.values()):7.1f} s")
    print(f"events/s                {summary.events / seconds:,.0f}")
    print(f"peak RSS                {memory.peak_gib:.2f} GiB (all processes)")
    print(f"MEDS data/              {disk_bytes(meds / 'data'):,} bytes")
    prepared = 0
    for name in ("train_batches", "val_batches"):
        size = disk_bytes(root / "work" / "pretraining_files" / name)
        prepared += size
        print(f"{name + '/':<22}  {size:,} bytes ({size / 2**20:.1f} MiB)")
    print(f"prepared bytes/event    {prepared / summary.events:.1f}")
    folders = [root / "work" / "pretraining_files" / name
               for name in ("train_batches", "val_batches")]
    columns = column_bytes(folders)
    print("  by column (bytes/event, share): " + ", ".join(
        f"{name} {size / summary.events:.1f} ({size / max(sum(columns.values()), 1):.0%})"
        for name, size in sorted(columns.items(), key=lambda item: -item[1])))
    for line in summary.lines()[:5]:
        print(f"  {line}")
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
