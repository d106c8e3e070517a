"""Model families: where the decoder blocks are and which linear layers of a block are quantized, in true-sequential
order, grouped by shared input. Pure Python (no torch), so the Snakefile can check a model's config.json before any
job starts. Nothing is traced: an unknown architecture is a clear error, not a failure inside a forward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from quantlib.errors import ConfigError, DataError, UnsupportedArchitecture

if TYPE_CHECKING:  # annotations only: this module stays free of torch
    import torch


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks: str  # attribute path of the ModuleList of decoder blocks
    # Linear layers of one block, in execution order; the layers of one subgroup read the same input, so they share
    # one Hessian and are quantized together before the next subgroup's input is captured (true sequential).
    subgroups: tuple[tuple[str, ...], ...]
    # Input and output sizes of the quantized layers, read from config.json (for checks before any weight is loaded).
    input_dims: Callable[[dict], dict[str, int]]
    output_dims: Callable[[dict], dict[str, int]]

    def block_list(self, model) -> torch.nn.ModuleList:
        obj = model
        for part in self.blocks.split("."):
            obj = getattr(obj, part)
        return obj

    def linears(self, block) -> list[tuple[str, torch.nn.Linear]]:
        return [(name, block.get_submodule(name)) for group in self.subgroups for name in group]


def _llama_dims(c: dict) -> dict[str, int]:
    h = c["hidden_size"]
    return {"self_attn.q_proj": h, "self_attn.k_proj": h, "self_attn.v_proj": h,
            "self_attn.o_proj": c["num_attention_heads"] * c.get("head_dim", h // c["num_attention_heads"]),
            "mlp.gate_proj": h, "mlp.up_proj": h, "mlp.down_proj": c["intermediate_size"]}


def _llama_out(c: dict) -> dict[str, int]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads") or heads
    return {"self_attn.q_proj": heads * head_dim, "self_attn.k_proj": kv * head_dim,
            "self_attn.v_proj": kv * head_dim, "self_attn.o_proj": h, "mlp.gate_proj": c["intermediate_size"],
            "mlp.up_proj": c["intermediate_size"], "mlp.down_proj": h}


def _opt_out(c: dict) -> dict[str, int]:
    h = c["hidden_size"]
    return {"self_attn.k_proj": h, "self_attn.v_proj": h, "self_attn.q_proj": h, "self_attn.out_proj": h,
            "fc1": c["ffn_dim"], "fc2": h}


def _neox_out(c: dict) -> dict[str, int]:
    h = c["hidden_size"]
    return {"attention.query_key_value": 3 * h, "attention.dense": h, "mlp.dense_h_to_4h": c["intermediate_size"],
            "mlp.dense_4h_to_h": h}


def _bloom_falcon_out(c: dict) -> dict[str, int]:
    h = c["hidden_size"]
    heads = c.get("num_attention_heads") or c.get("n_head")
    head_dim = h // heads
    if c.get("new_decoder_architecture"):
        kv = c.get("num_kv_heads") or heads
        qkv = (heads + 2 * kv) * head_dim
    elif c.get("multi_query"):
        qkv = h + 2 * head_dim
    else:
        qkv = 3 * h
    ffn = c.get("ffn_hidden_size") or 4 * h
    return {"self_attention.query_key_value": qkv, "self_attention.dense": h, "mlp.dense_h_to_4h": ffn,
            "mlp.dense_4h_to_h": h}


def _opt_dims(c: dict) -> dict[str, int]:
    h = c["hidden_size"]
    return {"self_attn.k_proj": h, "self_attn.v_proj": h, "self_attn.q_proj": h, "self_attn.out_proj": h,
            "fc1": h, "fc2": c["ffn_dim"]}


def _neox_dims(c: dict) -> dict[str, int]:
    h = c["hidden_size"]
    return {"attention.query_key_value": h, "attention.dense": h, "mlp.dense_h_to_4h": h,
            "mlp.dense_4h_to_h": c["intermediate_size"]}


def _bloom_falcon_dims(c: dict) -> dict[str, int]:
    h = c["hidden_size"]
    ffn = c.get("ffn_hidden_size") or 4 * h  # BLOOM has no key (always 4h); Falcon's defaults to 4h
    return {"self_attention.query_key_value": h, "self_attention.dense": h, "mlp.dense_h_to_4h": h,
            "mlp.dense_4h_to_h": ffn}


_LLAMA = Adapter(
    "llama", "model.layers",
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    _llama_dims, _llama_out,
)
_OPT = Adapter(
    "opt", "model.decoder.layers",
    (("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    _opt_dims, _opt_out,
)
_NEOX = Adapter(
    "gpt_neox", "gpt_neox.layers",
    (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    _neox_dims, _neox_out,
)

# BLOOM and Falcon share module names. Falcon's attention and MLP read the same normalised input (parallel
# attention), so capturing the MLP's input after quantizing the attention is still exact.
_BLOOM = Adapter(
    "bloom", "transformer.h",
    (("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    _bloom_falcon_dims, _bloom_falcon_out,
)
_FALCON = Adapter("falcon", _BLOOM.blocks, _BLOOM.subgroups, _bloom_falcon_dims, _bloom_falcon_out)

# config.json `model_type` -> adapter. SmolLM2 is a Llama. Gemma 1-3 have Llama's linears in Llama's order; what
# differs lies outside them and is the model's own code: RMSNorm gains stored as w and applied as (1 + w) (a GGUF
# stores 1 + w; transformers subtracts the 1 on loading), query/key norms after q_proj/k_proj, norms after attention
# and MLP too, GeGLU, embeddings scaled by sqrt(hidden). Gemma 2 and 3 interleave sliding-window and global layers,
# each kind with its own mask and rotary table: quantlib.access.blocks.LayerKwargs hands each block its own.
# Gemma 3's text model is `gemma3_text` (its GGUF loads as one); `gemma3`, the multimodal model, is not supported.
# Gemma 2 loads only with `attn_implementation: eager` (transformers has no SDPA path for its soft-capping).
# See docs/architectures.md.
ADAPTERS: dict[str, Adapter] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
                                "gemma": _LLAMA, "gemma2": _LLAMA, "gemma3_text": _LLAMA,
                                "opt": _OPT, "gpt_neox": _NEOX, "bloom": _BLOOM, "falcon": _FALCON}


def get_adapter(model_type: str, model: str | None = None, where: str | Path | None = None) -> Adapter:
    """The adapter of a config.json's `model_type`; `model` (the config's key) and `where` (the config.json read)
    name what to look at when it has none."""
    if model_type not in ADAPTERS:
        whose = ", ".join(x for x in (f"model '{model}'" if model else "", f"config {where}" if where else "") if x)
        raise UnsupportedArchitecture(
            f"model type '{model_type}' is not supported; supported model types: {', '.join(sorted(ADAPTERS))}"
            f"{f' ({whose})' if whose else ''}. Support for another family is one Adapter entry in "
            "quantlib/access/adapters.py (ADAPTERS).")
    return ADAPTERS[model_type]


def adapter_for(model) -> Adapter:
    return get_adapter(model.config.model_type)


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise DataError(f"{path} does not exist: is '{model_dir}' a model directory?")
    return json.loads(path.read_text())


def _of_model(model: str | None) -> str:
    return f" of model '{model}'" if model else ""


def check_group_size(d_in: int, group_size: int, layer: str, model: str | None = None) -> None:
    """The one check of a group size: packed formats need whole groups, so it must divide every quantized layer's
    input size."""
    if group_size != -1 and d_in % group_size:
        raise ConfigError(f"group size {group_size} does not divide the input dimension {d_in} of layer '{layer}'"
                          f"{_of_model(model)}; packed formats need whole groups: use a divisor of {d_in} or -1 (per "
                          "channel)")


def check_row_groups(d_out: int, groups: int, layer: str, what: str, model: str | None = None) -> None:
    """The one check of a count of contiguous row blocks (GuidedQuant's g of `gq`, the saliency's G): it must divide
    every quantized layer's output size."""
    if groups > 1 and d_out % groups:
        raise ConfigError(f"{what} {groups} does not divide the output size {d_out} of layer '{layer}'"
                          f"{_of_model(model)}; use a divisor of {d_out}")


def check_group_size_fits(cfg: dict, group_size: int, model: str) -> None:
    """`check_group_size` for every quantized layer of a model's config.json."""
    for layer, d_in in get_adapter(cfg.get("model_type", "?")).input_dims(cfg).items():
        check_group_size(d_in, group_size, layer, model)


def check_row_groups_fit(cfg: dict, groups: int, model: str, what: str) -> None:
    """`check_row_groups` for every quantized layer of a model's config.json."""
    for layer, d_out in get_adapter(cfg.get("model_type", "?")).output_dims(cfg).items():
        check_row_groups(d_out, groups, layer, what, model)


def check_model_shapes(cfg: dict, model: str, group_sizes=(), row_groups=(), where: str | Path | None = None) -> None:
    """A supported architecture, and every group size (and GuidedQuant's row-block count) dividing every quantized
    layer's input (output) size: all from config.json (`where`, for the message), before any weight is read."""
    get_adapter(cfg.get("model_type", "?"), model, where)
    for g in group_sizes:
        check_group_size_fits(cfg, g, model)
    for g in row_groups:
        check_row_groups_fit(cfg, g, model, "gq")


