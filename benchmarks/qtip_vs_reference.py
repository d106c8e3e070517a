"""Does our `qtip` solver compute what the released QTIP code computes? Runs the trellis + BlockLDLQ part of both on
the same real layers, the same incoherence-processed weight W' and Hessian H', and compares the results.

    OMP_NUM_THREADS=1 python benchmarks/qtip_vs_reference.py --reference-dir /path/to/Cornell-RelaxML/qtip \
        --model-dir resources/models/smollm2-135m-instruct-q4_1 \
        --calib-text ../shared/assets/datasets/c4/found/yxanul--yxanul_0.6B/c4_validation_2k.parquet

The reference is a checkout of github.com/Cornell-RelaxML/qtip (read at e90c668), imported from --reference-dir at
run time; nothing of it is part of this project. Its BlockLDLQ (`lib/algo/ldlq.py: LDLQ`), block LDL
(`lib/utils/math_utils.py: block_LDL`), damping (`regularize_H`) and codebook (`lib/codebook/bitshift.py:
bitshift_codebook`, its tail-biting Viterbi `quantize`) run unchanged on a CPU; what needs CUDA is stubbed at import:
`fast_hadamard_transform` (a dense Sylvester matrix; only the reference's inference path calls it), `qtip_kernels`
(its decode kernels; unused for 1MAD), `glog` (logging) and the `@torch.compile` on the Viterbi step (run eagerly).

Both get our incoherence step's output: W' = A W B^T scaled to `scale` x the code's rms (QTIP's Wscale with
scale_override) and H' = B H B^T, damped by 1 % of its mean diagonal (QTIP's sigma_reg; the mean diagonal is the
same before and after the transform, so damping H' is damping H). Per layer it prints the objective
tr((W' - Q') H' (W' - Q')^T) (undamped H'; equal to tr((W - Q) H (W - Q)^T) in the original domain) of

- `ours`: our solver's loop as `quantlib.solvers.qtip.solve` runs it (blocks of 16 columns, first to last);
- `ours_rev`: the same loop with the blocks in the reference's order (last to first, columns within a block in
  order), which makes the error feedback the reference's exactly (the block LDL factor of a matrix is unique);
- `ref`: the reference (its codebook float32, as for a float32 model; `--reference-half` casts it to float16, as
  quantize_finetune_llama does for a float16 model; its Viterbi always reads float16 targets);
- `ours_rev_half`: `ours_rev` with our trellis reading its targets rounded to float16, as the reference's
  `quantize` does (a diagnostic: what then differs is round-off in the feedback);
- `ours_rtn` / `ref_rtn`: each trellis on every 16 x 16 tile of W' without feedback;

as ratios, the fraction of weights (and of whole tiles) where `ours_rev` and `ref` decode to the same values, and a
check that `ours` is what `solve_layer` returns (its objective in the original domain). Appends a summary to
results/benchmarks/records.jsonl (`--record`).
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
from quantlib.artifacts.atomic import versions
from quantlib.catalog.spec import QuantSpec
from quantlib.formats.trellis import TrellisProjection, tiles_to_weight, weight_to_tiles
from quantlib.solvers.contract import LayerSolver
from quantlib.solvers.loops import ErrorFeedback
from quantlib.solvers.qtip import Prepared
from quantlib.stats.hessian import PreparedHessian, layer_error
from quantlib.transforms.hadamard import hadamard_matrix

import record as record_file  # benchmarks/record.py: where records go


def _cpu_hadamard_transform(x: torch.Tensor, scale: float) -> torch.Tensor:
    """fast_hadamard_transform.hadamard_transform on a CPU: x @ (unnormalised Sylvester H_n) * scale, last dim."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fast_hadamard_transform takes powers of two, got {n}")
    Hn = hadamard_matrix(n) * n ** 0.5  # Sylvester's, symmetric, entries +-1
    return ((x.double() @ Hn) * scale).to(x.dtype)


