"""Does our SpinQuant compute what the released SpinQuant code computes? The quantized forward its rotation training
runs, the gradients of its loss w.r.t. R1 and each layer's R2, and a short training, ours against the reference's, on
the same model, the same windows and the same starting R1/R2.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/spinquant_vs_reference.py \
        --reference-dir /tmp/spinref/SpinQuant --reference-python /tmp/spinref/venv/bin/python \
        --model-dir /tmp/wt/resources/models/smollm2-135m-instruct-q4_1 \
        --calib /tmp/wt/results/calibration/smollm2-135m-instruct-q4_1.c4.n128.L512.pt \
        --heldout /tmp/wt/results/evaldata/smollm2-135m-instruct-q4_1/wikitext2.L512.pt

The reference is a checkout of github.com/facebookresearch/SpinQuant (read at 8f47aa3), run in its own environment
(transformers 4.44.2, as its requirement.txt pins; `--reference-python`) by benchmarks/spinquant_reference_side.py,
which imports it from --reference-dir at run time; tensors go both ways through torch.save files in a temp dir. What
that side stubs (CUDA-only `fast_hadamard_transform` -> a dense Sylvester matrix, `Tensor.cuda` -> identity, the
R1/R2 holders, float32 instead of bf16, the HF Trainer's step done by hand with its default gradient clipping) is
listed in its docstring.

Both sides start from our `quarot_rotations(model, seed)` R1/R2 and use the same R4 (the reference's had12 x H_128
construction for 1536, with our order-12 Paley matrix passed in for its `get_had12`; the loss with its own had12 is
printed too) and R3 (Sylvester H_64 on both, checked). Our side: `fold_norms`, `rotate_down_inputs`, `install` with
`rotated=True`, `rotated_state` + `torch.func.functional_call` (the building blocks `learn_rotations` uses), and
`learn_rotations` itself for the training. The reference side: `prepare_model` (its fusion, R4, quantizer wrappers,
QK wrapper), its LlamaForCausalLM with R1/R2 inside the forward, `SGDG` with transformers' cosine schedule.

Cases (activations 4-bit asymmetric per token, K after R3 and V 4-bit asymmetric per head, weights in full
precision, as the reference trains before GPTQ):
- `fp`: no quantizer (the online Hadamards stay): must equal the unrotated model's loss;
- `q1`: clip ratios 1.0 (the reference's defaults), the reference's o_proj input quantized per token like ours;
- `q1_native`: the same with the reference's own o_proj setting (its input quantized in groups of head_dim);
- `q1_native_center`, `fp_center`: ... and with the reference's embedding mean-centring (fuse_layer_norms);
- `q_quarot`: clip ratios 0.9 (activations) / 0.95 (KV), our workflow's defaults;
- `q8`, `q8_quarot`: the same at 8 bits (activations and KV), where round-off hardly moves the loss.
The quantized loss is a very rough function of R: a round-off-sized change (`ours_f64`: our rotation products made
in float64 then cast, as the reference makes them) moves a 4-bit window's loss by a few hundredths and the gradient's
direction a lot, so every 4-bit figure is printed beside that noise floor; exactness is checked at FP and 8 bits.
Gradients: on the first probe window, ours vs the reference and ours vs ours_f64 (the floor), of the Euclidean
gradient and of its skew part W = (R^T G - G^T R) / 2, the only part a Cayley step uses.
Optimizer: one step of our `cayley_step` and of its `SGDG` on the same R and G (the reference's gradient).
Training: `--steps` steps at `--lr` with the cosine schedule, one window per step in the order `learn_rotations`
draws them (seeded randperm) from `--n-train` calibration windows; the reference without gradient clipping and with
its Trainer's max_grad_norm 1.0, ours with `--our-clip` (0, none, in the recorded run; this comparison is what found
that the reference clips and ours did not: `spin_clip` since); ours also as a float64-product loop (the
trajectories' noise floor, unclipped).
Held-out: `--n-heldout` WikiText-2 windows, before and after. Appends a record (`--record`). `--forward-only` with
`--cases` prints the forward table alone (on more windows, say) and records nothing. About 18 minutes with the
defaults here (3 probe windows, 8 steps, 4 held-out windows, `--parallel`, one thread each, 2 busy cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import record as record_file  # benchmarks/record.py: where records go
import torch

from quantlib.access.models import load_model
from quantlib.artifacts.atomic import versions
from quantlib.transforms.activations import ForwardQuant, install
from quantlib.transforms.hadamard import _factor, hadamard_matrix
from quantlib.transforms.rotation import (
    fold_norms,
    quarot_rotations,
    rotate_down_inputs,
    rotated_state,
    rotation_params,
)
from quantlib.transforms.spinquant import cayley_step, cosine_lr, learn_rotations

HERE = Path(__file__).resolve().parent

# the forward cases: ours as a ForwardQuant (None: the reference only), the reference's as its side's `configure`
# keywords. Ours quantizes o_proj's input per token (the whole 576), the reference in groups of head_dim: `o_group`
# -1 makes its o_proj per token as ours; the `_native` cases keep its own.
def _fq(bits, act_clip, kv_clip):
    return ForwardQuant(act_bits=bits, act_clip=act_clip, kv_bits=bits, kv_clip=kv_clip, kv_group=0, rotated=True)


CASES = {
    "fp": (ForwardQuant(rotated=True), {"quant": False}),
    "fp_center": (None, {"quant": False, "center": True}),
    "q1": (_fq(4, 1.0, 1.0), {"quant": True, "act_clip": 1.0, "kv_clip": 1.0, "o_group": -1}),
    "q1_native": (None, {"quant": True, "act_clip": 1.0, "kv_clip": 1.0}),
    "q1_native_center": (None, {"quant": True, "act_clip": 1.0, "kv_clip": 1.0, "center": True}),
    "q_quarot": (_fq(4, 0.9, 0.95), {"quant": True, "act_clip": 0.9, "kv_clip": 0.95, "o_group": -1}),
    "q8": (_fq(8, 1.0, 1.0), {"quant": True, "bits": 8, "act_clip": 1.0, "kv_clip": 1.0, "o_group": -1}),
    "q8_quarot": (_fq(8, 0.9, 0.95), {"quant": True, "bits": 8, "act_clip": 0.9, "kv_clip": 0.95, "o_group": -1}),
}
GRAD_CASES = ["fp", "q1", "q1_native", "q8"]


class Ours:
    """Our quantized forward on a model with folded norms and R4's weight side, R1/R2 as arguments."""

    def __init__(self, model_dir):
        self.model = load_model(model_dir)
        self.fq = None

    def prepare(self):
        fold_norms(self.model)
        rotate_down_inputs(self.model)
        self.base = {n: p.detach() for n, p in rotation_params(self.model).items()}
        self.base64 = {n: p.double() for n, p in self.base.items()}

    def use(self, fq: ForwardQuant):
        if fq != self.fq:
            install(self.model, replace(fq, rotated=True))
            self.fq = fq

    def loss(self, Q1, Q2s, x, grad=False, f64=False):
        """As learn_rotations evaluates it: R1/R2 in float32, rotated_state, functional_call with labels. f64: the
        rotation products in float64 then cast to float32, as the reference's QuantizeLinear makes them (a
        round-off-sized change: the noise floor of every comparison)."""
        dt = torch.float64 if f64 else torch.float32
        R1 = Q1.detach().to(dt).clone().requires_grad_(grad)
        R2s = [Q.detach().to(dt).clone().requires_grad_(grad) for Q in Q2s]
        with torch.set_grad_enabled(grad):
            state = rotated_state(self.model, self.base64 if f64 else self.base, R1, R2s)
            if f64:
                state = {k: v.float() for k, v in state.items()}
            out = torch.func.functional_call(self.model, state, (x[None],), {"labels": x[None], "use_cache": False})
        if not grad:
            return float(out.loss)
        out.loss.backward()
        return float(out.loss.detach()), R1.grad.double(), [R.grad.double() for R in R2s]

    def train_f64(self, Q1, Q2s, windows, fq, lr):
        """learn_rotations' loop (cayley_step, cosine_lr, one window a step) with the products in float64: how far
        a round-off-sized change moves our own trajectory."""
        self.use(fq)
        losses = []
        for step, x in enumerate(windows):
            loss, G1, G2s = self.loss(Q1, Q2s, x, grad=True, f64=True)
            losses.append(loss)
            a = cosine_lr(lr, step, len(windows))
            Q1 = cayley_step(Q1, G1, a)
            Q2s = [cayley_step(Q, G, a) for Q, G in zip(Q2s, G2s)]
        return Q1, Q2s, losses


