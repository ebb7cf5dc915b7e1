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
measured CPU seconds per event of the whole run (workers and driver) to a cluster's cores, with
the arithmetic shown. The driver's own work does not grow with the rows (the datasets' reduce
only lists the shard files), so it is counted as if it were spread like the rest.
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
SHARED_FS_BYTES_PER_S = 1e9  # aggregate shared-filesystem bandwidth (assumed)
MEDS_PASSES = 6  # ontology, split, tokenizer (2 maps), train and val datasets each read the MEDS
DRIVER_SECONDS = 60.0  # Athena read (bench_athena: ~40 s at 5M concepts) and the fits (assumed)
SHARD_TAIL_STEPS = 6  # each map waits for its last shard


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
    """Wall time and memory of TARGET_EVENTS on NODES × CORES_PER_NODE from one run."""
    events = result["events"]
    cores = NODES * CORES_PER_NODE
    per_event = sum(result["cpu"].values()) / events  # CPU seconds, workers and driver
    compute = per_event * TARGET_EVENTS / cores
    prepared = result["prepared_bytes"] / events * TARGET_EVENTS
    meds = result["meds_bytes"] / events * TARGET_EVENTS
    io = (MEDS_PASSES * meds + prepared) / SHARED_FS_BYTES_PER_S
    shard_events = TARGET_EVENTS / (4 * cores)  # 4 shards per core
    tail = SHARD_TAIL_STEPS * per_event * shard_events
    print(f"\nprojection from {result['meds']} ({events:,} events, {result['executor']}) to "
          f"{TARGET_SUBJECTS:,} subjects / {TARGET_EVENTS:,} events on {NODES} × "
          f"{CORES_PER_NODE} cores:")
    print(f"  compute   {per_event * 1e6:.2f} CPU µs/event × {TARGET_EVENTS:,} / {cores} cores "
          f"= {compute:,.0f} s")
    print(f"  I/O       ({MEDS_PASSES} × {meds / 1e9:.1f} GB MEDS read + {prepared / 1e9:,.0f} GB "
          f"written) / {SHARED_FS_BYTES_PER_S / 1e9:.0f} GB/s shared filesystem = {io:,.0f} s")
    print(f"  tails     {SHARD_TAIL_STEPS} maps × one shard of {shard_events:,.0f} events "
          f"({4 * cores} shards) = {tail:,.0f} s")
    print(f"  driver    Athena read and fits ≈ {DRIVER_SECONDS:.0f} s")
    total = compute + io + tail + DRIVER_SECONDS
    print(f"  wall      ≈ {total:,.0f} s = {total / 60:.1f} min (compute and I/O not overlapped)")
    per_core = result["peak_gib"] / 2
    here = events / len(list(Path(result["meds"]).glob("data/**/*.parquet")))
    scaled = per_core * shard_events / here
    print(f"  memory    {result['peak_gib']:.2f} GiB for 2 workers and the driver here: ≈ "
          f"{per_core:.1f} GiB per core for shards of {here:,.0f} events; shards of "
          f"{shard_events:,.0f} events ≈ {scaled:.1f} GiB per core, "
          f"{CORES_PER_NODE * scaled:.0f} GiB per {CORES_PER_NODE}-core node (upper bound: the "
          "driver's share is counted per core)")


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
