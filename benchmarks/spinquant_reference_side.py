"""The reference side of benchmarks/spinquant_vs_reference.py: runs under the reference's environment (an old
transformers, 4.44.2 as its requirement.txt pins), never under the project's venv, and imports facebookresearch/
SpinQuant from --reference-dir at run time (nothing of it is copied here).

    OMP_NUM_THREADS=1 /tmp/spinref/venv/bin/python benchmarks/spinquant_reference_side.py \
        --reference-dir /tmp/spinref/SpinQuant --model-dir DIR --io DIR

Reads DIR/inputs.pt (written by spinquant_vs_reference.py: R1, R2s, windows, settings), writes DIR/outputs.pt.
What runs is the reference's own code: `train_utils.main.prepare_model` (its norm fusion, R4 on down_proj's weight,
`ActQuantWrapper`/`ActQuantizer` on every linear with its per-layer settings, `QKRotationWrapper` after RoPE),
`train_utils.modeling_llama_quant.LlamaForCausalLM` (R1/R2 applied inside the forward, float64 products), and
`train_utils.optimizer.SGDG` with transformers' cosine schedule (what its Trainer builds for
`--lr_scheduler_type cosine`, no warm-up). What its HF `Trainer` adds around `optimizer.step()` is done here by hand:
backward, then `clip_grad_norm_` of all trained parameters to `max_grad_norm` (the Trainer's default 1.0, which
scripts/10_optimize_rotation.sh does not change; 0 turns it off), step, scheduler step, zero_grad.

Stubbed / changed so that it runs on a CPU in float32:
- `fast_hadamard_transform.hadamard_transform` (CUDA only): a dense Sylvester matrix, x @ H_n * scale on the last
  dim (its backward, `HadamardTransform.backward`, calls the same);
- `torch.Tensor.cuda`: the identity (apply_exact_had_to_linear moves the down_proj weight to CUDA);
- the R1/R2 holders: a small module with a `weight` Parameter (optimize_rotation.RotateModule puts it on CUDA);
- the model in float32 (the script trains in bf16: `--bf16 True`), the Trainer not used (see above);
- the config: the checkpoint's config.json is transformers 5's (`rope_parameters`); rope_theta is read from it;
- optionally (`settings["had12"]`): `hadamard_utils.get_had12` returns the given +-1 matrix of order 12 (ours), so
  that R4 (had12 x H_128 for 1536) is the same matrix on both sides;
- optionally (`settings["center_embedding"]` False): the embedding rows restored after `fuse_layer_norms`, which
  subtracts each row's mean (a QuaRot step for LayerNorm models that changes an RMSNorm model's function).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import types
from pathlib import Path

import torch


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    if H.shape[0] != n:
        raise ValueError(f"fast_hadamard_transform takes powers of two, got {n}")
    return H


_SYL: dict = {}


def _cpu_hadamard_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    n = x.shape[-1]
    key = (n, x.dtype)
    if key not in _SYL:
        _SYL[key] = sylvester(n).to(x.dtype)
    return (x @ _SYL[key]) * scale


class Holder(torch.nn.Module):
    """Where the reference's model reads R1/R2 (`.weight`), on the CPU."""

    def __init__(self, R: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(R.to(torch.float32))


def load_reference(root: Path, had12):
    if not (root / "train_utils" / "optimizer.py").is_file():
        raise SystemExit(f"{root} has no train_utils/optimizer.py: pass a checkout of facebookresearch/SpinQuant")
    sys.modules["fast_hadamard_transform"] = types.SimpleNamespace(
        __name__="fast_hadamard_transform", hadamard_transform=_cpu_hadamard_transform)
    torch.Tensor.cuda = lambda self, *a, **k: self
    sys.path.insert(0, str(root.resolve()))
    from train_utils import apply_r3_r4, modeling_llama_quant, optimizer
    from train_utils import main as tmain
    from utils import hadamard_utils, quant_utils
    if had12 is not None:
        own = hadamard_utils.get_had12
        hadamard_utils.get_had12 = lambda: had12.to(torch.float32).clone()
        hadamard_utils.own_had12 = own
    return types.SimpleNamespace(prepare_model=tmain.prepare_model, Model=modeling_llama_quant.LlamaForCausalLM,
                                 SGDG=optimizer.SGDG, optimizer=optimizer, quant_utils=quant_utils,
                                 QKRotationWrapper=apply_r3_r4.QKRotationWrapper, hadamard_utils=hadamard_utils)


def build_config(model_dir: Path):
    import json

    import transformers
    raw = json.loads((model_dir / "config.json").read_text())
    rope = raw.get("rope_parameters") or {}
    keep = {k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
                                "rms_norm_eps", "attention_bias", "mlp_bias", "head_dim", "bos_token_id",
                                "eos_token_id", "pad_token_id") if k in raw}
    cfg = transformers.LlamaConfig(**keep, rope_theta=raw.get("rope_theta", rope.get("rope_theta", 10000.0)),
                                   rope_scaling=None, tie_word_embeddings=raw.get("tie_word_embeddings", False),
                                   attention_dropout=0.0, use_cache=False)
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"rope_type {rope.get('rope_type')} not handled here")
    return cfg


