"""Peak host memory of the quantize and perplexity jobs against the memory model (quantlib.jobs.memory).

    # a synthetic model with Llama-2-7B's block shapes, 2 and then 8 blocks, written to disk in float16
    python benchmarks/memory_bench.py synthetic --blocks 2 8 --work /tmp/membench --record benchmarks/results.jsonl
    # a model directory of the workflow, with its calibration and evaluation windows
    python benchmarks/memory_bench.py model --model-dir resources/models/smollm2-135m-instruct-q4_1 \\
        --calib results/calibration/smollm2-135m-instruct-q4_1.c4.n32.L512.pt \\
        --windows results/evaldata/smollm2-135m-instruct-q4_1/wikitext2.L512.pt --max-windows 40
    # the streamed backward's two jobs alone: the gradients statistic and distillation of an RTN w3g64 base
    python benchmarks/memory_bench.py model --model-dir resources/models/smollm2-135m-instruct-q4_1 \
        --calib results/calibration/smollm2-135m-instruct-q4_1.c4.n32.L512.pt --stages gradients distill \
        --distill-calib results/calibration/smollm2-135m-instruct-q4_1.c4.n64.L512.pt [--compute '{"max_memory": "1500MB"}']

Each job runs in a fresh Python process that reports its own peak resident set (getrusage ru_maxrss): the quantize
job of `quantlib.jobs.steps.quantize` (blocks read from disk one at a time, the checkpoint written one shard per
block), block-by-block perplexity (`quantlib.evaluation.perplexity.perplexity_by_block` on the model read lazily),
and (stages `gradients`, `distill`) the jobs with a streamed backward: the statistics job of
`quantlib.jobs.steps.statistic` and the distillation job of `quantlib.jobs.steps.distill`; (stage `pack`) packing
one block at a time (`quantlib.jobs.steps.pack`). Figures
depend on the machine's allocator and library versions: compare the estimate's ratio, not the megabytes, across
machines. Run it alone: two torch processes on two cores slow each other, though peaks hardly move.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import record as rec

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8}
SHAPES = {"llama2-7b": LLAMA2_7B, "llama2-70b": LLAMA2_70B}

CHILD_QUANTIZE = """
import json, resource, sys, time
from quantlib.jobs.steps import quantize
name, model_dir, calib, out, compute = sys.argv[1:6]
inputs = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}  # statistics artifacts by name
t = time.time()
quantize(name, model_dir, {**({"calib": calib} if calib != "-" else {}), **inputs}, out, json.loads(compute))
print("RESULT", json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "seconds": time.time() - t,
                            "estimate": json.load(open(out + "/diagnostics.json"))["memory"]}))
"""

CHILD_PPL = """
import json, resource, sys, time, torch
from quantlib.evaluation.perplexity import perplexity_by_block
from quantlib.access.lazy import LazyModel
from quantlib.access.blocks import BlockAccess
path, windows, max_windows, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
w = torch.load(windows)
w = w["windows"] if isinstance(w, dict) else w
t = time.time()
lazy = LazyModel(path)
res = perplexity_by_block(lazy.model, w, max_windows, batch, access=BlockAccess(lazy.model, lazy=lazy), progress=False)
print("RESULT", json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           "seconds": time.time() - t, "ppl": res["ppl"], "windows": res["windows"]}))
"""

CHILD_STAT = """
import json, resource, sys, time
from quantlib.jobs.steps import statistic
stat, calib_name, model_dir, calib, out, compute = sys.argv[1:7]
t = time.time()
statistic(stat, calib_name, model_dir, calib, out, json.loads(compute))
print("RESULT", json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "seconds": time.time() - t, "streams": json.load(open(out + "/manifest.json"))["streams"]}))
"""

CHILD_DISTILL = """
import json, resource, sys, time
from quantlib.jobs.steps import distill
name, model_dir, base, calib, out, compute = sys.argv[1:7]
t = time.time()
distill(name, model_dir, {"base": base, "calib": calib}, out, json.loads(compute))
diag = json.load(open(out + "/diagnostics.json"))
print("RESULT", json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "seconds": time.time() - t, "estimate": diag["memory"],
                            "loss_first_last": [diag["distill"]["loss"][0], diag["distill"]["loss"][-1]]}))
