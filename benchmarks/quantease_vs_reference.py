"""Does our `quantease` solver compute what the released QuantEase code computes? Runs both on the same real layers
and Hessians and compares the results.

    python benchmarks/quantease_vs_reference.py --reference-dir /path/to/linkedin/QuantEase \
        --model-dir resources/models/smollm2-135m-instruct-q4_1 \
        --calib-text ../shared/assets/datasets/c4/found/yxanul--yxanul_0.6B/c4_validation_2k.parquet

The reference is a checkout of github.com/linkedin/QuantEase (read at e8c7d71), imported from --reference-dir at
run time; nothing of it is part of this project. Both run the paper's setting: no damping, act order, 30 sweeps,
asymmetric min-max grid (per channel, or static groups, which is how our solver groups). The reference times itself
with CUDA events; on a CPU those are replaced by a no-op timer. Prints a line per layer and group size (objective
tr((W - Q) H (W - Q)^T) of ours over the reference's, the fraction of identical weights, and both against LDLQ's)
and appends a summary to results/benchmarks/records.jsonl (`--record`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import types
from pathlib import Path

import torch

from layer_objectives import add_layer_arguments, real_layers
from quantlib.stats.hessian import layer_error
from quantlib.artifacts.atomic import versions
from quantlib.solvers import quantease
from quantlib.solvers.contract import solve_layer
from quantlib.catalog.spec import QuantSpec

import record as record_file  # benchmarks/record.py: where records go


def load_reference(reference_dir: str):
    if not (Path(reference_dir) / "method" / "quantease.py").is_file():
        raise SystemExit(f"{reference_dir} has no method/quantease.py: pass a checkout of linkedin/QuantEase")
    if not torch.cuda.is_available():
        torch.cuda.Event = lambda enable_timing=True: types.SimpleNamespace(record=lambda: None,
                                                                            elapsed_time=lambda other: 0.0)
        torch.cuda.synchronize = lambda: None
    sys.path.insert(0, str(Path(reference_dir).resolve()))
    from method.quant import Quantizer
    from method.quantease import QuantEase
    return QuantEase, Quantizer


def reference_solve(QuantEase, Quantizer, W, H, bits, group_size, iterations):
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    solver = QuantEase(layer, num_iter=iterations)
    solver.XtX = H.clone()
    solver.quantizer = Quantizer()
    solver.quantizer.configure(bits, perchannel=True, sym=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every 3000 columns
        solver.fasterquant(group_size=group_size, static_groups=group_size != -1, actorder=True)
    return layer.weight.data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", required=True, help="a checkout of linkedin/QuantEase")
    add_layer_arguments(ap, 16, [2, 15], 3)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[-1, 64])
    ap.add_argument("--iterations", type=int, default=30)
    record_file.add_argument(ap)
    args = ap.parse_args()
    QuantEase, Quantizer = load_reference(args.reference_dir)
    torch.manual_seed(0)

    model, _, names, hessians, cal = real_layers(args)

    rows = []
    for name in names:
        W, H = model.get_submodule(name).weight.data.float(), hessians[name]
        for gs in args.group_sizes:
            spec = QuantSpec.build("m", "quantease", args.bits, gs, calib=cal,
                                   options={"damp": 0.0, "iterations": args.iterations})
            ours = solve_layer(W, H, spec, name).weight
            ref = reference_solve(QuantEase, Quantizer, W, H, args.bits, gs, args.iterations)
            lq = solve_layer(W, H, QuantSpec.build("m", "ldlq", args.bits, gs, calib=cal), name).weight
            f_ours, f_ref, f_ldlq = (float(layer_error(W, q, H)) for q in (ours, ref, lq))
            row = {"layer": name, "group_size": gs, "ours_over_reference": round(f_ours / f_ref, 5),
                   "identical_weights": round(float(torch.isclose(ours, ref, rtol=1e-5, atol=1e-7).float().mean()), 5),
                   "ours_over_ldlq": round(f_ours / f_ldlq, 4), "reference_over_ldlq": round(f_ref / f_ldlq, 4)}
            print(json.dumps(row), flush=True)
            rows.append(row)

    ratios = [r["ours_over_reference"] for r in rows]
    same = [r["identical_weights"] for r in rows]
    record = {"benchmark": "quantease_vs_reference", "model": Path(args.model_dir).name, "bits": args.bits,
              "group_sizes": args.group_sizes, "blocks": args.blocks, "modules": args.modules,
              "calibration": f"{args.nsamples}x{args.seqlen}", "iterations": args.iterations,
              "objective_ratio_range": [min(ratios), max(ratios)], "identical_weights_min": min(same),
              "rows": rows, "machine": platform.machine(), "versions": versions()}
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}))
    record_file.append(record, args.record)


if __name__ == "__main__":
    main()
