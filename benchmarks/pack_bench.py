"""The pack stage on real checkpoints: size on disk, reload time, logit agreement and kernel speed.

    python benchmarks/pack_bench.py --quantized results/quantized/smollm2-135m-instruct-q4_1.rtn.w4g64 \\
        --formats ct gptq bcq --fp-dir resources/models/smollm2-135m-instruct-q4_1

For each checkpoint and format: bits per quantized weight on disk (the layer tensors' bytes x 8 / weights), the
file size against the fp16 checkpoint of the same model (parameters x 2 bytes), reload seconds with our loader and
(ct) with transformers + compressed-tensors, max |logit difference| of our loader against the external one and
against the quantlib checkpoint, on 2 x 128 random tokens. Then, per distinct layer shape, the CPU time of
dequantization and of a one-token product against a dense float32 matmul (torch backend), and on a GPU (when one is
present) the Triton GEMV against an fp16 cuBLAS GEMV: median of 100 after warm-up, achieved GB/s of the packed
weight, and decode tokens/s of the whole model over 100 one-token steps. Prints and appends one JSON line per
checkpoint to results/benchmarks/records.jsonl (`--record`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import record as rec
import torch

from quantlib.artifacts.atomic import versions
from quantlib.checkpoint.pack.load import PackedLinear, load_packed
from quantlib.checkpoint.pack.writer import pack_checkpoint
from quantlib.checkpoint.reader import load_quantized


def median_seconds(fn, repeats: int, warmup: int = 3, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def external_ct(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    # Asymmetric checkpoints need dequantize=True at load time (llm-compressor #1618/#1704, compressed-tensors #458).
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def layer_speed(model, device: str, repeats: int) -> list[dict]:
    """Per distinct (kind, shape, bits, group) of the packed layers: dequant and one-token product times."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if not isinstance(m, PackedLinear):
            continue
        key = (m.kind, m.out_features, m.in_features, m.bits, m.group_size)
        if key in seen:
            continue
        seen.add(key)
        m = m.to(device)
        x = torch.randn(1, m.in_features, device=device)
        dense = m.dequantize().float()
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        row = {"layer": name, "kind": m.kind, "shape": [m.out_features, m.in_features], "bits": m.bits,
               "group_size": m.group_size}
        m.backend = "torch"
        row["cpu_dequant_ms" if device == "cpu" else "torch_dequant_ms"] = 1e3 * median_seconds(m.dequantize, repeats, sync=sync)
        row["torch_product_ms"] = 1e3 * median_seconds(lambda: m(x), repeats, sync=sync)
        row["dense_fp32_matmul_ms"] = 1e3 * median_seconds(lambda: x @ dense.T, repeats, sync=sync)
        if device.startswith("cuda"):
            from quantlib import kernels

            m.backend = "triton"
            x16, dense16 = x.half(), dense.half()
            row["triton_gemv_ms"] = 1e3 * median_seconds(lambda: m(x16), 100, warmup=10, sync=sync)
            row["cublas_fp16_gemv_ms"] = 1e3 * median_seconds(lambda: x16 @ dense16.T, 100, warmup=10, sync=sync)
            packed_bytes = sum(b.numel() * b.element_size() for b in m.buffers())
            row["triton_gbps"] = packed_bytes / (row["triton_gemv_ms"] / 1e3) / 1e9
            row["cublas_gbps"] = dense16.numel() * 2 / (row["cublas_fp16_gemv_ms"] / 1e3) / 1e9
            del kernels
        out.append(row)
        m.to("cpu")
    return out


def decode_tokens_per_second(model, device: str, steps: int = 100) -> float:
    model = model.to(device).half()
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.backend = "triton"
    tok = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    past = None
    with torch.no_grad():
        for _ in range(5):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantized", type=Path, nargs="+", required=True, help="quantlib checkpoints")
    ap.add_argument("--formats", nargs="+", default=["ct"])
    ap.add_argument("--fp-dir", type=Path, help="the unquantized model (its parameter count sizes the fp16 baseline)")
    ap.add_argument("--stat-dtype", default="float16")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, help="keep the packed checkpoints here (default: a temporary folder)")
    rec.add_argument(ap)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(0))
    tmp = tempfile.TemporaryDirectory(prefix="pack-bench-")
    root = args.out or Path(tmp.name)
    for src in args.quantized:
        reference = load_quantized(src)
        params = sum(p.numel() for p in reference.parameters())
        ref_logits = logits(reference, tokens)
        del reference
        result = {"benchmark": "pack_bench", "checkpoint": src.name, "fp16_bytes": 2 * params,
                  "quantlib_bytes": sum(f.stat().st_size for f in Path(src).glob("*.safetensors")), "formats": {}}
        for fmt in args.formats:
            out = root / fmt / src.name
            try:
                report = pack_checkpoint(src, out, fmt, args.dtype, args.stat_dtype)
            except Exception as exc:  # a format that cannot hold this checkpoint: say why, go on
                result["formats"][fmt] = {"refused": str(exc)}
                continue
            t0 = time.perf_counter()
            ours = load_packed(out, torch.float32, backend="torch")
            row = {"bits_per_weight_on_disk": report["bits_per_weight_on_disk"], "file_bytes": report["file_bytes"],
                   "ratio_to_fp16": report["file_bytes"] / (2 * params), "pack_seconds": report["seconds"],
                   "reload_seconds_ours": time.perf_counter() - t0}
            our_logits = logits(ours, tokens)
            row["max_abs_dlogit_vs_quantlib"] = float((our_logits - ref_logits).abs().max())
            row["rel_l2_vs_quantlib"] = float((our_logits - ref_logits).norm() / ref_logits.norm())
            if fmt == "ct":
                t0 = time.perf_counter()
                ext = external_ct(out)
                row["reload_seconds_external"] = time.perf_counter() - t0
                row["max_abs_dlogit_ours_vs_external"] = float((logits(ext, tokens) - our_logits).abs().max())
                del ext
            row["layers"] = layer_speed(ours, device, args.repeats)
            if device == "cuda":
                row["decode_tokens_per_s"] = decode_tokens_per_second(ours, device)
            result["formats"][fmt] = row
            del ours
        result.update({"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                       "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                       "versions": versions()})
        print(json.dumps(result, indent=1))
        rec.append(result, args.record)


if __name__ == "__main__":
    main()