"""


CHILD_PACK = """
import json, resource, sys, time
from quantlib.jobs.steps import pack
name, src, out = sys.argv[1:4]
t = time.time()
report = pack(name, src, out, {"dtype": "float16", "stat_dtype": "float16"}, {})
print("RESULT", json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "seconds": time.time() - t, "bits_per_weight_on_disk": report["bits_per_weight_on_disk"]}))
"""


def run_child(code: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def save_sealed(tensor, path: Path) -> None:
    """Windows as the workflow writes them: the jobs read only artifacts with a checksum record."""
    import torch

    from quantlib.artifacts.atomic import atomic_file

    with atomic_file(path, seal=True) as tmp:
        torch.save(tensor, tmp)


def write_synthetic(folder: Path, blocks: int, seed: int = 0, shape: dict = LLAMA2_7B) -> Path:
    """A Llama with `shape`'s sizes (default Llama-2-7B's) and `blocks` decoder blocks, random float16 weights (std
    0.02), one shard per block plus one for the embeddings and head, built tensor by tensor (never the whole
    model)."""
    import torch
    from safetensors.torch import save_file

    from quantlib.artifacts.integrity import CHECKSUMS, seal_dir

    if (folder / CHECKSUMS).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    c = shape
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]  # grouped-query attention's key/value rows
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)

    weight_map = {}
    n = blocks + 1
    for i in range(blocks):
        p = f"model.layers.{i}."
        state = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            state[f"{p}self_attn.{name}.weight"] = rand(rows, h)
        state[p + "mlp.gate_proj.weight"] = rand(inter, h)
        state[p + "mlp.up_proj.weight"] = rand(inter, h)
        state[p + "mlp.down_proj.weight"] = rand(h, inter)
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(state, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in state})
        del state
    state = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.float16),
             "lm_head.weight": rand(vocab, h)}
    shard = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(state, str(folder / shard), metadata={"format": "pt"})
    weight_map.update({k: shard for k in state})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": blocks,
           "torch_dtype": "float16", "tie_word_embeddings": False, "hidden_act": "silu", **c}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    seal_dir(folder)  # last: a folder with its checksum record is whole
    return folder


def measure(model_dir: Path, name: str, calib: Path | None, windows: Path | None, max_windows: int, batch: int,
            work: Path, compute: dict, stats: dict | None = None) -> dict:
    import shutil

    out = work / f"quantized-{model_dir.name}-{name}"
    shutil.rmtree(out, ignore_errors=True)
    q = run_child(CHILD_QUANTIZE, name, model_dir, calib or "-", out, json.dumps(compute), json.dumps(stats or {}))
    row = {"quantize": {**q, "peak_over_estimate": q["peak_mb"] / q["estimate"]["estimated_peak_mb"]}}
    if windows is not None:
        from quantlib.jobs.memory import MB, eval_peak

        cfg = json.loads((model_dir / "config.json").read_text())
        for label, path in (("fp", model_dir), ("quantized", out)):
            p = run_child(CHILD_PPL, path, windows, max_windows, batch)
            seqlen = _seqlen(windows)
            est = eval_peak(cfg, p["windows"], seqlen, batch) / MB
            row[f"perplexity_{label}"] = {**p, "estimated_peak_mb": round(est), "peak_over_estimate": p["peak_mb"] / est}
    shutil.rmtree(out, ignore_errors=True)
    return row


def measure_backward(model_dir: Path, calib: Path, stages: list[str], stat: str, distill_calib: Path | None,
                     base_method: str, work: Path, compute: dict, keep: bool = False) -> dict:
    """The jobs with a streamed backward, each in a fresh process: the statistic `stat` on `calib`, and
    distillation of `base_method` (quantized here first, in its own process) on `distill_calib`."""
    import shutil

    import torch

    from quantlib.catalog.names import CalibSpec
    from quantlib.jobs.memory import MB
    from quantlib.jobs.memory_backward import plan_statistic

    cfg = json.loads((model_dir / "config.json").read_text())
    row = {}
    if "gradients" in stages:
        n, seqlen = torch.load(calib).shape
        out = work / f"stat-{stat}"
        shutil.rmtree(out, ignore_errors=True)
        g = run_child(CHILD_STAT, stat, f"model.c4.n{n}.L{seqlen}", model_dir, calib, out, json.dumps(compute))
        est = plan_statistic(cfg, stat, CalibSpec("c4", n, seqlen), compute).peak / MB
        row[stat] = {**g, "estimated_peak_mb": round(est), "peak_over_estimate": g["peak_mb"] / est}
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    if "distill" in stages:
        n, seqlen = torch.load(calib).shape
        dn, dseqlen = torch.load(distill_calib).shape
        base, out = work / f"base-{base_method}", work / f"distilled-{base_method}"
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        run_child(CHILD_QUANTIZE, f"model.{base_method}", model_dir, "-", base, json.dumps(compute))
        name = f"model.{base_method}.kd.c4.n{dn}.L{dseqlen}"
        d = run_child(CHILD_DISTILL, name, model_dir, base, distill_calib, out, json.dumps(compute))
        row["distill"] = {**d, "name": name,
                          "peak_over_estimate": d["peak_mb"] / d["estimate"]["estimated_peak_mb"]}
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    return row


def measure_pack(model_dir: Path, base_method: str, fmt: str, work: Path, compute: dict) -> dict:
    """Packing (`quantlib.jobs.steps.pack`, one block at a time) of a `base_method` checkpoint quantized here
    first, in its own process, as the external layout `fmt`."""
    import shutil

    from quantlib.catalog.spec import QuantSpec
    from quantlib.jobs.memory import DTYPE_BYTES, MB, plan_pack

    base, out = work / f"base-{base_method}", work / f"packed-{base_method}-{fmt}"
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    run_child(CHILD_QUANTIZE, f"model.{base_method}", model_dir, "-", base, json.dumps(compute))
    name = f"model.{base_method}.pack-{fmt}"
    p = run_child(CHILD_PACK, name, base, out)
    cfg = json.loads((base / "config.json").read_text())
    stored = cfg.get("dtype") or cfg.get("torch_dtype")
    est = plan_pack(cfg, QuantSpec.parse(name), {"dtype": "float16", "stat_dtype": "float16"}, {},
                    DTYPE_BYTES.get(stored, 4)).peak / MB
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"pack": {**p, "name": name, "estimated_peak_mb": round(est), "peak_over_estimate": p["peak_mb"] / est}}


def _seqlen(windows: Path) -> int:
    import torch

    w = torch.load(windows)
    return (w["windows"] if isinstance(w, dict) else w).shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("--blocks", type=int, nargs="+", default=[2, 8])
    s.add_argument("--nsamples", type=int, default=8)
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--method", default="ldlq.w4g128")
    s.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b", help="the blocks' sizes")
    s.add_argument("--stages", nargs="+", default=["quantize", "perplexity"],
                   choices=["quantize", "perplexity", "gradients", "distill", "pack"],
                   help="quantize, perplexity (FP and quantized), the gradients statistic and distillation of an "
                        "RTN w4g128 base (the streamed backward's jobs), packing that base as ct")
    m = sub.add_parser("model")
    m.add_argument("--model-dir", type=Path, required=True)
    m.add_argument("--calib", type=Path, required=True, help="calibration windows (n, L) of the workflow")
    m.add_argument("--method", default="ldlq.w3g64")
    m.add_argument("--windows", type=Path, help="evaluation windows of the workflow (perplexity too)")
    m.add_argument("--max-windows", type=int, default=40)
    m.add_argument("--stages", nargs="+", default=["quantize"], choices=["quantize", "gradients", "distill", "pack"],
                   help="quantize (and perplexity with --windows); the streamed backward's gradients statistic and "
                        "distillation; packing --pack-base as ct")
    m.add_argument("--stat", default="gradients.G4", help="the statistic of stage gradients")
    m.add_argument("--stats", default="{}", help='JSON {statistic: artifact folder} the method reads, e.g. '
                                                '\'{"gradients": "results/stats/gradients.G4/..."}\' for sqllm')
    m.add_argument("--distill-calib", type=Path, help="distillation windows (n, L) of the workflow")
    m.add_argument("--base", default="rtn.w3g64", help="the method of the checkpoint stage distill distils")
    m.add_argument("--pack-base", default="rtn.w4g64", help="the method of the checkpoint stage pack packs")
    m.add_argument("--keep", action="store_true", help="keep the artifacts of the gradients and distill stages")
    for p in (s, m):
        p.add_argument("--compute", default="{}", help="JSON settings added to compute (block_streams, max_memory)")
        p.add_argument("--work", type=Path, default=Path("/tmp/quantlib-membench"))
        p.add_argument("--batch", type=int, default=4)
        rec.add_argument(p)
    args = ap.parse_args()
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    compute = {"device": "cpu", "dtype": "float32", **json.loads(args.compute)}
    runs = {}
    if args.what == "synthetic":
        shape = SHAPES[args.shape]
        calib = args.work / f"calib-n{args.nsamples}-L{args.seqlen}.pt"
        g = torch.Generator().manual_seed(0)
        save_sealed(torch.randint(0, shape["vocab_size"], (args.nsamples, args.seqlen), generator=g), calib)
        windows = args.work / f"windows-L{args.seqlen}.pt"
        save_sealed(torch.randint(0, shape["vocab_size"], (8, args.seqlen), generator=g), windows)
        for blocks in args.blocks:
            t = time.time()
            model_dir = write_synthetic(args.work / f"{args.shape}-shapes-{blocks}blocks", blocks, shape=shape)
            name = f"synthetic.c4.n{args.nsamples}.L{args.seqlen}.{args.method}"
            row = runs[f"{blocks}_blocks"] = {"write_seconds": round(time.time() - t, 1)}
            if "quantize" in args.stages:
                row.update(measure(model_dir, name, calib, windows if "perplexity" in args.stages else None, 8,
                                   args.batch, args.work, compute))
            row.update(measure_backward(model_dir, calib, args.stages, "gradients.G4", calib, "rtn.w4g128",
                                        args.work, compute))
            if "pack" in args.stages:
                row.update(measure_pack(model_dir, "rtn.w4g128", "ct", args.work, compute))
            print(json.dumps({blocks: row}, indent=1), flush=True)
        shapes = {"model": f"synthetic {args.shape} block shapes", **shape, "blocks": args.blocks,
                  "stages": args.stages, "weights_on_disk": "float16", "compute_dtype": "float32",
                  "compute": compute}
    else:
        calib = torch.load(args.calib)
        n, seqlen = calib.shape
        from quantlib.catalog.spec import QuantSpec
        from quantlib.errors import ConfigError

        stats = json.loads(args.stats)
        key = args.model_dir.name if stats else "model"  # statistics are checked against the model they were made of
        name, quantize_calib = f"{key}.c4.n{n}.L{seqlen}.{args.method}", args.calib
        try:
            QuantSpec.parse(name)
        except ConfigError:  # a method that reads no calibration (RTN): its name has none
            name, quantize_calib = f"{key}.{args.method}", None
        runs["model"] = {}
        if "quantize" in args.stages:
            runs["model"] = measure(args.model_dir, name, quantize_calib, args.windows, args.max_windows, args.batch,
                                    args.work, compute, stats)
        runs["model"].update(measure_backward(args.model_dir, args.calib, args.stages, args.stat, args.distill_calib,
                                              args.base, args.work, compute, args.keep))
        if "pack" in args.stages:
            runs["model"].update(measure_pack(args.model_dir, args.pack_base, "ct", args.work, compute))
        runs["model"]["compute"] = compute
        print(json.dumps(runs, indent=1))
        shapes = {"model": str(args.model_dir)}
    rec.append({"benchmark": "memory", **shapes, "runs": runs, "machine": platform.machine(),
                "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                "versions": __import__("quantlib.artifacts.atomic", fromlist=["versions"]).versions()}, args.record)


if __name__ == "__main__":
    main()
