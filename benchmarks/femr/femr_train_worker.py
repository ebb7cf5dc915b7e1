"""femr 0.2.4's side of `benchmarks/bench_train.py --vs-femr`; runs in femr's own environment.

    VENV/bin/python benchmarks/femr/femr_train_worker.py BATCH.npz --layers 2 --hidden 64 \\
        --heads 4 --intermediate 128 --final-layer 512 --vocab 16384 --tasks 8192 \\
        --bin-edges-days 0 30 90 ... [--attention sdpa|reference]

Reads one packed batch (arrays written by bench_train: the same windows ehrmotor trains on),
builds femr's own model (`FEMRModel`: FEMRTransformer, its Hawk/attention layers, MOTORTaskHead
and loss) and femr's dense MOTOR labels (`MOTORTask.cleanup`), then answers lines on stdin: a
number N runs N training steps (forward, backward, AdamW) and prints one JSON line
{"seconds": s} of their wall time; an empty line or EOF ends it. The first line printed is
{"ready": true, "parameters": n, "loss": x} after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import femr_stand_ins  # noqa: E402

femr_stand_ins.install()
import femr.models.config  # noqa: E402
import femr.models.tasks  # noqa: E402
import femr.models.transformer  # noqa: E402

SECONDS_PER_DAY = 86_400.0


def femr_model(args: argparse.Namespace) -> torch.nn.Module:
    """femr's MOTOR pretraining model of the benchmark's shape (SwiGLU like ehrmotor's)."""
    transformer = femr.models.config.FEMRTransformerConfig(
        vocab_size=args.vocab, is_hierarchical=True, hidden_size=args.hidden,
        intermediate_size=args.intermediate, n_heads=args.heads, n_layers=args.layers,
        hidden_act="swiglu")
    return femr.models.transformer.FEMRModel(femr.models.config.FEMRModelConfig(
        transformer_config=transformer.to_dict(),
        task_config=motor_task(args).get_task_config().to_dict()))


def motor_task(args: argparse.Namespace) -> femr.models.tasks.MOTORTask:
    # femr's bins are in seconds with a last edge of +inf; one rate per task like ehrmotor's -7
    bins = [edge * SECONDS_PER_DAY for edge in args.bin_edges_days] + [float("inf")]
    info = [(f"task/{i}", float(np.exp(-7.0) / SECONDS_PER_DAY)) for i in range(args.tasks)]
    return femr.models.tasks.MOTORTask(info, bins, args.final_layer)


def femr_batch(arrays: dict[str, np.ndarray], task: femr.models.tasks.MOTORTask
               ) -> dict[str, object]:
    """femr's batch (leading dimension 1, as its collate gives it) of the same windows."""
    t = {name: torch.from_numpy(value) for name, value in arrays.items()}
    points = t["point_indices"].long()
    offsets = torch.cat([t["bag_offsets"].long(), torch.tensor([len(t["entries"])])])
    lengths = torch.bincount(t["segment_ids"].long())
    # CSR (point -> task, seconds to the task's next occurrence), rows in point order
    order = torch.from_numpy(np.lexsort((arrays["label_task"], arrays["label_point"])))
    counts = torch.bincount(t["label_point"].long(), minlength=len(points))
    sparse = {"data": (t["label_days"][order] * SECONDS_PER_DAY).float(),
              "indices": t["label_task"][order].int(),
              "indptr": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()}
    labels = task.cleanup({"censor_time": t["censor_days"] * SECONDS_PER_DAY,
                           "time_sparse": sparse})
    transformer = {"hierarchical_tokens": t["entries"].long(), "token_indices": offsets,
                   "hierarchical_weights": t["weights"].float(),
                   "ages": t["age_days"].float(),
                   "time_data": torch.zeros(len(t["segment_ids"]), 5),  # unused: no normed ages
                   "subject_lengths": lengths[lengths > 0], "label_indices": points,
                   "timestamps": torch.zeros(len(t["segment_ids"]), dtype=torch.long)}
    batch = {"subject_ids": t["segment_ids"].long(), "transformer": transformer, "task": labels}
    return add_dimension(batch)  # type: ignore[return-value]


def add_dimension(data: object) -> object:
    if isinstance(data, dict):
        return {key: add_dimension(value) for key, value in data.items()}
    assert isinstance(data, torch.Tensor)
    return data[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", type=Path)
    for name in ("layers", "hidden", "heads", "intermediate", "final-layer", "vocab", "tasks",
                 "threads"):
        parser.add_argument(f"--{name}", type=int, default=0)
    parser.add_argument("--bin-edges-days", type=float, nargs="+", required=True)
    parser.add_argument("--attention", choices=["sdpa", "reference"], default="sdpa")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention == "sdpa":
        femr_stand_ins.use_sdpa_on_cpu()
    torch.manual_seed(0)
    with np.load(args.batch, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    model = femr_model(args).train()
    batch = femr_batch(arrays, motor_task(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # femr's Trainer: adamw_torch

    def step() -> float:
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    loss = step()
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({"ready": True, "parameters": parameters, "loss": loss}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        started = time.perf_counter()
        for _ in range(int(line)):
            step()
        print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main()
