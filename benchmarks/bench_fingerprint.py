"""Cost of `prepare`'s input fingerprint (a SHA-256 of every input file's whole content).

    python benchmarks/bench_fingerprint.py --meds DIR [--drop-caches]

DIR is a MEDS dataset with its Athena vocabulary in DIR/athena (as `ehrmotor synth` writes).
Prints the seconds of the full-content fingerprint next to the former one (size and last MiB of
each file), for the MEDS files and the Athena files, cold (after dropping the page cache, which
needs root) and warm. Issue 8: measured on 100k subjects.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ehrmotor.artifacts import fingerprint_files
from ehrmotor.meds import data_files
from ehrmotor.prepare import ATHENA_FILES


def tail_fingerprint(files: list[Path], root: Path) -> str:
    """The former fingerprint: relative path, size and the last MiB of each file."""
    digest = hashlib.sha256()
    for path in sorted(files):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as f:
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()


def seconds(fn: Callable[[list[Path], Path], str], files: list[Path], root: Path) -> float:
    started = time.perf_counter()
    fn(files, root)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meds", type=Path, required=True)
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before each cold run (root only)")
    args = parser.parse_args()
    meds = args.meds
    groups = {
        "MEDS": (data_files(meds) + [p for p in (meds / "metadata").glob("*") if p.is_file()],
                 meds),
        "Athena": ([meds / "athena" / name for name in ATHENA_FILES], meds / "athena"),
    }
    print(f"{'fingerprint':22s} {'inputs':7s} {'files':>5s} {'MiB':>7s} {'cold s':>7s} "
          f"{'warm s':>7s}")
    for name, fn in (("size + last MiB", tail_fingerprint), ("full SHA-256", fingerprint_files)):
        for group, (files, root) in groups.items():
            if args.drop_caches:
                subprocess.run(["sync"], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            cold = seconds(fn, files, root)
            warm = min(seconds(fn, files, root) for _ in range(3))
            mib = sum(f.stat().st_size for f in files) / 2**20
            print(f"{name:22s} {group:7s} {len(files):5d} {mib:7.1f} {cold:7.3f} {warm:7.3f}")


if __name__ == "__main__":
    main()