def load_reference(reference_dir: str):
    root = Path(reference_dir)
    if not (root / "lib" / "codebook" / "bitshift.py").is_file():
        raise SystemExit(f"{reference_dir} has no lib/codebook/bitshift.py: pass a checkout of Cornell-RelaxML/qtip")
    stubs = {
        "fast_hadamard_transform": {"hadamard_transform": _cpu_hadamard_transform},
        "qtip_kernels": {},
        "glog": {k: (lambda *a, **kw: None) for k in ("info", "warning", "error", "debug")},
    }
    for name, attrs in stubs.items():
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                sys.modules[name] = types.SimpleNamespace(__name__=name, **attrs)
    torch._dynamo.config.disable = True  # bitshift_codebook.update is @torch.compile: run it eagerly
    sys.path.insert(0, str(root.resolve()))
    from lib.algo import ldlq
    from lib.codebook.bitshift import bitshift_codebook
    from lib.utils.math_utils import block_LDL, regularize_H
    return types.SimpleNamespace(LDLQ=ldlq.LDLQ, codebook=bitshift_codebook, block_LDL=block_LDL,
                                 regularize_H=regularize_H)


def reference_solve(ref, cb, Wr: torch.Tensor, Hr: torch.Tensor, damp: float, tile: tuple[int, int]):
    """quantize_finetune_decoder_layer's steps after the transform: regularize_H, block_LDL with a zero diagonal,
    LDLQ. Returns (W_hat', states (d_out, d_in))."""
    tx, ty = tile
    HRr = ref.regularize_H(Hr.clone(), damp)
    LRr, _ = ref.block_LDL(HRr, ty)
    n = HRr.shape[0]
    LRr[torch.arange(n), torch.arange(n)] = 0
    args = types.SimpleNamespace(td_x=tx, td_y=ty, V=1)
    # Its lazy batch of buf_cols columns (128) must divide d_in (576 here does not): the most blocks of ty up to 128
    # columns that do. The result does not depend on it.
    per = max(g for g in range(1, max(1, 128 // ty) + 1) if (n // ty) % g == 0)
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm
        hatWr, Qidxs = ref.LDLQ(Wr.clone(), LRr, cb, args, buf_cols=per * ty, for_kernel=False)
    return hatWr.float(), Qidxs


def ours_solve(prep: Prepared, reverse_blocks: bool, half_targets: bool = False) -> torch.Tensor:
    """Our BlockLDLQ loop (`ErrorFeedback.run_blocks` with `TrellisProjection`, as `qtip.solve` calls them) on the
    prepared W', H'; with reverse_blocks the blocks go last to first; with half_targets (a diagnostic) the trellis
    reads its targets rounded to float16, as the reference's does. Returns W_hat'."""
    d_out, d_in = prep.W.shape
    ty = prep.tile[1]
    perm = torch.arange(d_in)
    if reverse_blocks:
        perm = perm.reshape(-1, ty).flip(0).reshape(-1)
    hess = PreparedHessian(prep.hessian.H, prep.hessian.damp, False, "layer", prep.hessian.ladder)
    hess.perm = perm  # processing order for the factorisation (`_reversed_cholesky` permutes and damps)
    U, _ = hess.ldl()
    project = TrellisProjection(prep.trellis, d_out, d_in, prep.tile)
    step = (lambda k0, targets: project(k0, targets.half().float())) if half_targets else project
    ErrorFeedback(prep.W, U, perm).run_blocks(step, ty)
    # decoded from the recorded symbols (exact code values), whose column blocks are in processing order
    out = torch.empty_like(prep.W)
    out[:, perm] = tiles_to_weight(prep.trellis.decode(project.symbols()), d_out, d_in, prep.tile)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", required=True, help="a checkout of Cornell-RelaxML/qtip")
    add_layer_arguments(ap, 8, [3], 2)
    ap.add_argument("--trellis-L", type=int, default=8)
    ap.add_argument("--reference-half", action="store_true",
                    help="the reference's codebook in float16 (its Viterbi costs then accumulate in float16)")
    ap.add_argument("--threads", type=int, default=1)
    record_file.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = load_reference(args.reference_dir)
    torch.manual_seed(0)

    model, _, names, hessians, cal = real_layers(args)
    spec = QuantSpec.build("m", "qtip", args.bits, -1, calib=cal,
                           options={"trellis_L": args.trellis_L, "code_1mad": True})
    solver = LayerSolver(spec)
    ref_dtype = torch.float16 if args.reference_half else torch.float32
    cb = ref.codebook(L=args.trellis_L, K=args.bits, V=1, tlut_bits=0, decode_mode="1mad").to(ref_dtype)

    rows = []
    for name in names:
        W, H = model.get_submodule(name).weight.data.float(), hessians[name]
        task = solver.task(H, name)
        prep = Prepared(W, task)
        scale = float(prep.scales[0])
        Ht = prep.incs[0].hessian(H.double())  # undamped H'
        Wt = prep.W

        def objective(Q):
            return layer_error(Wt.double(), Q.double(), Ht) * scale ** 2

        if prep.trellis.table()[:, 0].tolist() != cb.lut[0].float().tolist() and not args.reference_half:
            raise SystemExit("the reference's 1MAD values differ from ours")
        ours = ours_solve(prep, reverse_blocks=False)
        ours_rev = ours_solve(prep, reverse_blocks=True)
        ours_rev16 = ours_solve(prep, reverse_blocks=True, half_targets=True)
        refq, _ = reference_solve(ref, cb, Wt, prep.hessian.H, prep.hessian.damp, prep.tile)
        tiles = weight_to_tiles(Wt, prep.tile)
        ours_rtn = tiles_to_weight(prep.trellis.quantize(tiles)[1], *Wt.shape, prep.tile)
        ref_rtn = cb.quantize(tiles)[0].float()
        ref_rtn = tiles_to_weight(ref_rtn, *Wt.shape, prep.tile)
        # the solver itself, in the original domain: must be `ours`
        full = solver.solve(W, solver.task(H, name)).weight
        f = {k: objective(q) for k, q in (("ours", ours), ("ours_rev", ours_rev), ("ours_rev_half", ours_rev16),
                                          ("ref", refq),
                                          ("ours_rtn", ours_rtn), ("ref_rtn", ref_rtn))}
        def same_values(a, b):  # a float16 codebook decodes to float16-rounded values (distinct ones stay distinct)
            return a.to(ref_dtype) == b.to(ref_dtype)

        same = same_values(ours_rev, refq)
        row = {"layer": name, "shape": list(W.shape),
               "ours_over_ref": round(f["ours"] / f["ref"], 5),
               "ours_rev_over_ref": round(f["ours_rev"] / f["ref"], 5),
               "ours_rtn_over_ref_rtn": round(f["ours_rtn"] / f["ref_rtn"], 5),
               "ours_over_ours_rtn": round(f["ours"] / f["ours_rtn"], 4),
               "ref_over_ref_rtn": round(f["ref"] / f["ref_rtn"], 4),
               "identical_weights_rev_vs_ref": round(float(same.float().mean()), 5),
               "identical_tiles_rev_vs_ref": round(float(weight_to_tiles(same.float(), prep.tile).min(1).values
                                                         .mean()), 5),
               "identical_weights_rtn": round(float(same_values(ours_rtn, ref_rtn).float().mean()), 5),
               # with our trellis reading float16 targets too: what is left is round-off in the feedback
               "identical_weights_rev_half_vs_ref": round(float(same_values(ours_rev16, refq).float().mean()), 5),
               "ours_rev_half_over_ref": round(f["ours_rev_half"] / f["ref"], 5),
               "solver_check": round(layer_error(W.double(), full.double(), H.double()) / f["ours"], 6),
               "rel_objective": {k: round(v / objective(torch.zeros_like(Wt)), 6) for k, v in f.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)

    ratios = [r["ours_over_ref"] for r in rows]
    rev = [r["ours_rev_over_ref"] for r in rows]
    record = {"benchmark": "qtip_vs_reference", "model": Path(args.model_dir).name, "bits": args.bits,
              "trellis": f"L{args.trellis_L} k{args.bits} V1 1mad, 16x16 tiles", "blocks": args.blocks,
              "modules": args.modules, "calibration": f"{args.nsamples}x{args.seqlen}",
              "reference_codebook": str(ref_dtype).removeprefix("torch."),
              "objective_ratio_range": [min(ratios), max(ratios)], "same_order_ratio_range": [min(rev), max(rev)],
              "rows": rows, "machine": platform.machine(), "versions": versions()}
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}))
    record_file.append(record, args.record)


if __name__ == "__main__":
    main()