def plain_fp_loss(model_dir: Path, cfg, windows: torch.Tensor) -> list[float]:
    """The unrotated, unquantized model as transformers 4.44's own LlamaForCausalLM computes it."""
    import transformers
    m = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), config=cfg, torch_dtype=torch.float32,
                                                      attn_implementation="sdpa")
    m.eval()
    with torch.no_grad():
        out = [float(m(input_ids=w[None], labels=w[None], use_cache=False).loss) for w in windows]
    del m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", required=True, type=Path)
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--io", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    inp = torch.load(args.io / "inputs.pt")
    S = inp["settings"]
    t0 = time.time()
    out: dict = {"timings": {}}

    def log(msg):
        print(f"[reference {time.time() - t0:6.1f}s] {msg}", flush=True)

    ref = load_reference(args.reference_dir, inp.get("had12"))
    cfg = build_config(args.model_dir)
    out["plain_fp_loss"] = plain_fp_loss(args.model_dir, cfg, inp["probe"])
    log(f"plain FP loss {out['plain_fp_loss']}")

    # optimize_rotation.train(): untie the head (clone of the embeddings), load, prepare_model
    tied = cfg.tie_word_embeddings
    cfg.tie_word_embeddings = False
    model = ref.Model.from_pretrained(str(args.model_dir), config=cfg, torch_dtype=torch.float32,
                                      attn_implementation="sdpa")
    if tied:
        model.lm_head.weight.data = model.model.embed_tokens.weight.data.clone()
    emb_orig = model.model.embed_tokens.weight.data.clone()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ptq = argparse.Namespace(seed=0, fp32_had=True, w_bits=16, a_bits=4, a_groupsize=-1, a_asym=True,
                             a_clip_ratio=1.0, int8_down_proj=False, v_bits=4, v_asym=True, v_clip_ratio=1.0,
                             k_bits=4, k_groupsize=head_dim, k_asym=True, k_clip_ratio=1.0, k_pre_rope=False,
                             w_asym=False, w_clip=True, w_groupsize=-1)
    model = ref.prepare_model(ptq, model)
    emb_centered = model.model.embed_tokens.weight.data.clone()
    for p in model.parameters():
        p.requires_grad = False
    model.config.use_cache = False

    qlayers = ref.quant_utils.find_qlayers(model, layers=[ref.quant_utils.ActQuantWrapper])
    kwrappers = [layer.self_attn.apply_rotary_pos_emb_qk_rotation_wrapper
                 for layer in model.model.layers]
    out["o_proj_act_groupsize"] = qlayers["model.layers.0.self_attn.o_proj"].quantizer.groupsize
    out["down_proj_had_K"] = int(qlayers["model.layers.0.mlp.down_proj"].K)

    def configure(quant: bool, act_clip: float = 1.0, kv_clip: float = 1.0, o_group: int | None = None,
                  center: bool = False, act: bool = True, k: bool = True, v: bool = True, bits: int = 4):
        """Quantizers on/off (all: quant; each kind: act/k/v), their bits (asymmetric: maxq 2^bits - 1) and clip
        ratios, as prepare_model set them but for those; o_group: override o_proj's input group size (the
        reference's is head_dim)."""
        model.model.embed_tokens.weight.data.copy_(emb_centered if center else emb_orig)

        def setq(q, on, clip):
            q.bits = bits if on else 16
            q.maxq = torch.tensor(2 ** bits - 1)
            q.clip_ratio = clip

        for name, q in qlayers.items():
            setq(q.quantizer, quant and act and "lm_head" not in name, act_clip)
            if "o_proj" in name:
                q.quantizer.groupsize = head_dim if o_group is None else o_group
            if "v_proj" in name:
                setq(q.out_quantizer, quant and v, kv_clip)
        for w in kwrappers:
            setq(w.k_quantizer, quant and k, kv_clip)

    def set_rotations(R1, R2s):
        model.R1 = Holder(R1)
        for layer, R2 in zip(model.model.layers, R2s):
            layer.self_attn.R2 = Holder(R2)
        return [model.R1.weight] + [layer.self_attn.R2.weight for layer in model.model.layers]

    def loss_of(w, grad=False):
        with torch.set_grad_enabled(grad):
            return model(input_ids=w[None], labels=w[None]).loss

    model.eval()
    R1, R2s = inp["R1"], inp["R2s"]
    losses = {}
    for tag, kw in S["loss_cases"].items():
        set_rotations(R1, R2s)
        configure(**kw)
        losses[tag] = [float(loss_of(w)) for w in inp["probe"]]
        log(f"loss {tag}: {losses[tag]}")
    # the fixed Hadamards: R4 as its forward applies it (matmul_hadU_cuda: x -> H x), R3 (HadamardTransform / sqrt)
    hu = ref.hadamard_utils
    eye = torch.eye(cfg.intermediate_size, dtype=torch.float64)
    had_K, K = hu.get_hadK(cfg.intermediate_size)
    H4 = hu.matmul_hadU_cuda(eye, had_K.double(), K).T
    out["r4_K"] = K
    out["r4_vs_ours_max_abs"] = float((H4 - inp["r4_ours"]).abs().max())
    H3 = _cpu_hadamard_transform(torch.eye(head_dim, dtype=torch.float64)).T / math.sqrt(head_dim)
    out["r3_vs_ours_max_abs"] = float((H3 - inp["r3_ours"]).abs().max())
    if inp.get("had12") is not None and "q1" in S["loss_cases"]:  # its own had12 for R4, for comparison
        patched = hu.get_had12
        hu.get_had12 = hu.own_had12
        own_K, _ = hu.get_hadK(cfg.intermediate_size)
        hu.get_had12 = patched
        H4own = hu.matmul_hadU_cuda(eye, own_K.double(), K).T
        out["r4_own_vs_ours_max_abs"] = float((H4own - inp["r4_ours"]).abs().max())
        saved = []
        for layer in model.model.layers:  # down_proj: W H4^T -> W H4own^T, and the online had_K
            lin = layer.mlp.down_proj.module
            saved.append((lin.weight.data.clone(), layer.mlp.down_proj.had_K))
            lin.weight.data = (lin.weight.data.double() @ H4 @ H4own.T).float()
            layer.mlp.down_proj.had_K = own_K
        set_rotations(R1, R2s)
        configure(**S["loss_cases"]["q1"])
        losses["q1_own_had12"] = [float(loss_of(w)) for w in inp["probe"]]
        log(f"loss q1_own_had12: {losses['q1_own_had12']}")
        for layer, (W, hk) in zip(model.model.layers, saved):
            layer.mlp.down_proj.module.weight.data = W
            layer.mlp.down_proj.had_K = hk
    out["losses"] = losses

    grads = {}
    for tag in S["grad_cases"]:
        params = set_rotations(R1, R2s)
        configure(**S["loss_cases"][tag])
        loss = loss_of(inp["probe"][0], grad=True)
        loss.backward()
        grads[tag] = {"loss": float(loss.detach()), "R1": params[0].grad.double().clone(),
                      "R2s": [p.grad.double().clone() for p in params[1:]]}
        log(f"grad {tag}: loss {float(loss.detach()):.6f} |G1| {float(params[0].grad.norm()):.4e}")
    out["grads"] = grads

    # training: SGDG + transformers' cosine schedule, the Trainer's clip_grad_norm_, one window per step
    import transformers
    qr_calls = []
    own_qr = ref.optimizer.qr_retraction

    def counted_qr(t):
        qr_calls.append(len(qr_calls))
        return own_qr(t)

    ref.optimizer.qr_retraction = counted_qr
    runs = {}
    for tag, run in S["train_runs"].items():
        random.seed(run.get("seed", 0))  # SGDG's 1-in-101 QR retraction draws from `random`
        params = set_rotations(R1, R2s)
        configure(**S["loss_cases"][run["case"]])
        opt = ref.SGDG(params, lr=run["lr"], stiefel=True)
        sched = transformers.get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=run["steps"])
        n_qr = len(qr_calls)
        tr_losses, lrs, gnorms = [], [], []
        for step, w in enumerate(inp["train"]):
            loss = loss_of(w, grad=True)
            loss.backward()
            if run["max_grad_norm"] > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, run["max_grad_norm"])
            else:
                gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            opt.zero_grad()
            tr_losses.append(float(loss.detach()))
            gnorms.append(float(gn))
            log(f"train {tag} step {step + 1}/{len(inp['train'])}: loss {float(loss.detach()):.5f} lr {lrs[-1]:.4f} "
                f"grad norm {float(gn):.4e}")
        R1f = params[0].detach().double().clone()
        R2f = [p.detach().double().clone() for p in params[1:]]
        held = [float(loss_of(w)) for w in inp["heldout"]]
        log(f"held-out after {tag}: {held}")
        runs[tag] = {"losses": tr_losses, "lrs": lrs, "grad_norms": gnorms, "R1": R1f, "R2s": R2f,
                     "heldout_after": held, "qr_retractions": len(qr_calls) - n_qr}
    out["train"] = runs
    held0 = {}
    for case in {r["case"] for r in S["train_runs"].values()}:
        set_rotations(R1, R2s)
        configure(**S["loss_cases"][case])
        held0[case] = [float(loss_of(w)) for w in inp["heldout"]]
    out["heldout_before"] = held0
    out["seconds"] = round(time.time() - t0, 1)
    out["versions"] = {"torch": str(torch.__version__), "transformers": str(transformers.__version__)}
    torch.save(out, args.io / "outputs.pt")
    log("done")


if __name__ == "__main__":
    main()
