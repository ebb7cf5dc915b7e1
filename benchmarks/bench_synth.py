"""Throughput and peak memory of `ehrmotor synth`.

    python benchmarks/bench_synth.py --subjects 100000 [--workers 2] [--out DIR] [--keep]

Prints subjects/s, events/s, peak RSS (all processes together) and size on disk.
Target (issue 2): 100k subjects (~10M events) in <= 60 s on 2 cores with <= 3 GB peak RSS.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from memory import PeakMemory  # noqa: E402

from ehrmotor.synthetic import generate  # noqa: E402


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the generated dataset")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_synth_")) / "meds"

    with PeakMemory() as memory:
        started = time.perf_counter()
        generate(out, args.subjects, seed=args.seed, num_shards=args.shards,
                 workers=args.workers, force=True, progress=False)
        seconds = time.perf_counter() - started
    events = sum(pq.read_metadata(f).num_rows for f in (out / "data").rglob("*.parquet"))
    data_bytes = _size_on_disk(out / "data")
    total_bytes = _size_on_disk(out)
    print(f"subjects            {args.subjects:,}")
    print(f"events              {events:,}")
    print(f"seconds             {seconds:.1f}")
    print(f"subjects/s          {args.subjects / seconds:,.0f}")
    print(f"events/s            {events / seconds:,.0f}")
    print(f"peak RSS            {memory.peak_gib:.2f} GiB (all processes)")
    print(f"data on disk        {data_bytes / 2**20:,.1f} MiB (+ metadata and Athena: "
          f"{(total_bytes - data_bytes) / 2**20:,.1f} MiB)")
    if not args.keep:
        shutil.rmtree(out.parent if args.out is None else out)


if __name__ == "__main__":
    main()
