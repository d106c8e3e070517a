"""Block-wise training on one real decoder block: the time of a training step and the block's output error on
held-out windows, for each short name given (block-wise solvers such as flexround and uniquanf, and data-free ones
such as rtn or alternating for comparison).

    python benchmarks/blockwise_speed.py --model-dir resources/models/smollm2-135m-instruct-q4_1 \\
        --calib-text resources/datasets/c4.parquet --eval-text resources/datasets/wikitext2.parquet --block 10 \\
        --names smollm2.rtn.w3 smollm2.c4.n32.L512.flexround.w3.ep5 smollm2.c4.n32.L512.uniquanf.w3.ep5

The earlier blocks stay in full precision, so the block's inputs are the FP model's (the two streams of the block
mode are equal and input mixing is moot): the figures isolate what the quantizer and its training do to one block.
Training runs exactly as in a quantize job (`quantlib.runner.blockwise`, same seed rule). The held-out error is
sum (B_q(x) - B(x))^2 / sum B(x)^2 over the first `--heldout` windows of the evaluation text, windows of the
calibration's length. Prints and appends one JSON line per name to results/benchmarks/records.jsonl (`--record`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

from quantlib.stats import capture
from quantlib.runner.blockwise import Stream, _block_error, _reconstruct_block
from quantlib.access.datasets import calibration_windows, eval_windows, read_texts
from quantlib.artifacts.atomic import versions
from quantlib.access.adapters import adapter_for
from quantlib.access.models import load_model, load_tokenizer
from quantlib.runner.group import QuantizedModelReport
from quantlib.solvers.contract import LayerSolver
from quantlib.catalog.spec import QuantSpec

import record as record_file  # benchmarks/record.py: where records go


def inputs_of_block(model, adapter, tokens: torch.Tensor, k: int) -> list[tuple[torch.Tensor, dict]]:
    """Block k's inputs in the FP model, one window per entry."""
    blocks = adapter.block_list(model)
    with torch.no_grad():
        states = capture.block_inputs(model, blocks, tokens, 1, "cpu")
        for block in blocks[:k]:
            states = [(capture.block_output(block, h, kw), kw) for h, kw in states]
    return states


def quantize_block(block, adapter, spec, states, k: int, seed: int) -> dict:
    """Quantize `block` in place as the runner would; returns the block-mode diagnostics (training time, steps)."""
    if spec.mode == "block":
        solver = LayerSolver(spec)
        x_q, x_fp = Stream("memory"), Stream("memory")
        for h, _ in states:
            x_q.append(h)
            x_fp.append(h)
        report = QuantizedModelReport()
        _reconstruct_block(k, adapter, block, spec, solver, solver.solve, x_q, x_fp, [kw for _, kw in states],
                           "cpu", report, lambda *a: None, seed, "memory", None)
        return report.blocks[0]
    if spec.mode != "data_free":
        raise SystemExit(f"{spec.describe()}: this benchmark runs block-wise and data-free methods only")
    solver = LayerSolver(spec)
    t0 = time.time()
    for name, linear in dict(adapter.linears(block)).items():
        linear.weight.data.copy_(solver(linear.weight.data.float(), None, name).weight)
    return {"seconds": round(time.time() - t0, 2), "steps": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--calib-text", required=True, help="a dataset artifact (parquet) to draw calibration from")
    ap.add_argument("--eval-text", required=True, help="a dataset artifact (parquet) of the held-out text")
    ap.add_argument("--names", nargs="+", required=True,
                    help="short names; the first one with a calibration part sets the windows")
    ap.add_argument("--block", type=int, default=10, help="index of the decoder block (0-based)")
    ap.add_argument("--heldout", type=int, default=8, help="held-out windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    record_file.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    specs = [QuantSpec.parse(n) for n in args.names]
    calib = next((s.calib for s in specs if s.calib is not None), None)
    if calib is None:
        raise SystemExit("none of the names has a calibration part (e.g. .c4.n32.L512.) to set the windows")
    tok = load_tokenizer(args.model_dir)
    tokens, _ = calibration_windows(read_texts(args.calib_text), tok, {}, calib.nsamples, calib.seqlen, calib.seed)
    held, _ = eval_windows(read_texts(args.eval_text), tok, {"join": "\n\n"}, calib.seqlen)
    held = held[:args.heldout]

    model = load_model(args.model_dir)
    adapter = adapter_for(model)
    fp_block = adapter.block_list(model)[args.block]
    train_states = inputs_of_block(model, adapter, tokens, args.block)
    held_states = inputs_of_block(model, adapter, held, args.block)
    with torch.no_grad():
        train_ref = [capture.block_output(fp_block, h, kw) for h, kw in train_states]
        held_ref = [capture.block_output(fp_block, h, kw) for h, kw in held_states]

    for name, spec in zip(args.names, specs):
        block = copy.deepcopy(fp_block)
        t0 = time.time()
        diag = quantize_block(block, adapter, spec, train_states, args.block, args.seed)
        steps = diag["steps"]
        rec = {"benchmark": "blockwise_block", "name": name, "block": args.block,
               "calib_windows": len(train_states), "heldout_windows": len(held_states),
               "error_calib": _block_error(block, [h for h, _ in train_states], train_ref,
                                           [kw for _, kw in train_states]),
               "error_heldout": _block_error(block, [h for h, _ in held_states], held_ref,
                                             [kw for _, kw in held_states]),
               "steps": steps, "train_seconds": diag.get("train_seconds"),
               "seconds_per_step": round(diag["train_seconds"] / steps, 4) if steps else None,
               "seconds": round(time.time() - t0, 2), "threads": args.threads, "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
               "versions": versions()}
        print(json.dumps(rec), flush=True)
        record_file.append(rec, args.record)


if __name__ == "__main__":
    main()
