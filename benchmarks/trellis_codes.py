"""QTIP's three codes on real layers: 1MAD, 3INST (computed, one weight per state) and HYB (a stored table of 2^Q
2-D points, two weights per state), each inside the same BlockLDLQ with the same incoherence processing, L and k.

    python benchmarks/trellis_codes.py --model-dir resources/models/smollm2-135m-instruct-q4_1 \
        --calib-text resources/datasets/c4.parquet --calib-rows 0 900 \
        --trellis-L 8 --hyb-bits 7

Each layer is solved with the Hessian of the FP model's inputs on the calibration windows; prints per layer and code
the objective tr((W - Q) H (W - Q)^T) relative to 1MAD's, the relative error against tr(W H W^T), the bits per
weight and the solve time, and records the medians per layer type.

`--gaussian-L 8 12 16` instead quantizes i.i.d. standard Gaussian sequences of 256 weights (QTIP's synthetic test,
tail-biting, the sequence's weights in order) with each code at each L, at the best of a few scales of the code's
RMS, and records the mean squared error per weight (scalar Lloyd-Max at 2 bits: 0.1175); HYB with Q = min(Q, L - 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from layer_objectives import add_layer_arguments, real_layers
from quantlib.artifacts.atomic import versions
from quantlib.catalog.spec import QuantSpec
from quantlib.formats.trellis import Trellis
from quantlib.solvers.contract import solve_layer
from quantlib.stats.hessian import layer_error

import record as record_file  # benchmarks/record.py: where records go


def gaussian_mse(Ls: list[int], k: int, hyb_bits: int, sequences: int, record_path: Path) -> None:
    """MSE per weight of each code on i.i.d. N(0, 1) sequences of 256, at the best of a few scales."""
    X = torch.randn(sequences, 256, generator=torch.Generator().manual_seed(0))
    mse = {}
    for L in Ls:
        codes = {"1mad": Trellis(L, k, 1, "1mad"), "3inst": Trellis(L, k, 1, "3inst")}
        if L > 2 * k + 1:  # HYB needs L > Q and L > k V; Q capped at L - 1
            codes[f"hyb.Q{min(hyb_bits, L - 1)}"] = Trellis(L, k, 2, "hyb", min(hyb_bits, L - 1))
        for code, trellis in codes.items():
            t0, best = time.perf_counter(), float("inf")
            for c in (0.85, 0.9, 0.95, 1.0):  # x -> x * s, quantize, divide back: the code's scale against N(0, 1)
                s = trellis.rms() * c
                best = min(best, float((X - trellis.quantize(X * s)[1] / s).square().mean()))
            mse[f"L{L}.{code}"] = round(best, 5)
            print(json.dumps({"L": L, "code": code, "mse": mse[f"L{L}.{code}"],
                              "s": round(time.perf_counter() - t0, 1)}), flush=True)
    record = {"benchmark": "trellis_codes_gaussian", "bits": k, "hyb_bits": hyb_bits, "sequences": f"{sequences}x256",
              "mse": mse, "machine": platform.machine(), "versions": versions()}
    print(json.dumps(record))
    record_file.append(record, record_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussian-L", type=int, nargs="+", help="the synthetic test at these L (no model read)")
    synthetic = ap.parse_known_args()[0].gaussian_L
    add_layer_arguments(ap, 32, [2, 15, 28], 2,
                        ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"),
                        required=not synthetic)  # the synthetic test reads no model and no text
    ap.add_argument("--trellis-L", type=int, default=8)
    ap.add_argument("--hyb-bits", type=int, default=7, help="HYB's Q (below L; the paper's 9 needs L >= 10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sequences", type=int, default=64, help="Gaussian sequences of 256 weights")
    record_file.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.gaussian_L:
        return gaussian_mse(args.gaussian_L, args.bits, args.hyb_bits, args.sequences, args.record)

    model, _, names, H_cal, cal = real_layers(args)
    codes = {"1mad": {"code_1mad": True}, "3inst": {"code_3inst": True}, "hyb": {"hyb_bits": args.hyb_bits}}
    per_type = defaultdict(list)  # (layer type, code): each layer's row
    for name in names:
        W, H = model.get_submodule(name).weight.data.float(), H_cal[name]
        ref = float(((W.double() @ H.double()) * W.double()).sum())
        err, row = {}, {}
        for code, options in codes.items():
            spec = QuantSpec.build("m", "qtip", args.bits, calib=cal,
                                   options={"trellis_L": args.trellis_L, **options})
            t0 = time.perf_counter()
            result = solve_layer(W, H, spec, name)
            dt = time.perf_counter() - t0
            err[code] = float(layer_error(W, result.weight, H))
            row[code] = {"rel_error": round(err[code] / ref, 5), "s": round(dt, 1),
                         "bits": round(result.rep.bits_per_weight, 4)}
        kind = name.rsplit(".", 1)[-1]
        for code in codes:
            row[code]["vs_1mad"] = round(err[code] / err["1mad"], 4)
            per_type[(kind, code)].append(row[code])
        print(json.dumps({"layer": name, **row}), flush=True)

    def median(rows, key, digits):
        return round(statistics.median(r[key] for r in rows), digits)

    summary = defaultdict(dict)
    for (kind, code), rows in sorted(per_type.items()):
        summary[kind][code] = {"median_vs_1mad": median(rows, "vs_1mad", 3),
                               "median_rel_error": median(rows, "rel_error", 5),
                               "median_s": median(rows, "s", 1), "bits_per_weight": median(rows, "bits", 4)}
    record = {"benchmark": "trellis_codes", "model": Path(args.model_dir).name, "bits": args.bits,
              "trellis_L": args.trellis_L, "hyb_bits": args.hyb_bits,
              "blocks": args.blocks, "calibration": f"{args.nsamples}x{args.seqlen}", "threads": args.threads,
              "per_layer_type": summary, "machine": platform.machine(), "versions": versions()}
    print(json.dumps(record))
    record_file.append(record, args.record)


if __name__ == "__main__":
    main()
