"""The pack stage: a quantlib checkpoint rewritten in a layout other runtimes load (docs/packing.md).

Formats (`quantlib.catalog.pack_formats`):
  ct       compressed-tensors `pack-quantized`: transformers and vLLM load it (uniform layers, integer zero points)
  gptq     GPTQ `gptq_v2` (uniform layers; loading needs gptqmodel)
  anyprec  Any-Precision LUT bit planes, the layout of GuidedQuant's released checkpoints (lookup-table layers, or
           per-channel uniform ones as their 2^b-entry tables)
  bcq      binary coding: sign planes, alpha and offset per (row, group) (bcq layers, or uniform ones mapped exactly)

Every refusal happens before anything is written (`check_layers`), naming the layer and what to do. `packable(spec,
fmt)` is the torch-free part of those checks that a short name alone decides, for building the DAG.
`quantlib.checkpoint.pack.load.load_packed` reads any of these back into `PackedLinear` modules whose codes stay packed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantlib.access.provenance import TOKENIZER_FILES
from quantlib.artifacts.atomic import atomic_dir
from quantlib.artifacts.integrity import verify
from quantlib.catalog.names import PACK_REPORT, QUANT_METHOD
from quantlib.catalog.pack_formats import DTYPES, pack_format
from quantlib.checkpoint.reader import read_representations
from quantlib.errors import ConfigError


def torch_dtype(name: str):
    if name not in DTYPES:
        raise ConfigError(f"pack dtype '{name}' is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def pack_checkpoint(src, out_dir, fmt: str, dtype: str = "float16", stat_dtype: str = "float16") -> dict:
    """Write the quantlib checkpoint `src` as `fmt` into `out_dir` (atomically): config.json, model.safetensors,
    the tokenizer files and pack_report.json. `dtype` is that of the unquantized tensors (embeddings, norms, head),
    `stat_dtype` that of scales, zero points and tables. Returns the report."""
    entry = pack_format(fmt)
    dt, sdt = torch_dtype(dtype), torch_dtype(stat_dtype)
    src, t0 = Path(src), time.perf_counter()
    verify(src)
    config = json.loads((src / "config.json").read_text())
    qcfg = config.pop("quantization_config", None)
    if not qcfg or qcfg.get("quant_method") != QUANT_METHOD:
        raise ConfigError(f"{src} is not a quantized checkpoint (no quantlib quantization_config): an unquantized "
                          "model has nothing to pack")
    state, reps = read_representations(src, qcfg)
    writer = entry.writer()
    writer.check(reps)  # every refusal before any work
    packed_config = writer.config(reps, config, stat_dtype)
    # Statistics are checked as each layer casts them (quantlib.checkpoint.pack.layouts._stat); the other tensors here.
    out_state = {}
    for key, value in state.items():
        out_state[key] = (value.to(dt) if value.is_floating_point() else value).contiguous()
        if out_state[key].is_floating_point() and not torch.isfinite(out_state[key]).all():
            raise ConfigError(f"tensor '{key}' is not finite in {dtype}; pack with pack.dtype float32")
    quantized_bytes, quantized_weights = 0, 0
    for layer, rep in reps.items():
        tensors = writer.layer_tensors(layer, rep, sdt)
        for leaf, value in tensors.items():
            out_state[f"{layer}.{leaf}"] = value.contiguous()
            quantized_bytes += value.numel() * value.element_size()
        quantized_weights += rep.shape[0] * rep.shape[1]
    config.update(packed_config)
    config["torch_dtype"] = dtype
    report = {
        "format": fmt, "source": str(src), "spec": qcfg.get("spec"), "dtype": dtype, "stat_dtype": stat_dtype,
        "quantized_layers": len(reps), "quantized_weights": quantized_weights,
        "bits_per_weight_on_disk": 8 * quantized_bytes / max(1, quantized_weights),
    }
    with atomic_dir(out_dir, seal=True) as tmp:
        save_file(out_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        report["file_bytes"] = (tmp / "model.safetensors").stat().st_size
        report["seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / PACK_REPORT).write_text(json.dumps(report, indent=2))
    return report
