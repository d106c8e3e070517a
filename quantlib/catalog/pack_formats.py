"""The pack formats: the layouts other runtimes load that the pack stage writes (`quantlib.checkpoint.pack`), with
the quantlib layer formats each can hold. Pure Python: short names (`.pack-{format}`), the config schema and the
Snakefile's wildcard read this list.

  ct       compressed-tensors `pack-quantized`: transformers and vLLM load it (uniform layers, integer zero points)
  gptq     GPTQ `gptq_v2` (uniform layers; loading needs gptqmodel)
  anyprec  Any-Precision LUT bit planes, the layout of GuidedQuant's released checkpoints (lookup-table layers, or
           per-channel uniform ones as their 2^b-entry tables)
  bcq      binary coding: sign planes, alpha and offset per (row, group) (bcq layers, or uniform ones mapped exactly)
"""

from __future__ import annotations

from quantlib.catalog import registry
from quantlib.errors import ConfigError

PACK_FORMATS = {
    "ct": "compressed-tensors pack-quantized",
    "gptq": "GPTQ v2",
    "anyprec": "Any-Precision lookup tables",
    "bcq": "binary coding",
}
# The quantlib layer formats each pack format can hold.
ACCEPTS = {"ct": ("uniform",), "gptq": ("uniform",), "anyprec": ("lut", "uniform"), "bcq": ("bcq", "uniform")}
DTYPES = ("float16", "bfloat16", "float32")


def check_format(fmt: str) -> None:
    if fmt not in PACK_FORMATS:
        raise ConfigError(f"unknown pack format '{fmt}'; known: {', '.join(PACK_FORMATS)}")


def packable(spec, fmt: str) -> str | None:
    """Why the model a short name describes cannot be packed as `fmt` (None if it can, as far as the name tells;
    the layer checks at pack time are the authority)."""
    check_format(fmt)
    if spec.is_fp:
        return "the unquantized model has no codes to pack"
    layer_format = registry.component("solver", spec.solver).format_for(spec)
    if layer_format not in ACCEPTS[fmt]:
        return (f"its layers are stored as '{layer_format}'; {fmt} holds {' or '.join(ACCEPTS[fmt])} layers")
    if fmt in ("ct", "gptq"):
        if spec.init == "neuqi":
            return "NeUQI's zero points are real numbers; ct and gptq store integers (use the neuqi_int init)"
        if spec.distill is not None and spec.distill.opt("train_zero"):
            return "distillation trained its zero points to real numbers; ct and gptq store integers"
    if fmt == "anyprec" and layer_format == "uniform" and spec.group_size != -1:
        return "Any-Precision has one table per row: a grouped uniform grid does not fit (use per channel, g -1)"
    return None
