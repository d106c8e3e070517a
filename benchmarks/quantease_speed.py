"""Time QuantEase against LDLQ (= GPTQ) on one large layer: random weights and a random positive-definite Hessian.

    python benchmarks/quantease_speed.py                   # 4096 x 4096, 3 bits per channel, 30 sweeps
    python benchmarks/quantease_speed.py --size 1024 --iterations 5   # a quick check that it runs

Both solvers get the same W and H (the Hessian of 2 * size Gaussian tokens mixed by a random matrix, so columns
are correlated). Prints and appends one JSON line to results/benchmarks/records.jsonl (`--record`): the seconds of each solver, their
ratio and the layer objective each reached. The CPU's load at the time is part of the record's meaning: note it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from quantlib.stats.hessian import add_damping, layer_error
from quantlib.artifacts.atomic import versions
from quantlib.solvers.contract import solve_layer
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

import record as record_file  # benchmarks/record.py: where records go


def problem(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * size, size, generator=g) @ (torch.eye(size) + torch.randn(size, size, generator=g) / size ** 0.5)
    return torch.randn(size, size, generator=g), X.T @ X / X.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="the condition of the measurement, e.g. 'CPU shared with 4 jobs'")
    record_file.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    W, H = problem(args.size, args.seed)
    calib = CalibSpec("random", 1, 2)  # names only: H is given
    results = {}
    for solver, options in (("ldlq", {}), ("quantease", {"iterations": args.iterations})):
        spec = QuantSpec.build("bench", solver, args.bits, args.group_size, calib=calib, options=options)
        t0 = time.perf_counter()
        result = solve_layer(W, H, spec, "bench")
        seconds = time.perf_counter() - t0
        results[solver] = {"seconds": round(seconds, 2),
                           "objective": layer_error(W, result.weight, add_damping(H, spec.opt("damp")))}
        print(f"{spec.short_name()}: {seconds:.2f} s", flush=True)
    record = {
        "benchmark": "quantease_vs_ldlq", "size": args.size, "bits": args.bits, "group_size": args.group_size,
        "iterations": args.iterations, **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
        "ratio": round(results["quantease"]["seconds"] / results["ldlq"]["seconds"], 2), "note": args.note,
        "threads": args.threads, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "versions": versions(),
    }
    print(json.dumps(record))
    record_file.append(record, args.record)


if __name__ == "__main__":
    main()
