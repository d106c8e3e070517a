"""The GPU benchmark, on synthetic weights generated on the device (nothing is downloaded or read from ../shared):

  gemv      each pack format's GEMV kernel (quantlib.kernels, compiled Triton; one activation row, w4g128 or its
            format's nearest) against an fp16 cuBLAS matmul, at Llama-2-7B shapes (4096x4096, 11008x4096,
            4096x11008) and 70B shapes (8192x8192, 28672x8192, 8192x28672), as (d_out x d_in): microseconds per
            call (CUDA-graph replays, so launch overhead is left out; eager calls too), GB/s of the bytes read and
            written, and that as a fraction of the device's datasheet bandwidth (a table keyed by device name) and
            of the practical peak (a large device-to-device copy, bytes read plus written);
  quantize  seconds per decoder block of LDLQ (= GPTQ) w4g128 through the library's runner (quantlib.runner.walk.
            quantize_model: the calibration forward with its Hessian capture, the solver, the diagnostics) on a
            one-block Llama of 7B and of 70B block shapes, random weights, random calibration tokens;
  decode    tokens/s of batch-1 greedy decoding with the KV cache of a Llama with 7B layer shapes and few blocks,
            quantized by RTN, written by the checkpoint writer and packed by the pack writer
            (quantlib.checkpoint.pack.writer) in each pack format, loaded with its PackedLinear modules (the GEMV
            kernel per linear), against the same model's dense fp16 weights.

    python benchmarks/gpu_bench.py                                  # everything (sized for < 10 min on one H100)
    python benchmarks/gpu_bench.py --parts gemv --models 7b --formats ct bcq
    python benchmarks/gpu_bench.py --record benchmarks/results.jsonl    # add the runs to the repository's record

Not yet run on a GPU: written and checked on a CPU (--cpu-smoke), its time estimated (gemv under a minute, quantize
about one, decode a few: the pack stage converts on the CPU). The whole check of a device session (the GPU tests,
then this) is benchmarks/gpu_check.sh. Prints a table per part and appends one JSON line per part to
results/benchmarks/records.jsonl (`--record`) as each part ends, so a run stopped at a time limit keeps the parts
done; a part that fails is recorded with its traceback and the others still run (exit status 1). Without a CUDA
device it prints "no CUDA device; nothing measured" and exits 0; `--cpu-smoke` runs every part at toy shapes on the
CPU (torch kernels) to check the script itself (tests/gpu/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/record.py, also when imported by the tests
import record as rec  # noqa: E402

NO_CUDA = "no CUDA device; nothing measured"
PARTS = ("gemv", "quantize", "decode")

# Llama-2 shapes. `gemv` multiplies by each distinct linear; `quantize` builds one block, `decode` a few.
MODELS = {
    "7b": {"label": "Llama-2-7B", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 32},
    "70b": {"label": "Llama-2-70B", "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
            "num_key_value_heads": 8},
    # --cpu-smoke: the same code at toy shapes
    "toy": {"label": "toy", "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
            "num_key_value_heads": 2},
}
VOCAB = 32000

# Each pack format's kernel and the setting benchmarked (quantlib.catalog.pack_formats lists the formats; the loader
# reads ct and gptq into the uniform kernel, anyprec into lut, bcq into bcq). anyprec has one table per row.
FORMAT_KERNELS = {"ct": ("uniform", 4, 128), "gptq": ("uniform", 4, 128), "anyprec": ("lut", 4, -1),
                  "bcq": ("bcq", 4, 128)}
# The short names `decode` quantizes, first packable first (anyprec takes per-channel grids only).
DECODE_SOURCES = ("rtn.w4g128", "rtn.w4")

# Datasheet memory bandwidth in TB/s, by a substring of torch.cuda.get_device_name(); the first match wins, so the
# more specific names come first ("A100-SXM4-80GB" before "A100", "GH200" before "H200", "L40S" before "L4").
PEAK_BANDWIDTH_TBPS = (
    ("GH200", 4.0),
    ("H200", 4.8),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),  # SXM5, HBM3: "NVIDIA H100 80GB HBM3"
    ("H800", 3.35),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),  # the 40 GB cards
    ("A800", 2.039),
    ("L40S", 0.864),
    ("L40", 0.864),
    ("L4", 0.3),
    ("A10G", 0.6),
    ("A10", 0.6),
    ("V100", 0.9),
    ("RTX 4090", 1.008),
    ("RTX 3090", 0.936),
)


def peak_bandwidth_tbps(device_name: str) -> float | None:
    """The datasheet bandwidth of a device by its name (None: not in the table)."""
    name = device_name.lower()
    for key, tbps in PEAK_BANDWIDTH_TBPS:
        if key.lower() in name:
            return tbps
    return None


def gemv_shapes(model: str) -> list[tuple[str, int, int]]:
    """(linears, d_out, d_in) of each distinct linear shape of a Llama block: the attention's square projections
    (q and o; k and v too unless grouped-query), gate and up, down."""
    m = MODELS[model]
    h, i = m["hidden_size"], m["intermediate_size"]
    return [("q_proj/o_proj", h, h), ("gate_proj/up_proj", i, h), ("down_proj", h, i)]


def llama_config(model: str, layers: int, vocab: int = VOCAB):
    from transformers import LlamaConfig

    m = MODELS[model]
    return LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       **{k: v for k, v in m.items() if k != "label"})


# ---------------------------------------------------------------------------------------------------------------- #
# Records and tables


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"device": platform.processor() or platform.machine(), "peak_bandwidth_tbps": None}
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    return {"device": name, "peak_bandwidth_tbps": peak_bandwidth_tbps(name),
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "multiprocessors": props.multi_processor_count,
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1)}


def make_record(part: str, rows: list[dict], info: dict, settings: dict, seconds: float,
                error: str | None = None) -> dict:
    """One JSON line, in the fields every benchmark record has (benchmark, machine, threads, date, versions)."""
    from quantlib.artifacts.atomic import versions

    out = {"benchmark": f"gpu_{part}", **info, "settings": settings, "rows": rows, "seconds": round(seconds, 1)}
    if error is not None:
        out["error"] = error
    software = versions()
    software["cuda"] = torch.version.cuda
    try:
        import triton

        software["triton"] = triton.__version__
    except ImportError:
        pass
    out.update({"machine": platform.machine(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                "versions": software})
    return out


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of `columns` of `rows` (numbers to 4 significant digits, missing values blank)."""
    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[k]) for row in cells]) for k, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------- #
# Timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(calls: list, device: str, repeats: int) -> dict:
    """Seconds per call of `calls` run in turn: on CUDA the median over `repeats` replays of a CUDA graph of the
    calls (kernel time; `graph_s`) and of the eager calls (launch overhead included; `eager_s`); on the CPU the
    median eager time."""
    for f in calls:  # warm-up: Triton compiles here
        f()
    _sync(device)

    def median_of(run) -> float:
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        return statistics.median(times) / len(calls)

    def eager():
        for f in calls:
            f()

    out = {"eager_s": median_of(eager)}
    if device == "cuda":
        try:
            graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                eager()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                eager()
            graph.replay()
            out["graph_s"] = median_of(graph.replay)
        except Exception as exc:  # a call that cannot be captured: eager times only, and why
            out["graph_error"] = f"{type(exc).__name__}: {exc}"
    return out


def copy_bandwidth_tbps(device: str, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """The practical peak: a device-to-device copy of `nbytes`, counting the bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], device, repeats)
    return 2 * nbytes / t.get("graph_s", t["eager_s"]) / 1e12


# ---------------------------------------------------------------------------------------------------------------- #
# gemv


def synthetic_kernel_tensors(kind: str, d_out: int, d_in: int, bits: int, group_size: int, device: str,
                             dtype=torch.float16, seed: int = 0) -> tuple:
    """Random packed tensors of a kernel format, made on `device` (any bit pattern is a valid code stream)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n_groups = 1 if group_size == -1 else d_in // group_size

    def words(*shape):
        *lead, n = shape
        return torch.randint(0, 256, (*lead, 4 * n), generator=gen, dtype=torch.uint8, device=device).view(torch.int32)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device).to(dtype)

    if kind == "uniform":
        scales, zeros = rand(d_out, n_groups) * 0.01 + 0.001, rand(d_out, n_groups) * (2 ** bits - 1)
        return words(d_out, -(-d_in * bits // 32)), scales, zeros
    if kind == "lut":
        return words(d_out, -(-d_in * bits // 32)), rand(d_out, 2 ** bits) - 0.5
    if kind == "bcq":
        return words(bits, d_out, -(-d_in // 32)), rand(d_out, n_groups, bits) * 0.01, rand(d_out, n_groups) - 0.5
    raise ValueError(f"unknown kernel format '{kind}'")


def gemv_call(kind: str, x, tensors: tuple, bits: int, group_size: int, backend: str):
    from quantlib import kernels

    if kind == "uniform":
        return lambda: kernels.gemv_uniform(x, *tensors, bits, group_size, backend=backend)
    if kind == "lut":
        return lambda: kernels.gemv_lut(x, *tensors, bits, backend=backend)
    return lambda: kernels.gemv_bcq(x, *tensors, group_size, backend=backend)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copies_beyond_cache(weight_bytes: int, cache_bytes: int, most: int = 16) -> int:
    """How many copies of a weight the timing rotates through so that they do not all fit in the L2 cache (at
    least twice its size in all), at least 2 and at most `most`."""
    return max(2, min(most, math.ceil(2 * cache_bytes / max(1, weight_bytes))))


def bandwidth_row(row: dict, seconds: float, moved: int, peak_tbps: float | None, copy_tbps: float | None) -> dict:
    row["us"] = seconds * 1e6
    row["gbps"] = moved / seconds / 1e9
    row["of_peak"] = None if not peak_tbps else row["gbps"] / (peak_tbps * 1e3)
    row["of_copy"] = None if not copy_tbps else row["gbps"] / (copy_tbps * 1e3)
    return row


def bench_gemv(args, device: str, info: dict) -> list[dict]:
    backend = "triton" if device == "cuda" else "torch"
    cache = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) if device == "cuda" else 0
    peak, copy = info.get("peak_bandwidth_tbps"), info.get("copy_bandwidth_tbps")
    rows = []
    for model in args.models:
        for linears, d_out, d_in in gemv_shapes(model):
            x = torch.randn(1, d_in, device=device).to(torch.float16 if device == "cuda" else torch.float32)
            dt = x.dtype
            dense = [torch.randn(d_out, d_in, device=device, dtype=dt)]
            dense += [dense[0].clone() for _ in range(copies_beyond_cache(nbytes(dense[0]), cache) - 1)]
            t = time_calls([lambda w=w: x @ w.T for w in dense], device, args.repeats)
            base = bandwidth_row({"model": MODELS[model]["label"], "linears": linears, "shape": f"{d_out}x{d_in}",
                                  "format": "fp16 cuBLAS" if device == "cuda" else "dense torch", "bits": 16},
                                 t.get("graph_s", t["eager_s"]), nbytes(dense[0], x) + d_out * x.element_size(),
                                 peak, copy)
            base["eager_us"] = t["eager_s"] * 1e6
            rows.append(base)
            del dense
            for fmt in args.formats:
                kind, bits, group_size = FORMAT_KERNELS[fmt]
                first = synthetic_kernel_tensors(kind, d_out, d_in, bits, group_size, device, dt)
                sets = [first] + [synthetic_kernel_tensors(kind, d_out, d_in, bits, group_size, device, dt, seed)
                                  for seed in range(1, copies_beyond_cache(nbytes(*first), cache))]
                t = time_calls([gemv_call(kind, x, s, bits, group_size, backend) for s in sets], device, args.repeats)
                row = bandwidth_row({"model": MODELS[model]["label"], "linears": linears, "shape": f"{d_out}x{d_in}",
                                     "format": fmt, "kernel": kind, "bits": bits, "group_size": group_size,
                                     "bits_per_weight": 8 * nbytes(*first) / (d_out * d_in)},
                                    t.get("graph_s", t["eager_s"]), nbytes(*first, x) + d_out * x.element_size(),
                                    peak, copy)
                row["eager_us"] = t["eager_s"] * 1e6
                row["speedup_vs_fp16"] = base["us"] / row["us"]
                if "graph_error" in t:
                    row["graph_error"] = t["graph_error"]
                rows.append(row)
                del sets, first
    return rows


# ---------------------------------------------------------------------------------------------------------------- #
# quantize


def synthetic_model(model: str, layers: int, device: str, dtype, vocab: int = VOCAB):
    """A Llama of `model`'s shapes with `layers` blocks, its random weights initialised on `device`."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        net = AutoModelForCausalLM.from_config(llama_config(model, layers, vocab), dtype=dtype,
                                               attn_implementation="sdpa")
    net.config.use_cache = False
    return net.eval()


def quantize_name(bits: int, group_size: int, windows: int, seqlen: int) -> str:
    g = "" if group_size == -1 else f"g{group_size}"
    return f"synthetic.c4.n{windows}.L{seqlen}.ldlq.w{bits}{g}"


def bench_quantize(args, device: str, info: dict) -> list[dict]:
    from quantlib.catalog.spec import QuantSpec
    from quantlib.runner.walk import quantize_model

    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for model in args.models:
        name = quantize_name(4, 128, args.windows, args.seqlen)
        spec = QuantSpec.parse(name)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        net = synthetic_model(model, 1, device, dtype)
        tokens = torch.randint(0, net.config.vocab_size, (args.windows, args.seqlen),
                               generator=torch.Generator().manual_seed(0))
        _sync(device)
        t0 = time.perf_counter()
        report = quantize_model(net, spec, tokens, device=device, progress=False)
        _sync(device)
        seconds = time.perf_counter() - t0
        layers = report.layers
        rows.append({"model": MODELS[model]["label"], "name": name, "block_params": sum(
            d["shape"][0] * d["shape"][1] for d in layers.values()), "seconds_per_block": seconds,
            "solve_seconds": sum(_solve_seconds(layers).values()), "calibration_tokens": args.windows * args.seqlen,
            "mean_rel_error": statistics.mean(d["rel_error"] for d in layers.values()),
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None})
        del net, report
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _solve_seconds(layers: dict) -> dict:
    """Seconds of each subgroup's solve: the layers of a subgroup (q/k/v, gate/up) are solved together and each
    records the seconds since their solve began, so a subgroup's time is its last layer's."""
    out = {}
    for layer, diag in layers.items():
        block, _, name = layer.rpartition(".")
        key = (block, _SUBGROUP.get(name, name))
        out[key] = max(out.get(key, 0.0), diag["seconds"])
    return out


_SUBGROUP = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


# ---------------------------------------------------------------------------------------------------------------- #
# decode


def decode_tokens_per_second(net, device: str, steps: int, warmup: int = 4) -> float:
    """Greedy batch-1 decoding with the KV cache from a one-token prompt: tokens per second over `steps` steps."""
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    past = None
    with torch.no_grad():
        for k in range(warmup + steps):
            if k == warmup:
                _sync(device)
                t0 = time.perf_counter()
            out = net(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
    return steps / (time.perf_counter() - t0)


def bench_decode(args, device: str, info: dict) -> list[dict]:
    from quantlib.catalog.pack_formats import packable
    from quantlib.catalog.spec import QuantSpec
    from quantlib.checkpoint.pack.load import PackedLinear, load_packed
    from quantlib.checkpoint.pack.writer import pack_checkpoint
    from quantlib.checkpoint.writer import save_quantized
    from quantlib.runner.walk import quantize_model

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = args.decode_model
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        root = Path(tmp)
        (root / "tok").mkdir()
        specs = [QuantSpec.parse(f"synthetic.{short}") for short in DECODE_SOURCES]
        chosen = {fmt: next((s for s in specs if packable(s, fmt) is None), None) for fmt in args.formats}
        sources = {}
        for spec in [s for s in specs if s in chosen.values()] or specs[:1]:
            net = synthetic_model(model, args.decode_layers, device, dtype)
            t0 = time.perf_counter()
            report = quantize_model(net, spec, None, device=device, progress=False)
            quantize_s = time.perf_counter() - t0
            net.to(device)
            if not sources:  # the dense model with the same shapes: the fp16 baseline
                rows.append({"model": f"{MODELS[model]['label']} x{args.decode_layers} blocks", "format": "fp16 dense",
                             "tokens_per_s": decode_tokens_per_second(net, device, args.decode_tokens)})
            net.to("cpu")
            save_quantized(net, spec, report, root / spec.short_name(), root / "tok")
            sources[spec] = (root / spec.short_name(), quantize_s)
            del net, report
        for fmt, spec in chosen.items():
            if spec is None:
                rows.append({"format": fmt, "error": f"none of {list(DECODE_SOURCES)} packs as {fmt}"})
                continue
            src, quantize_s = sources[spec]
            report = pack_checkpoint(src, root / fmt, fmt, "float16", "float16")
            net = load_packed(root / fmt, dtype, backend="triton" if device == "cuda" else "torch").to(device)
            kinds = {m.kind for m in net.modules() if isinstance(m, PackedLinear)}
            if kinds != {FORMAT_KERNELS[fmt][0]}:
                raise RuntimeError(f"{fmt} loads into the {sorted(kinds)} kernels; FORMAT_KERNELS says "
                                   f"{FORMAT_KERNELS[fmt][0]}: update it")
            rows.append({"model": f"{MODELS[model]['label']} x{args.decode_layers} blocks", "format": fmt,
                         "source": spec.short_name(), "kernel": FORMAT_KERNELS[fmt][0],
                         "bits_per_weight": report["bits_per_weight_on_disk"], "quantize_s": quantize_s,
                         "pack_s": report["seconds"],
                         "tokens_per_s": decode_tokens_per_second(net, device, args.decode_tokens)})
            rows[-1]["speedup_vs_fp16"] = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
            del net
    return rows


# ---------------------------------------------------------------------------------------------------------------- #


TABLES = {
    "gemv": ["model", "shape", "format", "bits_per_weight", "us", "eager_us", "gbps", "of_peak", "of_copy",
             "speedup_vs_fp16"],
    "quantize": ["model", "name", "seconds_per_block", "solve_seconds", "mean_rel_error", "peak_gib"],
    "decode": ["model", "format", "bits_per_weight", "tokens_per_s", "speedup_vs_fp16", "pack_s"],
}
BENCHES = {"gemv": bench_gemv, "quantize": bench_quantize, "decode": bench_decode}


def parse_args(argv=None):
    from quantlib.catalog.pack_formats import PACK_FORMATS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--models", nargs="+", choices=["7b", "70b"], default=["7b", "70b"],
                    help="shapes of gemv and quantize")
    ap.add_argument("--formats", nargs="+", choices=sorted(PACK_FORMATS), default=sorted(PACK_FORMATS))
    ap.add_argument("--repeats", type=int, default=20, help="timed repetitions (medians)")
    ap.add_argument("--windows", type=int, default=32, help="calibration windows of quantize")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window of quantize")
    ap.add_argument("--decode-model", choices=["7b", "70b"], default="7b", help="layer shapes of decode")
    ap.add_argument("--decode-layers", type=int, default=2, help="decoder blocks of decode's model")
    ap.add_argument("--decode-tokens", type=int, default=64, help="timed decoding steps")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every part at toy shapes on the CPU (torch kernels): a check of this script")
    rec.add_argument(ap)
    args = ap.parse_args(argv)
    missing = set(FORMAT_KERNELS) ^ set(PACK_FORMATS)
    if missing:
        ap.error(f"FORMAT_KERNELS and quantlib.catalog.pack_formats differ on {sorted(missing)}: update FORMAT_KERNELS")
    if args.cpu_smoke:
        args.models, args.decode_model, args.windows, args.seqlen = ["toy"], "toy", 4, 16
        args.repeats, args.decode_tokens = min(args.repeats, 3), min(args.decode_tokens, 4)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    device = "cpu" if args.cpu_smoke else "cuda"
    info = device_info(device)
    if device == "cuda" and "gemv" in args.parts:
        info["copy_bandwidth_tbps"] = copy_bandwidth_tbps(device)
    print(json.dumps(info))
    failed = []
    for part in args.parts:
        t0 = time.perf_counter()
        error, rows = None, []
        try:
            rows = BENCHES[part](args, device, info)
        except Exception:  # one part failing leaves the others to run; its record says why
            error = traceback.format_exc()
            failed.append(part)
            print(error, file=sys.stderr)
        settings = {k: getattr(args, k) for k in ("models", "formats", "repeats", "windows", "seqlen",
                                                  "decode_model", "decode_layers", "decode_tokens")}
        print(f"\n{part} ({time.perf_counter() - t0:.0f}s)\n" + format_table(rows, TABLES[part]))
        rec.append(make_record(part, rows, info, settings, time.perf_counter() - t0, error), args.record)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
