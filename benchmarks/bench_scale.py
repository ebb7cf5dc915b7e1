"""`prepare` at scale: local executor against a two-node Ray simulation, and a projection.

    python benchmarks/bench_scale.py --meds /tmp/meds100k --meds /tmp/meds1m --json scale.json
    python benchmarks/bench_scale.py --project results.json        # the projection only

For each MEDS folder (make one with `ehrmotor synth --subjects N --out DIR`) and executor, runs
`prepare` with the default settings into a temporary folder and prints seconds per step, events
per second, the peak memory of the whole process tree (this process and every descendant: the
local workers, or the Ray head, raylets and workers of the simulation) and the bytes on disk of
the MEDS data and of the prepared datasets. The Ray run starts `ray.cluster_utils.Cluster` with a
head and a second node of one CPU each on this machine (`pip install ehrmotor[ray]`); both
executors use the same two cores, so the comparison shows Ray's overhead, not a speed-up.

The projection (printed after the runs, or from a saved `--json` with `--project`) scales the
measured CPU seconds per event of the per-shard steps to a cluster, and adds the driver's serial
work (the dataset reduce: hashing the parts and writing the saved dataset, proportional to the
prepared bytes), with the arithmetic shown.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_prepare import StepCpu, disk_bytes  # noqa: E402
from memory import PeakMemory  # noqa: E402

from ehrmotor.prepare import prepare  # noqa: E402

# The projected deployment.
TARGET_SUBJECTS, TARGET_EVENTS = 10_000_000, 1_500_000_000
NODES, CORES_PER_NODE = 32, 16
DRIVER_BYTES_PER_S = 500e6  # hashing + rewriting the datasets on the driver, shared filesystem


def run(meds: Path, executor: str, address: str | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    cpu = StepCpu()
    logger = logging.getLogger("ehrmotor.prepare")
    logger.setLevel(logging.INFO)
    logger.addHandler(cpu)
    try:
        with PeakMemory() as memory:
            started = time.perf_counter()
            summary = prepare(meds, root / "work", athena_dir=meds / "athena", workers=2,
                              progress=False, executor=executor, ray_address=address)
            seconds = time.perf_counter() - started
        files = root / "work" / "pretraining_files"
        prepared = sum(disk_bytes(files / name) for name in ("train_batches", "val_batches"))
        return {"meds": str(meds), "executor": executor, "subjects": summary.subjects,
                "events": summary.events, "seconds": seconds, "steps": dict(summary.seconds),
                "cpu": dict(cpu.seconds), "peak_gib": memory.peak_gib,
                "meds_bytes": disk_bytes(meds / "data"), "prepared_bytes": prepared}
    finally:
        logger.removeHandler(cpu)
        shutil.rmtree(root, ignore_errors=True)


def ray_cluster() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1},
                      shutdown_at_exit=True)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.shutdown()  # prepare connects by itself
    return cluster


def report(result: dict[str, Any]) -> None:
    print(f"\n{result['meds']} ({result['executor']}): {result['subjects']:,} subjects, "
          f"{result['events']:,} events")
    print(f"  {'step':<16}{'wall s':>8}{'CPU s':>8}")
    for step, seconds in result["steps"].items():
        print(f"  {step:<16}{seconds:8.1f}{result['cpu'].get(step, 0.0):8.1f}")
    print(f"  {'total':<16}{result['seconds']:8.1f}{sum(result['cpu'].values()):8.1f}")
    print(f"  events/s {result['events'] / result['seconds']:,.0f}; peak memory (process tree) "
          f"{result['peak_gib']:.2f} GiB")
    print(f"  disk: MEDS {result['meds_bytes'] / 1e9:.2f} GB, prepared "
          f"{result['prepared_bytes'] / 1e9:.2f} GB "
          f"({result['prepared_bytes'] / result['events']:.1f} bytes/event)")


def project(result: dict[str, Any]) -> None:
    """Wall time and memory of TARGET_EVENTS on NODES × CORES_PER_NODE from one local run."""
    events = result["events"]
    cores = NODES * CORES_PER_NODE
    shard_cpu = sum(result["cpu"].values())  # CPU seconds of this run, workers included
    per_event = shard_cpu / events
    parallel = per_event * TARGET_EVENTS / cores
    prepared = result["prepared_bytes"] / events * TARGET_EVENTS
    serial = 2 * prepared / DRIVER_BYTES_PER_S  # read the parts to hash, write the dataset
    print(f"\nprojection from {result['meds']} ({events:,} events, {result['executor']}):")
    print(f"  CPU per event        {shard_cpu:.1f} CPU s / {events:,} = {per_event * 1e6:.2f} µs")
    print(f"  per-shard steps      {per_event * 1e6:.2f} µs × {TARGET_EVENTS:,} events / "
          f"({NODES} nodes × {CORES_PER_NODE} cores) = {parallel / 60:.1f} min")
    print(f"  prepared data        {result['prepared_bytes'] / events:.1f} B/event × "
          f"{TARGET_EVENTS:,} = {prepared / 1e9:,.0f} GB")
    print(f"  driver reduce        2 × {prepared / 1e9:,.0f} GB / {DRIVER_BYTES_PER_S / 1e6:.0f} "
          f"MB/s = {serial / 60:.1f} min (serial)")
    print(f"  wall                 ≈ {(parallel + serial) / 60:.1f} min, with every shard "
          f"job's memory as measured here per worker (peak {result['peak_gib']:.2f} GiB for "
          f"2 workers and the driver: about {result['peak_gib'] / 2:.1f} GiB per core, i.e. "
          f"{result['peak_gib'] / 2 * CORES_PER_NODE:.0f} GiB per {CORES_PER_NODE}-core node "
          "with shards of the same size)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meds", type=Path, action="append", default=[])
    parser.add_argument("--executors", nargs="+", default=["local", "ray"],
                        choices=["local", "ray"])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--project", type=Path, help="project from a saved --json")
    args = parser.parse_args()
    if args.project:
        for result in json.loads(args.project.read_text()):
            project(result)
        return
    results = []
    for meds in args.meds:
        for executor in args.executors:
            cluster = ray_cluster() if executor == "ray" else None
            try:
                result = run(meds, executor, cluster.address if cluster else None)
            finally:
                if cluster is not None:
                    cluster.shutdown()
            report(result)
            results.append(result)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    for result in results:
        if result["executor"] == "local":
            project(result)


if __name__ == "__main__":
    main()
