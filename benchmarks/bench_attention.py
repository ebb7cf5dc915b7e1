"""Peak memory and time of local attention (forward + backward) as the packed batch grows.

    python benchmarks/bench_attention.py [--tokens 2048 16384] [--backends blockwise naive]

Each (backend, tokens) runs in a fresh subprocess; peak RSS minus the RSS before the call is
the attention's own memory. Blockwise local attention should grow linearly (constant bytes per
token); the dense reference grows quadratically and is skipped above `--naive-max` tokens.
12 heads of 64, width 496, subjects of heavy-tailed length, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ehrmotor.model import blockwise_local_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from model_reference import naive_local_attention  # noqa: E402  (the dense reference)

HEADS, HEAD_DIM, WIDTH = 12, 64, 496


def run_one(backend: str, tokens: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(min(tokens - sum(lengths), max(2, rng.lognormal(5.0, 1.0)))))
    segment_ids = torch.tensor(np.repeat(np.arange(len(lengths)), lengths))
    q, k, v = (torch.randn(tokens, HEADS, HEAD_DIM, requires_grad=True) for _ in range(3))
    attend = blockwise_local_attention if backend == "blockwise" else naive_local_attention
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    attend(q, k, v, segment_ids, WIDTH).sum().backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "extra_mib": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 4096, 8192, 16384])
    parser.add_argument("--backends", nargs="+", default=["blockwise", "naive"])
    parser.add_argument("--naive-max", type=int, default=8192)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return
    print(f"{'backend':<10}{'tokens':>8}{'seconds':>9}{'memory MiB':>12}{'KiB/token':>11}")
    for backend in args.backends:
        for tokens in args.tokens:
            if backend == "naive" and tokens > args.naive_max:
                continue
            out = subprocess.run([sys.executable, __file__, "--one", backend, str(tokens)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{backend:<10}{tokens:>8}{r['seconds']:>9.2f}{r['extra_mib']:>12.0f}"
                  f"{r['extra_mib'] * 1024 / tokens:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