def mean(v):
    return sum(v) / len(v)


def sd(v):
    m = mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / max(1, len(v) - 1))


def forward_table(losses, ref, n):
    """Print the forward losses, ours vs the reference's, per case; return the rows."""
    print(f"\nforward loss, mean of {n} calibration windows at the start R1/R2 (d: per-window ref - ours, "
          "mean +- sd; ours_f64: ours with float64 rotation products, the round-off noise floor)")
    print(f"{'case':<20}{'ours':>10}{'ours_f64':>10}{'ref':>10}{'d mean':>10}{'d sd':>9}{'f64-f32 sd':>11}")
    rows = []
    for tag in list(CASES) + ["q1_own_had12"]:
        o, r = losses.get(tag), ref["losses"].get(tag)
        if r is None:
            continue
        o64 = losses.get(tag + "_f64")
        row = {"case": tag, "ref": mean(r), "ref_windows": r}
        line = f"{tag:<20}{(f'{mean(o):.5f}' if o else '-'):>10}{(f'{mean(o64):.5f}' if o64 else '-'):>10}{mean(r):>10.5f}"
        if o:
            d = [x - y for x, y in zip(r, o)]
            row.update(ours=mean(o), ours_windows=o, d_mean=mean(d), d_sd=sd(d))
            line += f"{mean(d):>+10.5f}{sd(d):>9.5f}"
        if o64:
            d64 = [x - y for x, y in zip(o64, o)]
            row.update(ours_f64=mean(o64), f64_minus_f32_mean=mean(d64), f64_minus_f32_sd=sd(d64))
            line += f"{sd(d64):>11.5f}"
        rows.append(row)
        print(line)

    return rows


