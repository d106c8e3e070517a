"""Layer objectives of LDLQ, GPTQ (no act order), QuantEase and GPTQ+QuantEase on real layers, on the calibration
text and on held-out text: does a lower calibration objective carry over?

    python benchmarks/layer_objectives.py --model-dir resources/models/smollm2-135m-instruct-q4_1 \
        --calib-text ../shared/assets/datasets/c4/found/yxanul--yxanul_0.6B/c4_validation_2k.parquet \
        --heldout-text ../shared/assets/datasets/wikitext-2-raw-v1/test_joined.txt

Each layer is solved with the Hessian of the FP model's inputs on the calibration text (n windows of L tokens) and
scored with tr((W - Q) H (W - Q)^T) under that Hessian and under the one from the held-out text, relative to LDLQ's.
Prints a JSON line per layer and setting and appends the medians per layer type to results/benchmarks/records.jsonl (`--record`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from quantlib.access.datasets import eval_windows, read_texts
from quantlib.stats.hessian import HessianAccumulator, layer_error
from quantlib.artifacts.atomic import versions
from quantlib.access.models import load_model, load_tokenizer
from quantlib.solvers.contract import solve_layer
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

import record as record_file  # benchmarks/record.py: where records go

SOLVERS = {
    "ldlq": lambda W, H, s, n: solve_layer(W, H, s("ldlq"), n),
    "gptq": lambda W, H, s, n: solve_layer(W, H, s("ldlq", act_order=False), n),
    "quantease": lambda W, H, s, n: solve_layer(W, H, s("quantease"), n),
    "gptq_quantease": lambda W, H, s, n: solve_layer(W, H, s("gptq_quantease"), n),
    # Is QuantEase's gap to LDLQ a matter of its schedule or of too few sweeps?
    "quantease_norelax": lambda W, H, s, n: solve_layer(W, H, s("quantease", relax=False), n),
    "quantease_100it": lambda W, H, s, n: solve_layer(W, H, s("quantease", iterations=100), n),
    # ... or of act order (the released CLI runs without it)?
    "quantease_noact": lambda W, H, s, n: solve_layer(W, H, s("quantease", act_order=False), n),
}


def windows(texts: list[str], join: str, tokenizer, n: int, seqlen: int) -> torch.Tensor:
    """The first n non-overlapping windows of the joined text (the perplexity protocol's windows)."""
    ids, _ = eval_windows(texts, tokenizer, {"join": join, "max_tokens": n * seqlen}, seqlen)
    if ids.shape[0] < n:
        raise SystemExit(f"the text holds {ids.shape[0]} windows of {seqlen} tokens, fewer than {n}")
    return ids


def input_hessians(model, names: list[str], ids: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """Mean x x^T of each named linear's inputs over all tokens (the runner's accumulator)."""
    accs = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in names}

    def keep(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            accs[name].add(inputs[0].detach())
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        for b in range(0, ids.shape[0], batch):
            model(ids[b:b + batch])
    for h in hooks:
        h.remove()
    return {n: acc.result() for n, acc in accs.items()}


def add_layer_arguments(ap, nsamples: int, blocks: list[int], bits: int,
                        modules=("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"), required: bool = True) -> None:
    """The options every real-layer benchmark takes: the model, the calibration text and windows, the layers, bits
    (`required`: the model and the text must be given)."""
    ap.add_argument("--model-dir", required=required)
    ap.add_argument("--calib-text", required=required, help="parquet/jsonl with a text column")
    ap.add_argument("--calib-rows", type=int, nargs=2, default=[1100, 1600])
    ap.add_argument("--nsamples", type=int, default=nsamples)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", type=int, nargs="+", default=blocks)
    ap.add_argument("--modules", nargs="+", default=list(modules))
    ap.add_argument("--bits", type=int, default=bits)


def real_layers(args):
    """(model, tokenizer, layer names, their input Hessians over the calibration windows, the calibration's spec)
    for `add_layer_arguments`' options."""
    model, tok = load_model(args.model_dir), load_tokenizer(args.model_dir)
    r0, r1 = args.calib_rows
    calib = windows(read_texts(args.calib_text)[r0:r1], " ", tok, args.nsamples, args.seqlen)
    names = [f"model.layers.{b}.{m}" for b in args.blocks for m in args.modules]
    return model, tok, names, input_hessians(model, names, calib), CalibSpec("calib", args.nsamples, args.seqlen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(ap, 32, [2, 15, 28], 3,
                        ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"))
    ap.add_argument("--heldout-text", required=True, help="a plain text file")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64, -1])
    record_file.add_argument(ap)
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tok, names, H_cal, cal = real_layers(args)
    heldout = windows([Path(args.heldout_text).read_text()], "", tok, args.nsamples, args.seqlen)
    H_out = input_hessians(model, names, heldout)

    ratios: dict[tuple, list[float]] = defaultdict(list)
    for name in names:
        W = model.get_submodule(name).weight.data.float()
        for gs in args.group_sizes:
            def spec(solver, **options):
                return QuantSpec.build("m", solver, args.bits, gs, calib=cal, options=options)

            Q = {k: solve(W, H_cal[name], spec, name).weight for k, solve in SOLVERS.items()}
            for split, H in (("calibration", H_cal[name]), ("heldout", H_out[name])):
                base = float(layer_error(W, Q["ldlq"], H))
                rel = {k: round(float(layer_error(W, q, H)) / base, 4) for k, q in Q.items()}
                print(json.dumps({"layer": name, "group_size": gs, "split": split, "vs_ldlq": rel}), flush=True)
                for k, v in rel.items():
                    ratios[(split, name.rsplit(".", 1)[-1], k)].append(v)

    medians = defaultdict(dict)
    for (split, kind, solver), v in sorted(ratios.items()):
        medians[f"{split}.{kind}"][solver] = round(statistics.median(v), 3)
    record = {"benchmark": "layer_objectives_vs_ldlq", "model": Path(args.model_dir).name, "bits": args.bits,
              "group_sizes": args.group_sizes, "blocks": args.blocks, "calibration": f"{args.nsamples}x{args.seqlen}",
              "heldout": Path(args.heldout_text).name, "median_ratio_to_ldlq": medians,
              "machine": platform.machine(), "versions": versions()}
    print(json.dumps(record))
    record_file.append(record, args.record)


if __name__ == "__main__":
    main()
