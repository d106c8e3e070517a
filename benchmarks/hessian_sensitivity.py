"""The noise floor of a setting from float round-off alone: quantize the same model on the same calibration windows
twice, once as the workflow does (each chunk's x^T x in float32, summed in float64) and once with every Hessian
product in float64, then compare the perplexities. Any difference is summation order flipping rounding decisions,
which then drift through the later blocks; it bounds how far apart two honest runs on different machines can land.

    python benchmarks/hessian_sensitivity.py --model-dir resources/models/smollm2-135m-instruct-q4_1 \\
        --calib-text resources/datasets/c4.parquet --eval-text resources/datasets/wikitext2.parquet \\
        --name smollm2.c4.n32.L512.ldlq.w3g64

Prints and appends one JSON line to results/benchmarks/records.jsonl (`--record`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import quantlib.stats.hessian as hessian
from quantlib.access.datasets import calibration_windows, eval_windows, read_texts
from quantlib.evaluation.perplexity import perplexity
from quantlib.artifacts.atomic import versions
from quantlib.access.models import load_model, load_tokenizer
from quantlib.runner.walk import quantize_model
from quantlib.catalog.spec import QuantSpec

import record as record_file  # benchmarks/record.py: where records go


def gram64(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    x = x.double()
    return x.T @ x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--calib-text", required=True, help="a dataset artifact (parquet) to draw calibration from")
    ap.add_argument("--eval-text", required=True, help="a dataset artifact (parquet) of the evaluation text")
    ap.add_argument("--name", required=True, help="short name; its calibration part sets the windows")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows (of the name's window length)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    record_file.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = QuantSpec.parse(args.name)
    tok = load_tokenizer(args.model_dir)
    tokens, _ = calibration_windows(read_texts(args.calib_text), tok, {}, spec.calib.nsamples, spec.calib.seqlen,
                                    spec.calib.seed)
    windows, _ = eval_windows(read_texts(args.eval_text), tok, {"join": "\n\n"}, spec.calib.seqlen)
    results = {}
    for mode in ("float32", "float64"):
        if mode == "float64":
            hessian.gram = gram64
        t0 = time.time()
        model = load_model(args.model_dir)
        report = quantize_model(model, spec, tokens, progress=False)
        ppl = perplexity(model, windows, max_windows=args.windows, progress=False)["ppl"]
        results[mode] = {"ppl": ppl, "seconds": round(time.time() - t0, 1),
                         "layer_error_mean": sum(d["rel_error"] for d in report.layers.values()) / len(report.layers)}
        print(f"{mode}: ppl {ppl:.4f}", flush=True)
    rec = {"benchmark": "hessian_sensitivity", "name": args.name, **results,
           "relative_change": results["float64"]["ppl"] / results["float32"]["ppl"] - 1, "windows": args.windows,
           "threads": args.threads, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "versions": versions()}
    print(json.dumps(rec))
    record_file.append(rec, args.record)


if __name__ == "__main__":
    main()