def learn_order(n: int, steps: int, seed: int) -> list[int]:
    """The windows `learn_rotations` draws with batch 1: its seeded randperm, step by step."""
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randperm(n, generator=g)[:1]) for _ in range(steps)]


def cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def skew(R, G):
    return 0.5 * (R.T @ G - G.T @ R)


def load_sgdg(reference_dir: Path):
    """The reference's optimizer module (train_utils/optimizer.py imports only torch and random)."""
    spec = importlib.util.spec_from_file_location("spinquant_ref_optimizer",
                                                  reference_dir / "train_utils" / "optimizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", required=True, type=Path, help="a checkout of facebookresearch/SpinQuant")
    ap.add_argument("--reference-python", required=True, help="python of the reference's environment")
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--calib", required=True, type=Path, help="calibration windows (.pt, (n, L) token ids)")
    ap.add_argument("--heldout", required=True, type=Path, help="evaluation windows (.pt with 'windows')")
    ap.add_argument("--n-probe", type=int, default=3, help="calibration windows for the forward losses")
    ap.add_argument("--n-train", type=int, default=8, help="calibration windows the training draws from")
    ap.add_argument("--n-heldout", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0, help="quarot_rotations' seed and learn_rotations' draw")
    ap.add_argument("--our-clip", type=float, default=0.0,
                    help="learn_rotations' gradient clip (0: none, as the recorded run of 2026-12-07, against the "
                         "reference's noclip; 1.0, our default since, against its clip1)")
    ap.add_argument("--ref-runs", default="noclip,clip1",
                    help="reference trainings: noclip (as ours), clip1 (its Trainer's max_grad_norm 1.0), "
                         "native_clip1 (and its own o_proj groups and embedding centring)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", action="store_true",
                    help="run our side while the reference side runs (two processes of --threads each)")
    ap.add_argument("--forward-only", action="store_true", help="the forward losses only (no gradients, training)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"forward cases to run (comma-separated, from {', '.join(CASES)}); all by default")
    ap.add_argument("--keep-io", type=Path, default=None, help="keep the exchanged tensors in this directory")
    record_file.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg):
        print(f"[ours {time.time() - t0:6.1f}s] {msg}", flush=True)

    calib = torch.load(args.calib)
    calib = calib["windows"] if isinstance(calib, dict) else calib
    held = torch.load(args.heldout)
    held = held["windows"] if isinstance(held, dict) else held
    train_pool = calib[: args.n_train]
    probe = calib[: args.n_probe]
    heldout = held[: args.n_heldout]
    order = learn_order(len(train_pool), args.steps, args.seed)
    train_seq = train_pool[order]

    ours = Ours(args.model_dir)
    with torch.no_grad():
        plain = [float(ours.model(input_ids=w[None], labels=w[None], use_cache=False).loss) for w in probe]
    log(f"plain FP loss {plain}")
    ours.prepare()
    Q1, Q2s = quarot_rotations(ours.model, args.seed)
    inter = ours.model.config.intermediate_size
    head_dim = Q2s[0].shape[0]

    # ---- the reference side, in its own environment
    runs = {}
    for r in args.ref_runs.split(","):
        if r == "noclip":
            runs[r] = {"case": "q1", "max_grad_norm": 0.0}
        elif r == "clip1":
            runs[r] = {"case": "q1", "max_grad_norm": 1.0}
        elif r == "native_clip1":
            runs[r] = {"case": "q1_native_center", "max_grad_norm": 1.0}
        elif r:
            raise SystemExit(f"unknown reference run {r}")
        if r:
            runs[r].update(lr=args.lr, steps=args.steps, seed=0)
    io = Path(tempfile.mkdtemp(prefix="spinquant_vs_ref_")) if args.keep_io is None else args.keep_io
    io.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES) or (not args.forward_only and not set(GRAD_CASES) <= set(cases)):
        raise SystemExit(f"--cases: from {', '.join(CASES)}, and with gradients and training at least "
                         f"{', '.join(GRAD_CASES)}")
    grad_cases = [] if args.forward_only else GRAD_CASES
    if args.forward_only:
        runs = {}
    torch.save({"R1": Q1, "R2s": Q2s, "probe": probe, "train": train_seq, "heldout": heldout,
                "had12": (_factor(12) * math.sqrt(12)).round().float(),
                "r4_ours": hadamard_matrix(inter), "r3_ours": hadamard_matrix(head_dim),
                "settings": {"loss_cases": {k: v[1] for k, v in CASES.items() if k in cases},
                             "grad_cases": grad_cases,
                             "train_runs": runs}}, io / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ""}
    cmd = [args.reference_python, str(HERE / "spinquant_reference_side.py"), "--reference-dir",
           str(args.reference_dir), "--model-dir", str(args.model_dir), "--io", str(io), "--threads",
           str(args.threads)]
    log("reference side: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, cwd=str(HERE.parent))
    try:
        run(args, ours, proc, io, Q1, Q2s, probe, heldout, train_pool, train_seq, order, plain, runs, t0, log)
    finally:
        if proc.poll() is None:  # our side failed: stop the reference side it started
            proc.kill()


def run(args, ours, proc, io, Q1, Q2s, probe, heldout, train_pool, train_seq, order, plain, runs, t0, log):
    inter = ours.model.config.intermediate_size
    head_dim = Q2s[0].shape[0]
    grad_cases = [] if args.forward_only else GRAD_CASES
    calib_len = int(probe.shape[1])
    if not args.parallel and proc.wait():
        raise SystemExit(f"the reference side failed (exit {proc.returncode})")

    # ---- our side (with --parallel, while the reference side runs)
    losses = {}
    for tag, (fq, _) in CASES.items():
        if fq is None or tag not in args.cases.split(","):
            continue
        ours.use(fq)
        losses[tag] = [ours.loss(Q1, Q2s, w) for w in probe]
        log(f"loss {tag}: {losses[tag]}")
        if tag in ("q1", "q8"):  # the noise floor: the same with the rotation products in float64
            losses[tag + "_f64"] = [ours.loss(Q1, Q2s, w, f64=True) for w in probe]
            log(f"loss {tag}_f64: {losses[tag + '_f64']}")
    grads = {}
    for tag in grad_cases:
        fq = CASES[tag][0] or CASES["q1"][0]  # q1_native: ours has one o_proj setting (per token)
        ours.use(fq)
        loss, G1, G2s = ours.loss(Q1, Q2s, probe[0], grad=True)
        grads[tag] = {"loss": loss, "R1": G1, "R2s": G2s}
        log(f"grad {tag}: loss {loss:.6f} |G1| {float(G1.norm()):.4e}")
        if tag in ("q1", "q8"):
            loss, G1, G2s = ours.loss(Q1, Q2s, probe[0], grad=True, f64=True)
            grads[tag + "_f64"] = {"loss": loss, "R1": G1, "R2s": G2s}
    if args.forward_only:
        if args.parallel and proc.wait():
            raise SystemExit(f"the reference side failed (exit {proc.returncode})")
        ref = torch.load(io / "outputs.pt")
        forward_table(losses, ref, len(probe))
        return
    ours.use(CASES["q1"][0])
    held_before = [ours.loss(Q1, Q2s, w) for w in heldout]
    # training with learn_rotations itself, on a fresh copy of the model
    fresh = load_model(args.model_dir)
    tq = time.time()
    Q1f, Q2f, diag = learn_rotations(fresh, train_pool, CASES["q1"][0], args.steps, args.lr, batch=1,
                                     weight_bits=None, seed=args.seed, clip=args.our_clip)
    log(f"learn_rotations: {diag['losses']} ({time.time() - tq:.0f}s)")
    del fresh
    ours.use(CASES["q1"][0])
    held_after = [ours.loss(Q1f, Q2f, w) for w in heldout]
    log(f"held-out q1 before {held_before} after {held_after}")
    Q1g, Q2g, losses64 = ours.train_f64(Q1, Q2s, train_seq, CASES["q1"][0], args.lr)
    log(f"our loop, float64 products: {losses64}")
    held_after64 = [ours.loss(Q1g, Q2g, w) for w in heldout]

    rc = proc.wait()
    if rc:
        raise SystemExit(f"the reference side failed (exit {rc})")
    ref = torch.load(io / "outputs.pt")

    # ---- the optimizer alone: one step of each on the same R and gradient (the reference's q1 gradients)
    import random
    sg = load_sgdg(args.reference_dir)
    opt_rows = {}
    for name, R, G in (("R1", Q1, ref["grads"]["q1"]["R1"]), ("R2[0]", Q2s[0], ref["grads"]["q1"]["R2s"][0])):
        mine = cayley_step(R, G, args.lr)
        p = torch.nn.Parameter(R.float().clone())
        p.grad = G.float().clone()
        random.seed(1)  # random.randint(1, 101) is not 1 on the first draw: no QR retraction in this step
        sg.SGDG([p], lr=args.lr, stiefel=True).step()
        theirs = p.detach().double()
        eye = torch.eye(len(R), dtype=R.dtype)
        opt_rows[name] = {"step_rel_diff": rel(mine - R, theirs - R),
                          "orth_err_ours": float((mine.T @ mine - eye).abs().max()),
                          "orth_err_ref": float((theirs.T @ theirs - eye).abs().max()),
                          "step_fro": float((theirs - R).norm()),
                          "W_1norm": float(skew(R, G).abs().sum(0).max())}

    # ---- tables
    print(f"\nplain FP loss (unrotated, no quantizer) on {len(probe)} windows: ours (transformers 5) {mean(plain):.6f} "
          f"reference (transformers 4.44) {mean(ref['plain_fp_loss']):.6f}")
    print(f"R4 ({inter}) ours vs reference's matmul_hadU_cuda with our had12: max |diff| "
          f"{ref['r4_vs_ours_max_abs']:.1e}; with its own had12: {ref.get('r4_own_vs_ours_max_abs', float('nan')):.1e}; "
          f"R3 ({head_dim}) max |diff| {ref['r3_vs_ours_max_abs']:.1e}; the reference's o_proj input group size: "
          f"{ref['o_proj_act_groupsize']}")
    rows = forward_table(losses, ref, len(probe))

    print("\ngradients on window 0, ours vs reference: cosine and ||G_o - G_r|| / ||G_r|| of the Euclidean gradient; "
          "skew: of W = (R^T G - G^T R) / 2, what the Cayley step uses; floor: ours f32 vs ours f64 products")
    grad_rows = {}

    def compare(ga, gb):
        c2 = [cos(a, b) for a, b in zip(ga["R2s"], gb["R2s"])]
        w2 = [cos(skew(Q, a), skew(Q, b)) for Q, a, b in zip(Q2s, ga["R2s"], gb["R2s"])]
        return {"loss_a": ga["loss"], "loss_b": gb["loss"],
                "R1_cos": cos(ga["R1"], gb["R1"]), "R1_rel": rel(ga["R1"], gb["R1"]),
                "R1_skew_cos": cos(skew(Q1, ga["R1"]), skew(Q1, gb["R1"])),
                "R1_skew_rel": rel(skew(Q1, ga["R1"]), skew(Q1, gb["R1"])),
                "R2_cos_min": min(c2), "R2_cos_median": sorted(c2)[len(c2) // 2],
                "R2_rel_max": max(rel(a, b) for a, b in zip(ga["R2s"], gb["R2s"])),
                "R2_skew_cos_min": min(w2), "R2_skew_cos_median": sorted(w2)[len(w2) // 2],
                "grad_norm_a": float(torch.sqrt(ga["R1"].norm() ** 2 + sum(g.norm() ** 2 for g in ga["R2s"]))),
                "grad_norm_b": float(torch.sqrt(gb["R1"].norm() ** 2 + sum(g.norm() ** 2 for g in gb["R2s"])))}

    pairs = [(f"{t} ours/ref", grads[t], ref["grads"][t]) for t in grad_cases]
    pairs += [(f"{t} ours/ours_f64", grads[t], grads[t + "_f64"]) for t in ("q1", "q8")]
    for label, ga, gb in pairs:
        row = compare(ga, gb)
        grad_rows[label] = row
        print(f"  {label:<20} loss {row['loss_a']:.5f}/{row['loss_b']:.5f} R1 cos {row['R1_cos']:.5f} rel "
              f"{row['R1_rel']:.3f} skew cos {row['R1_skew_cos']:.5f} | R2 cos min {row['R2_cos_min']:.4f} med "
              f"{row['R2_cos_median']:.5f} skew cos min {row['R2_skew_cos_min']:.4f} med "
              f"{row['R2_skew_cos_median']:.5f} | |G| {row['grad_norm_a']:.3e}/{row['grad_norm_b']:.3e}")
    print("  (q1_native: ours has no per-head o_proj groups, so its row compares ours q1 with the reference's own "
          "setting)")

    # step sizes: a = min(lr, 1/||W||_1) per matrix, and what the Trainer's clip to 1.0 makes of it
    gq = ref["grads"]["q1"]
    gnorm = grad_rows["q1 ours/ref"]["grad_norm_b"]
    clipf = min(1.0, 1.0 / gnorm)
    w1 = [float(skew(Q1, gq["R1"]).abs().sum(0).max())] + [float(skew(Q, g).abs().sum(0).max())
                                                           for Q, g in zip(Q2s, gq["R2s"])]
    med = sorted(w1[1:])[len(w1[1:]) // 2]
    print(f"\nstep 1 (lr {args.lr}): ||W||_1 of R1 {w1[0]:.3e}, of the R2s median {med:.3e}; the step a W has "
          f"||a W||_1 = min(lr ||W||_1, 1): R1 {min(args.lr * w1[0], 1):.3f}, R2 median {min(args.lr * med, 1):.3f}; "
          f"after the Trainer's clip of the global gradient norm {gnorm:.3e} to 1.0: R1 "
          f"{min(args.lr * w1[0] * clipf, 1):.4f}, R2 median {min(args.lr * med * clipf, 1):.4f}")
    print("one optimizer step on the same R and G (our cayley_step vs its SGDG): "
          + "; ".join(f"{k}: rel diff of the step {v['step_rel_diff']:.1e}, |step|_F {v['step_fro']:.3e}, "
                      f"orthogonality error ours {v['orth_err_ours']:.1e} ref {v['orth_err_ref']:.1e}"
                      for k, v in opt_rows.items()))

    lrs = [cosine_lr(args.lr, s, args.steps) for s in range(args.steps)]
    print(f"\ntraining loss per step ({args.steps} steps, lr {args.lr} cosine; windows {order} of the "
          f"{len(train_pool)} first calibration windows, the order learn_rotations draws)")
    print(f"{'step':>5}{'lr':>8}{'ours':>10}{'ours_f64':>10}" + "".join(f"{'ref ' + k:>14}" for k in ref["train"]))
    for s_ in range(args.steps):
        line = f"{s_ + 1:>5}{lrs[s_]:>8.4f}{diag['losses'][s_]:>10.5f}{losses64[s_]:>10.5f}"
        line += "".join(f"{v['losses'][s_]:>14.5f}" for v in ref["train"].values())
        print(line)
    train_rows = {}
    moved = float((Q1f - Q1).norm())
    d64 = float((Q1f - Q1g).norm())
    print(f"R1 moved ||R1_end - R1_start||_F: ours {moved:.4f}, ours_f64 {float((Q1g - Q1).norm()):.4f}; "
          f"||R1_ours - R1_ours_f64||_F {d64:.4f} (noise floor)")
    print(f"held-out (q1, {len(heldout)} WikiText-2 windows) before -> after: ours {mean(held_before):.5f} -> "
          f"{mean(held_after):.5f}, ours_f64 -> {mean(held_after64):.5f}")
    for k, v in ref["train"].items():
        d1 = float((Q1f - v["R1"]).norm())
        d2 = max(float((a - b).norm()) for a, b in zip(Q2f, v["R2s"]))
        lr_diff = max(abs(a - b) for a, b in zip(lrs, v["lrs"]))
        train_rows[k] = {"losses": v["losses"], "R1_fro_diff_to_ours": d1, "R2_fro_diff_to_ours_max": d2,
                         "R1_moved": float((v["R1"] - Q1).norm()), "lr_max_diff": lr_diff,
                         "heldout_before": mean(ref["heldout_before"][runs[k]["case"]]),
                         "heldout_after": mean(v["heldout_after"]), "qr_retractions": v["qr_retractions"],
                         "grad_norms": v["grad_norms"]}
        print(f"  ref {k}: ||R1_ours - R1_ref||_F {d1:.4f}, R1 moved {train_rows[k]['R1_moved']:.4f}, max over "
              f"layers ||R2_ours - R2_ref||_F {d2:.4f}; lr schedule max diff {lr_diff:.1e}; QR retractions "
              f"{v['qr_retractions']}; held-out ({runs[k]['case']}) {train_rows[k]['heldout_before']:.5f} -> "
              f"{train_rows[k]['heldout_after']:.5f}; global grad norms "
              + ", ".join(f"{g:.2f}" for g in v["grad_norms"]))

    record = {"benchmark": "spinquant_vs_reference", "model": args.model_dir.name,
              "reference": "facebookresearch/SpinQuant 8f47aa3 (transformers " + ref["versions"]["transformers"]
                           + ", float32 on CPU)",
              "windows": {"probe": len(probe), "train_pool": len(train_pool), "order": order,
                          "heldout": len(heldout), "seqlen": calib_len},
              "steps": args.steps, "lr": args.lr, "seed": args.seed, "our_clip": args.our_clip,
              "plain_fp_loss": {"ours": mean(plain), "ref": mean(ref["plain_fp_loss"])},
              "hadamards": {"r4_max_abs_diff": ref["r4_vs_ours_max_abs"],
                            "r4_ref_own_had12_max_abs_diff": ref.get("r4_own_vs_ours_max_abs"),
                            "r3_max_abs_diff": ref["r3_vs_ours_max_abs"],
                            "ref_o_proj_input_group": ref["o_proj_act_groupsize"]},
              "forward": rows, "gradients": grad_rows, "optimizer_one_step": opt_rows,
              "training": {"ours_losses": diag["losses"], "ours_f64_losses": losses64, "lrs": lrs,
                           "ours_heldout_before": mean(held_before), "ours_heldout_after": mean(held_after),
                           "ours_f64_heldout_after": mean(held_after64), "ours_R1_moved": moved,
                           "ours_vs_ours_f64_R1_fro": d64, "ref": train_rows},
              "seconds": round(time.time() - t0, 1), "machine": platform.machine(), "versions": versions()}
    print(json.dumps({"seconds": record["seconds"]}))
    record_file.append(record, args.record)


if __name__ == "__main__":
    main()
