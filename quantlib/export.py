"""Saving a quantized model in Hugging Face layout and loading it back.

Layout of `results/quantized/{name}/`:
  config.json        the model config plus `quantization_config` (quant_method "quantlib", the short name, and each
                     quantized layer's format, bits and group size)
  model.safetensors  unquantized tensors as they are; for each quantized layer its stored tensors under
                     `{layer}.{tensor}` (uniform: `qweight` packed int32, `scales`, `zeros`) instead of `.weight`
  tokenizer files, quant_spec.json (the spec), diagnostics.json (per-layer errors, timings, versions)
Everything is checked for NaN/Inf before the directory is atomically renamed into place. The runner hands each
layer's representation to a `CheckpointWriter`, which packs it (`to_tensors`); loading rebuilds each layer from its
format (`quantlib.formats.load_representation`), whichever module defines it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from .errors import DataError, NumericalError
from .integrity import verify
from .io import atomic_dir, versions
from .models import _TOKENIZER_FILES, load_model
from .formats import load_representation

QUANT_METHOD = "quantlib"


class CheckpointWriter:
    """Collects each quantized layer's stored tensors (packed as its format says) and writes the checkpoint."""

    def __init__(self):
        self.stored: dict[str, tuple[dict, dict]] = {}  # layer -> (meta, tensors on the CPU)

    def add(self, layer: str, rep) -> None:
        self.stored[layer] = (rep.meta(), {k: v.cpu() for k, v in rep.to_tensors().items()})

    def save(self, model, spec, report, out_dir: str | Path, tokenizer_dir: str | Path, extra: dict | None = None):
        _save(model, spec, report, self.stored, out_dir, tokenizer_dir, extra)


def save_quantized(model, spec, report, out_dir: str | Path, tokenizer_dir: str | Path, extra: dict | None = None):
    """Write `model` (quantized in place) with the representations the runner kept in `report.reps`."""
    writer = CheckpointWriter()
    for layer, rep in report.reps.items():
        writer.add(layer, rep)
    writer.save(model, spec, report, out_dir, tokenizer_dir, extra)


def _save(model, spec, report, stored: dict, out_dir, tokenizer_dir, extra):
    from safetensors.torch import save_file

    state = {}
    for key, value in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and layer in stored:
            continue
        state[key] = value.contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for layer, (meta, tensors) in stored.items():
        for leaf, value in tensors.items():
            state[f"{layer}.{leaf}"] = value.contiguous()
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise NumericalError(f"tensor '{key}' contains NaN or Inf; nothing was saved")
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format_version": 1, "spec": spec.short_name(),
        "layers": {layer: meta for layer, (meta, _) in stored.items()},
    }
    with atomic_dir(out_dir, seal=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        (tmp / "quant_spec.json").write_text(json.dumps(
            {"short_name": spec.short_name(), **dataclasses.asdict(spec)}, indent=2))
        diagnostics = {"short_name": spec.short_name(), "seconds": report.seconds, "versions": versions(),
                       "avg_bits_per_weight": average_bits(report.layers), **(extra or {}), "layers": report.layers}
        if report.blocks:
            diagnostics["blocks"] = report.blocks
        (tmp / "diagnostics.json").write_text(json.dumps(diagnostics, indent=2))


def average_bits(layers: dict) -> float:
    """Storage bits per quantized weight over the whole model (grid statistics and outliers included)."""
    sizes = {k: d["shape"][0] * d["shape"][1] for k, d in layers.items()}
    return sum(d["bits_per_weight"] * sizes[k] for k, d in layers.items()) / max(1, sum(sizes.values()))


def is_quantized_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") == QUANT_METHOD


def read_representations(path: str | Path, qcfg: dict) -> tuple[dict, dict]:
    """(the unquantized tensors, {layer: representation}) of a checkpoint written by `save_quantized`, whose
    config's `quantization_config` is `qcfg`."""
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / "model.safetensors"))
    reps = {}
    for layer, meta in qcfg["layers"].items():
        prefix = f"{layer}."
        tensors = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)
                                                           and k[len(prefix):] not in ("bias",)]}
        try:
            reps[layer] = load_representation(meta, tensors)
        except (ValueError, KeyError) as exc:
            raise DataError(f"{Path(path) / 'model.safetensors'}: layer '{layer}' does not match its metadata "
                            f"({exc}); the checkpoint is damaged or was written by another version: delete it and "
                            "rerun") from exc
    return state, reps


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
                   with_representations: bool = False):
    """Rebuild the model with dequantized weights from a directory written by `save_quantized`; with
    `with_representations`, also {layer: representation} (what a later stage such as distillation trains)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    verify(path)
    raw = json.loads((path / "config.json").read_text())
    qcfg = raw.pop("quantization_config")
    config = AutoConfig.for_model(**raw)
    config._attn_implementation = attn
    # Parameters on the meta device (no random init); buffers such as rotary tables are built normally.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    state, reps = read_representations(path, qcfg)
    for layer, rep in reps.items():
        state[f"{layer}.weight"] = rep.dequantize()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.config.use_cache = False
    return (model.eval(), reps) if with_representations else model.eval()


def load_any(path: str | Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """A quantized directory, a packed one (quantlib.pack) or a plain full-precision checkpoint."""
    if is_quantized_dir(path):
        return load_quantized(path, dtype, attn)
    if (Path(path) / "pack_report.json").exists():
        from .pack.load import load_packed

        return load_packed(path, dtype, attn)
    return load_model(path, dtype, attn)
