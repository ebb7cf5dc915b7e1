"""Forward+backward throughput and peak memory of the MOTOR model on random packed batches.

    python benchmarks/bench_train.py                      # CPU: tiny and small at 2,048 and 16,384
    python benchmarks/bench_train.py --device cuda --presets base --tokens 16384   # GPU, bf16

Each configuration runs in a fresh subprocess so its peak memory is its own (CPU: peak RSS of
the process; CUDA: torch.cuda.max_memory_allocated). Batches mimic prepared data: subjects of
heavy-tailed length packed to the token budget, ~2.3 entries per position, a point every 10
positions, vocabulary 16,384, 8,192 tasks, 8 bins. On CUDA the script also reports model FLOPs
utilisation: (6 × non-embedding parameters + 12 × layers × hidden × attention width) FLOPs per
token, over the GPU's dense bf16 peak (`--peak-tflops`, default 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from ehrmotor.model import MotorConfig, MotorModel

VOCAB, TASKS, BINS = 16_384, 8_192, 8


def random_batch(tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(min(tokens - sum(lengths), max(2, rng.lognormal(5.0, 1.0)))))
    bag_sizes = rng.integers(1, 5, tokens)
    entries = rng.integers(0, VOCAB, int(bag_sizes.sum()))
    segment_ids = np.repeat(np.arange(len(lengths)), lengths)
    points = np.sort(rng.choice(tokens, max(1, tokens // 10), replace=False))
    age = np.concatenate([np.sort(rng.uniform(0, 30_000, n)) for n in lengths])
    return {
        "entries": torch.tensor(entries),
        "weights": torch.tensor(np.repeat(1.0 / bag_sizes, bag_sizes), dtype=torch.float32),
        "bag_offsets": torch.tensor(np.cumsum(bag_sizes) - bag_sizes),
        "time_features": torch.randn(tokens, 3),
        "age_days": torch.tensor(age, dtype=torch.float32),
        "segment_ids": torch.tensor(segment_ids),
        "point_indices": torch.tensor(points),
        "event_days": torch.tensor(rng.exponential(500.0, (len(points), TASKS)),
                                   dtype=torch.float32),
        "is_event": torch.tensor(rng.random((len(points), TASKS)) < 0.02),
    }


def flops_per_token(model: MotorModel, config: MotorConfig) -> float:
    embedding = sum(p.numel() for p in model.embedding.parameters())  # type: ignore[attr-defined]
    dense = model.count_parameters() - embedding
    attention = 12 * config.num_layers * config.hidden_size * config.attention_width
    return 6.0 * dense + attention


def run_one(preset: str, tokens: int, device: str, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    config = MotorConfig.preset(preset, vocab_size=VOCAB, num_tasks=TASKS, num_bins=BINS,
                                bin_edges_days=[0, 30, 90, 180, 365, 730, 1460, 2920],
                                final_layer_size=512)
    model = MotorModel(config).to(device)
    batch = {k: v.to(device) for k, v in random_batch(tokens).items()}
    use_bf16 = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (and compilation on CUDA)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"tokens_per_s": tokens / seconds, "seconds_per_step": seconds, "peak_gib": peak,
            "parameters": model.count_parameters(),
            "flops_per_token": flops_per_token(model, config)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 16384])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.device, args.steps)))
        return
    print(f"device {args.device} ({'bf16' if args.device == 'cuda' else 'fp32'}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'preset':<7}{'tokens':>8}{'params':>14}{'tokens/s':>11}{'s/step':>9}"
          f"{'peak GiB':>10}" + ("{:>8}".format("MFU") if args.device == "cuda" else ""))
    for preset in args.presets:
        for tokens in args.tokens:
            out = subprocess.run(
                [sys.executable, __file__, "--one", preset, str(tokens), "--device", args.device,
                 "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            line = (f"{preset:<7}{tokens:>8}{r['parameters']:>14,}{r['tokens_per_s']:>11,.0f}"
                    f"{r['seconds_per_step']:>9.2f}{r['peak_gib']:>10.2f}")
            if args.device == "cuda":
                mfu = r["tokens_per_s"] * r["flops_per_token"] / (args.peak_tflops * 1e12)
                line += f"{mfu:>8.1%}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
