"""The pack stage: a quantlib checkpoint rewritten in a layout other runtimes load (docs/packing.md).

Formats (`quantlib.catalog.pack_formats`):
  ct       compressed-tensors `pack-quantized`: transformers and vLLM load it (uniform layers, integer zero points)
  gptq     GPTQ `gptq_v2` (uniform layers; loading needs gptqmodel)
  anyprec  Any-Precision LUT bit planes, the layout of GuidedQuant's released checkpoints (lookup-table layers, or
           per-channel uniform ones as their 2^b-entry tables)
  bcq      binary coding: sign planes, alpha and offset per (row, group) (bcq layers, or uniform ones mapped exactly)

Packing goes one decoder block at a time, as the quantized checkpoint is sharded (`quantlib.checkpoint.writer`): a
block's tensors are read, its layers converted and written as one shard of Hugging Face's sharded layout
(`model-{k}-of-{n}.safetensors` and `model.safetensors.index.json`, the names the quantized checkpoint has), then
freed; the tensors outside the blocks (embeddings, norms, head) make the last shard. Peak memory is one block's
source and packed tensors, or the outer ones (`quantlib.jobs.memory.pack_phases`), never the model. A checkpoint of
one `model.safetensors` (written before the sharded layout) is read the same way, block by block.

What the whole checkpoint decides is settled before any layer is converted: the checks the layers' metadata decides
(`check_meta`: formats, bit widths, group sizes, shapes), the small tensors a layout surveys (ct and gptq: every zero
point, to refuse real ones and to know whether the grid is symmetric) and the config. A refusal that only a layer's
tensors show (a statistic that does not fit the dtype) comes as its block is converted; the output is written into
a temporary folder renamed into place at the end, so a refusal never leaves anything at the output path.
`packable(spec, fmt)` is the torch-free part of those checks that a short name alone decides, for building the DAG.
`quantlib.checkpoint.pack.load.load_packed` reads any of these back into `PackedLinear` modules whose codes stay packed.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantlib.access.adapters import get_adapter
from quantlib.access.lazy import INDEX, WeightSource, all_finite, return_freed_memory
from quantlib.access.provenance import TOKENIZER_FILES
from quantlib.artifacts.atomic import atomic_dir
from quantlib.artifacts.integrity import rebuild_hint, verify
from quantlib.catalog.names import PACK_REPORT, QUANT_METHOD
from quantlib.catalog.pack_formats import DTYPES, pack_format
from quantlib.checkpoint.reader import read_part
from quantlib.checkpoint.writer import SHARD
from quantlib.errors import ConfigError, DataError


def torch_dtype(name: str):
    if name not in DTYPES:
        raise ConfigError(f"pack dtype '{name}' is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def checkpoint_parts(config: dict, names, layers) -> list[tuple[list[str], list[str]]]:
    """The checkpoint cut as its writer shards it: (tensor names, quantized layers) of each decoder block in order,
    then of everything else (the embeddings, norms and head)."""
    pattern = re.compile(rf"{re.escape(get_adapter(config.get('model_type', '?')).blocks)}\.(\d+)\.")

    def block(name: str) -> int | None:
        m = pattern.match(name)
        return None if m is None else int(m.group(1))

    n = 1 + max((i for i in map(block, names) if i is not None), default=-1)
    parts = [([], []) for _ in range(n + 1)]
    for name in names:
        parts[n if block(name) is None else block(name)][0].append(name)
    for layer in layers:
        i = block(f"{layer}.")
        parts[n if i is None else i][1].append(layer)
    return parts


def _survey(writer, source: WeightSource, metas: dict, parts) -> None:
    """Hand the writer each layer's `survey_leaves` (small tensors: zero points), one block's at a time."""
    stored = set(source.keys())
    for _, layers in [part for part in parts if part[1]]:
        wanted = {f"{layer}.{leaf}" for layer in layers for leaf in writer.survey_leaves}
        missing = sorted(wanted - stored)
        if missing:
            raise DataError(f"{source.path}: tensor '{missing[0]}' is not in the checkpoint; the checkpoint is "
                            f"damaged or was written by another version: {rebuild_hint(source.path)}")
        tensors = source.read(sorted(wanted))
        for layer in layers:
            writer.survey(layer, metas[layer], {leaf: tensors.pop(f"{layer}.{leaf}") for leaf in writer.survey_leaves})


def _convert_part(writer, source: WeightSource, qcfg: dict, names, layers, dt, sdt, dtype: str):
    """(the packed tensors, their quantized layers' bytes, those layers' weights) of one part of the checkpoint
    (`checkpoint_parts`): its unquantized tensors cast to `dt`, its layers converted one after another, each
    representation freed once converted."""
    state, reps = read_part(source, qcfg, names, layers)
    writer.check_tensors(reps)
    out = {}
    # Statistics are checked as each layer casts them (quantlib.checkpoint.pack.layouts._stat); the other tensors here.
    for key in list(state):
        value = state.pop(key)
        out[key] = (value.to(dt) if value.is_floating_point() else value).contiguous()
        if out[key].is_floating_point() and not all_finite(out[key]):
            raise ConfigError(f"tensor '{key}' is not finite in {dtype}; pack with pack.dtype float32")
    stored = weights = 0
    for layer in layers:
        rep = reps.pop(layer)
        for leaf, value in writer.layer_tensors(layer, rep, sdt).items():
            out[f"{layer}.{leaf}"] = value.contiguous()
            stored += value.numel() * value.element_size()
        weights += rep.shape[0] * rep.shape[1]
    return out, stored, weights


def pack_checkpoint(src, out_dir, fmt: str, dtype: str = "float16", stat_dtype: str = "float16") -> dict:
    """Write the quantlib checkpoint `src` as `fmt` into `out_dir` (atomically), one decoder block at a time:
    config.json, the shards with model.safetensors.index.json, the tokenizer files and pack_report.json. `dtype` is
    that of the unquantized tensors (embeddings, norms, head), `stat_dtype` that of scales, zero points and tables.
    Returns the report."""
    entry = pack_format(fmt)
    dt, sdt = torch_dtype(dtype), torch_dtype(stat_dtype)
    src, t0 = Path(src), time.perf_counter()
    verify(src)
    config = json.loads((src / "config.json").read_text())
    qcfg = config.pop("quantization_config", None)
    if not qcfg or qcfg.get("quant_method") != QUANT_METHOD:
        raise ConfigError(f"{src} is not a quantized checkpoint (no quantlib quantization_config): an unquantized "
                          "model has nothing to pack")
    metas = qcfg["layers"]
    writer = entry.writer()
    writer.check_meta(metas)  # the refusals the metadata decides, before any tensor is read
    source = WeightSource(src)
    parts = checkpoint_parts(config, list(source.keys()), list(metas))
    if writer.survey_leaves:
        _survey(writer, source, metas, parts)
    config.update(writer.config(metas, config, stat_dtype))
    config["torch_dtype"] = dtype
    quantized_bytes = quantized_weights = 0
    weight_map = {}
    with atomic_dir(out_dir, seal=True) as tmp:
        for k, (names, layers) in enumerate(parts):
            out, stored, weights = _convert_part(writer, source, qcfg, names, layers, dt, sdt, dtype)
            quantized_bytes, quantized_weights = quantized_bytes + stored, quantized_weights + weights
            name = SHARD.format(k + 1, len(parts))
            save_file(out, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, name))
            del out
            return_freed_memory()
        file_bytes = sum((tmp / name).stat().st_size for name in set(weight_map.values()))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": file_bytes}, "weight_map": weight_map},
                                            indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        report = {
            "format": fmt, "source": str(src), "spec": qcfg.get("spec"), "dtype": dtype, "stat_dtype": stat_dtype,
            "quantized_layers": len(metas), "quantized_weights": quantized_weights,
            "bits_per_weight_on_disk": 8 * quantized_bytes / max(1, quantized_weights),
            "file_bytes": file_bytes, "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / PACK_REPORT).write_text(json.dumps(report, indent=2))
    return report
