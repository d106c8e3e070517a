"""The pack formats: the layouts other runtimes load that the pack stage writes (`quantlib.checkpoint.pack`), with
the quantlib layer formats each can hold. This is their only list: short names (`.pack-{format}`), the config
schema, the Snakefile's wildcard and the pack stage's writers all read it. Pure Python (no torch): each entry's
writer class is imported lazily from its `impl` path ("module:attribute"), like the other catalog entries.

  ct       compressed-tensors `pack-quantized`: transformers and vLLM load it (uniform layers, integer zero points)
  gptq     GPTQ `gptq_v2` (uniform layers; loading needs gptqmodel)
  anyprec  Any-Precision LUT bit planes, the layout of GuidedQuant's released checkpoints (lookup-table layers, or
           per-channel uniform ones as their 2^b-entry tables)
  bcq      binary coding: sign planes, alpha and offset per (row, group) (bcq layers, or uniform ones mapped exactly)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from quantlib.catalog import registry
from quantlib.catalog.contract import forward_settings
from quantlib.errors import ConfigError


@dataclass(frozen=True)
class PackFormat:
    """A pack format. `impl` names its writer class (`check`, `layer_tensors`, `config`, `read`, `detects`), built
    with this entry; `accepts` the layer formats (keys of the catalog's FORMATS) it holds; `check(spec,
    layer_format)` says why a model of an accepted layer format still cannot be packed, as far as its short name
    tells (None if it can)."""

    name: str
    impl: str
    label: str
    accepts: tuple[str, ...]
    help: str = ""
    check: Callable[[Any, str], str | None] | None = None

    def load(self):
        return registry.load_impl(self.impl)

    def writer(self):
        """A fresh writer: it may keep what its config decided (ct: symmetric or not) for the layers it writes next."""
        return self.load()(self)


PACK_FORMATS: dict[str, PackFormat] = {}
DTYPES = ("float16", "bfloat16", "float32")


def register_pack_format(fmt: PackFormat) -> PackFormat:
    # The name is a `.pack-{format}` token, a path component and a wildcard alternative.
    if fmt.name in PACK_FORMATS or not re.fullmatch(r"[a-z][a-z0-9]*", fmt.name):
        raise ValueError(f"pack format name '{fmt.name}' is taken or not lower case letters and digits")
    unknown = [f for f in fmt.accepts if f not in registry.FORMATS]
    if not fmt.accepts or unknown:
        raise ValueError(f"pack format '{fmt.name}' must hold known layer formats; unknown: {unknown}")
    PACK_FORMATS[fmt.name] = fmt
    return fmt


def _integer_zeros(spec, layer_format: str) -> str | None:
    if spec.init == "neuqi":
        return "NeUQI's zero points are real numbers; ct and gptq store integers (use the neuqi_int init)"
    if spec.distill is not None and spec.distill.opt("train_zero"):
        return "distillation trained its zero points to real numbers; ct and gptq store integers"
    return None


def _one_table_per_row(spec, layer_format: str) -> str | None:
    if layer_format == "uniform" and spec.group_size != -1:
        return "Any-Precision has one table per row: a grouped uniform grid does not fit (use per channel, g -1)"
    return None


register_pack_format(PackFormat(
    "ct", "quantlib.checkpoint.pack.layouts:CompressedTensors", "compressed-tensors pack-quantized", ("uniform",),
    help="transformers and vLLM load it (uniform layers, integer zero points)", check=_integer_zeros))
register_pack_format(PackFormat(
    "gptq", "quantlib.checkpoint.pack.layouts:GptqV2", "GPTQ v2", ("uniform",),
    help="uniform layers, integer zero points; loading needs gptqmodel", check=_integer_zeros))
register_pack_format(PackFormat(
    "anyprec", "quantlib.checkpoint.pack.layouts:AnyPrecision", "Any-Precision lookup tables", ("lut", "uniform"),
    help="the layout of GuidedQuant's released checkpoints (lookup-table layers, or per-channel uniform ones as "
         "their 2^b-entry tables)", check=_one_table_per_row))
register_pack_format(PackFormat(
    "bcq", "quantlib.checkpoint.pack.layouts:BinaryCoding", "binary coding", ("bcq", "uniform"),
    help="sign planes, alpha and offset per (row, group) (bcq layers, or uniform ones mapped exactly)"))


def check_format(fmt: str) -> None:
    if fmt not in PACK_FORMATS:
        raise ConfigError(f"unknown pack format '{fmt}'; known: {', '.join(PACK_FORMATS)}")


def pack_format(fmt: str) -> PackFormat:
    check_format(fmt)
    return PACK_FORMATS[fmt]


def wildcard_pattern() -> str:
    """The regex of the Snakefile's `{packformat}` wildcard: any pack format's name."""
    return "|".join(re.escape(name) for name in PACK_FORMATS)


def packable(spec, fmt: str) -> str | None:
    """Why the model a short name describes cannot be packed as `fmt` (None if it can, as far as the name tells;
    the layer checks at pack time are the authority)."""
    entry = pack_format(fmt)
    if spec.is_fp:
        return "an FP model has nothing to pack (the unquantized model has no codes); pack a quantized model's name"
    if forward_settings(spec) is not None:
        return ("its forward quantizes activations or the KV cache or applies online Hadamards, which a packed "
                "layout (weights only) does not carry")
    layer_format = registry.component("solver", spec.solver).format_for(spec)
    if layer_format not in entry.accepts:
        return f"its layers are stored as '{layer_format}'; {fmt} holds {' or '.join(entry.accepts)} layers"
    return None if entry.check is None else entry.check(spec, layer_format)
