"""Throughput and peak memory of `ehrmotor prepare` on synthetic data.

    python benchmarks/bench_prepare.py --subjects 100000 [--workers 2] [--keep]

Generates the synthetic dataset (not timed), runs prepare with the default vocabulary and task
sizes, and prints seconds per step, events/s and peak RSS (all processes together).
Target (issue 3): 100k subjects (~10M events) in <= 5 minutes on 2 cores with <= 6 GB peak RSS.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the data and work folders")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    meds = root / "meds"
    generate(meds, args.subjects, seed=args.seed, workers=args.workers, progress=False)

    with PeakMemory() as memory:
        started = time.perf_counter()
        summary = prepare(meds, root / "work", athena_dir=meds / "athena",
                          config=PrepareConfig(), workers=args.workers, progress=False)
        seconds = time.perf_counter() - started
    print(f"subjects (pretraining)  {summary.subjects:,} of {args.subjects:,}")
    print(f"events                  {summary.events:,}")
    for step, step_seconds in summary.seconds.items():
        print(f"  {step:<20}  {step_seconds:7.1f} s")
    print(f"total                   {seconds:.1f} s")
    print(f"events/s                {summary.events / seconds:,.0f}")
    print(f"peak RSS                {memory.peak_gib:.2f} GiB (all processes)")
    for line in summary.lines()[:5]:
        print(f"  {line}")
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
