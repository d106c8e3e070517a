"""Time the NeUQI parameter init on one realistic layer: 4096 x 4096, g128 (random weights, a random positive
diag(H)), the shape of a Llama-2-7B attention projection.

    python benchmarks/neuqi_init.py [--bits 2] [--init neuqi] [--rows 4096] [--threads N]

`--rows` times only the first rows (rows are independent; the record gives the measured time and the time scaled
to the full layer, and says which). Prints and appends one JSON line to results/benchmarks/records.jsonl (`--record`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from quantlib.solvers.grid_init import group_weights, init_grid, minmax_init, weighted_error
from quantlib.artifacts.atomic import versions
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

import record as record_file  # benchmarks/record.py: where records go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="neuqi", choices=["neuqi", "neuqi_int"])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--d-in", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=4096, help="rows timed (the layer has 4096)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--note", default="", help="condition of the measurement, e.g. 'CPU shared'")
    record_file.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    W = torch.randn(args.rows, args.d_in, generator=g) * 0.02
    hdiag = torch.rand(args.d_in, generator=g) + 0.01
    spec = QuantSpec.build("bench", "ldlq", args.bits, args.group_size, args.init, calib=CalibSpec("c4", 128, 2048))
    t0 = time.perf_counter()
    grid = init_grid(W, spec, hdiag)
    seconds = time.perf_counter() - t0
    h = group_weights(hdiag, args.d_in, args.group_size, True)
    gain = float(weighted_error(W, grid, h).sum() / weighted_error(W, minmax_init(W, spec), h).sum())
    record = {
        "benchmark": "init", "name": spec.short_name(), "shape": [4096, args.d_in], "rows_timed": args.rows,
        "seconds": round(seconds, 2), "seconds_full_layer": round(seconds * 4096 / args.rows, 1),
        "objective_vs_minmax": round(gain, 4), "threads": args.threads, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "note": args.note, "versions": versions(),
    }
    print(json.dumps(record))
    record_file.append(record, args.record)


if __name__ == "__main__":
    main()
