"""Reading a quantlib checkpoint back (the layout: `quantlib.checkpoint.writer`): the model with dequantized
weights, each layer's representation rebuilt from its format (`quantlib.formats.load_representation`), or any
checkpoint the workflow evaluates (quantized, packed or full precision)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlib.access.lazy import LazyModel, WeightSource
from quantlib.access.models import load_model
from quantlib.artifacts.integrity import rebuild_hint
from quantlib.catalog.names import PACK_REPORT, QUANT_METHOD
from quantlib.checkpoint.pack.load import load_packed, use_trellis_kernels
from quantlib.errors import DataError
from quantlib.formats import load_representation


def is_packed_dir(path: str | Path) -> bool:
    """A checkpoint written by the pack stage (`quantlib.checkpoint.pack`)."""
    return (Path(path) / PACK_REPORT).exists()


def is_quantized_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") == QUANT_METHOD


def read_representations(path: str | Path, qcfg: dict) -> tuple[dict, dict]:
    """(the unquantized tensors, {layer: representation}) of a checkpoint written by `save_quantized`, whose
    config's `quantization_config` is `qcfg`."""
    source = WeightSource(path)
    return read_part(source, qcfg, list(source.keys()), list(qcfg["layers"]))


def read_part(source: WeightSource, qcfg: dict, names, layers) -> tuple[dict, dict]:
    """`read_representations` of part of a checkpoint (one decoder block's shard, `quantlib.checkpoint.pack`): the
    tensors `names` are read, and `layers`, quantized layers whose stored tensors are among them, are rebuilt."""
    state = source.read(names)
    reps = {}
    for layer in layers:
        prefix = f"{layer}."
        tensors = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)
                                                           and k[len(prefix):] not in ("bias",)]}
        try:
            reps[layer] = load_representation(qcfg["layers"][layer], tensors)
        except (ValueError, KeyError) as exc:
            raise DataError(f"{source.path}: layer '{layer}' does not match its metadata "
                            f"({exc}); the checkpoint is damaged or was written by another version: "
                            f"{rebuild_hint(source.path)}") from exc
    return state, reps


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
                   with_representations: bool = False, trellis_backend: str | None = None):
    """Rebuild the model with dequantized weights from a directory written by `save_quantized`; with
    `with_representations`, also {layer: representation} (what a later stage such as distillation trains). With
    `trellis_backend` ("auto", "torch" or "triton"), the `trellis` (QTIP) layers become `PackedLinear` modules on
    their stored tensors whose forward runs through `quantlib.kernels.matmul_trellis` on that backend
    (`quantlib.checkpoint.pack.load.use_trellis_kernels`)."""
    lazy = LazyModel(path, dtype, attn)  # verifies the checksums
    if not lazy.quantized:
        raise DataError(f"{path} is not a quantlib checkpoint (its config.json has no quantlib quantization_config)")
    model = lazy.load_all()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:5]})")
    if not with_representations and trellis_backend is None:
        return model
    qcfg = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    reps = read_representations(path, qcfg)[1]
    if trellis_backend is not None:
        use_trellis_kernels(model, reps, trellis_backend)
    return (model, reps) if with_representations else model


def load_any(path: str | Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """A quantized directory, a packed one (quantlib.checkpoint.pack) or a plain full-precision checkpoint."""
    if is_quantized_dir(path):
        return load_quantized(path, dtype, attn)
    if is_packed_dir(path):
        return load_packed(path, dtype, attn)
    return load_model(path, dtype, attn)
