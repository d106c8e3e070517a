"""Time the whole quantize step (load model and calibration, quantize every layer, save) on a real model.

    python benchmarks/quantize_speed.py --model-dir resources/models/smollm2-135m-instruct-q4_1 \
        --calib-text ../shared/assets/datasets/c4/found/yxanul--yxanul_0.6B/c4_validation_2k.parquet \
        --name smollm2-135m-instruct-q4_1.c4.n32.L512.ldlq.w4g64

A GGUF source is converted first with --gguf (not timed). The calibration windows are sampled as the workflow does
(rows 1100-1999 of the C4 subset, GPTQ's document sampler, seed 0) and are not part of the timed step, like in the
workflow, where they are their own artifact. Prints and appends one JSON line to results/benchmarks/records.jsonl (`--record`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from quantlib.access.datasets import calibration_windows, fetch_dataset, read_texts
from quantlib.artifacts.atomic import versions
from quantlib.access.models import fetch_model, load_tokenizer
from quantlib.jobs.steps import quantize
from quantlib.catalog.spec import QuantSpec

import record as record_file  # benchmarks/record.py: where records go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="plain checkpoint dir (created from --gguf if missing)")
    ap.add_argument("--gguf", nargs=2, metavar=("SOURCE_DIR", "FILE"), help="convert this GGUF into --model-dir")
    ap.add_argument("--calib-text", required=True, help="parquet/jsonl with a text column")
    ap.add_argument("--rows", type=int, nargs=2, default=[1100, 2000])
    ap.add_argument("--name", required=True, help="short name to quantize (its model key is only a label)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=1)
    record_file.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if not Path(args.model_dir).exists():
        if not args.gguf:
            raise SystemExit(f"{args.model_dir} does not exist; pass --gguf SOURCE_DIR FILE to create it")
        fetch_model(args.gguf[0], args.model_dir, gguf_file=args.gguf[1])
    spec = QuantSpec.parse(args.name)
    work = Path(tempfile.mkdtemp(prefix="qbench-"))
    loader = "parquet" if args.calib_text.endswith(".parquet") else "json"
    fetch_dataset({"path": loader, "data_files": args.calib_text, "rows": args.rows}, work / "calib.parquet", "calib")
    windows, _ = calibration_windows(read_texts(work / "calib.parquet"), load_tokenizer(args.model_dir), {},
                                     spec.calib.nsamples, spec.calib.seqlen, spec.calib.seed)
    torch.save(windows, work / "calib.pt")

    times = []
    try:
        for i in range(args.repeat):
            t0 = time.perf_counter()
            quantize(args.name, args.model_dir, {"calib": work / "calib.pt"}, work / f"out{i}",
                     {"device": "cpu", "dtype": "float32"})
            times.append(time.perf_counter() - t0)
        diag = json.loads((work / "out0" / "diagnostics.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "benchmark": "quantize_step", "name": args.name, "seconds": [round(t, 2) for t in times],
        "solver_loop_seconds": round(diag["seconds"], 2), "threads": args.threads, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
    }
    print(json.dumps(record))
    record_file.append(record, args.record)


if __name__ == "__main__":
    main()
