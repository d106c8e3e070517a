"""Rotations of a Llama-architecture model that leave its function unchanged (QuaRot, Ashkboos et al. 2024;
SpinQuant, Liu et al. 2024), applied to the weights in memory before quantization.

Conventions: a linear computes y = x W^T with W (out, in); the residual stream x (row vectors) becomes x Q1.

- Norm folding: an RMSNorm's gain g moves into the linears that read its output (W -> W diag(g), g -> 1), so that
  the norm commutes with an orthogonal Q (rms(x Q) = rms(x)). A tied output head is untied first (it is the
  embedding matrix, which takes Q1 on a different side than the folded head needs).
- R1 (Q1, hidden x hidden) on the residual stream: embeddings E -> E Q1; every linear reading the stream (q/k/v,
  gate/up, the head) W -> W Q1; every linear writing it (o, down) W -> Q1^T W, bias b -> b Q1.
- R2 (Q2, head_dim x head_dim, one per layer) on each head's values: v_proj's rows of head h W_h -> Q2^T W_h,
  o_proj's columns of head h W[:, h] -> W[:, h] Q2. Every attention head mixes the values of its own KV head with
  scalar weights, so the same Q2 for all heads commutes with the attention (grouped-query attention included).
- R4, online: down_proj's weight W -> W H^T (`hadamard` on its input side) and, in the forward, its input
  x -> x H^T (`quantlib.transforms.activations`): the product is unchanged and the quantized input is the rotated one.
- R3, online: queries and keys after RoPE, each head x -> x H^T (`quantlib.transforms.activations`): q.k unchanged,
  the key cache quantized in the rotated basis. No weight changes.

Only Llama-style blocks are supported (RMSNorm gains applied as x * g, norms before attention and MLP only, no
norms on queries or keys): Llama, Mistral, Qwen2. Others are refused by name (Gemma applies (1 + g) and has norms
after the sublayers; Qwen3 normalises queries and keys per head; OPT/BLOOM/NeoX use LayerNorm with a mean).
"""

from __future__ import annotations

import logging

import torch

from quantlib.errors import UnsupportedArchitecture
from quantlib.transforms.hadamard import RandomHadamard, hadamard

log = logging.getLogger("quantlib")

ROTATABLE = ("llama", "mistral", "qwen2")
_READERS_ATTN = ("q_proj", "k_proj", "v_proj")
_READERS_MLP = ("gate_proj", "up_proj")


def check_rotatable(model) -> None:
    """Refuse an architecture whose blocks the rotations here do not keep equivalent."""
    kind = model.config.model_type
    if kind not in ROTATABLE:
        raise UnsupportedArchitecture(
            f"rotations (QuaRot/SpinQuant) and activation/KV-cache quantization support the Llama-style model "
            f"types {', '.join(ROTATABLE)}; '{kind}' has other norms (LayerNorm's mean, Gemma's (1 + g), per-head "
            "query/key norms) that a rotation of the residual stream does not commute with, or other attention code")


def dims(model) -> tuple[int, int, int, int]:
    """(hidden size, head_dim, attention heads, KV heads)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.hidden_size, head_dim, c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads


def _set(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


def untie_head(model) -> bool:
    """Give the output head its own weight when it shares the embeddings'; True if it did (the stored checkpoint
    then holds the head separately and its config says `tie_word_embeddings: false`)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is not emb.weight and not getattr(model.config, "tie_word_embeddings", False):
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    log.info("rotation: the output head was tied to the embeddings; it is untied (stored separately)")
    return True


def fold_norms(model) -> None:
    """Move every RMSNorm gain into the linears that read the norm's output and set the gain to 1."""
    check_rotatable(model)
    untie_head(model)

    def fold(norm, linears):
        g = norm.weight.data.double()
        for lin in linears:
            _set(lin.weight, lin.weight.data.double() * g[None, :])
        norm.weight.data.fill_(1.0)

    for layer in model.model.layers:
        fold(layer.input_layernorm, [getattr(layer.self_attn, n) for n in _READERS_ATTN])
        fold(layer.post_attention_layernorm, [getattr(layer.mlp, n) for n in _READERS_MLP])
    fold(model.model.norm, [model.get_output_embeddings()])


def rotated_state(model, state: dict, Q1: torch.Tensor, Q2s: list[torch.Tensor]) -> dict:
    """R1 and R2 applied to `state` ({parameter name: tensor} of the model's embeddings, block linears and head,
    norms already folded), returned as a new dict: the one formula used both in place (`rotate_model`) and
    differentiably while SpinQuant learns Q1 and Q2s (the products keep the dtype of the rotations)."""
    _, head_dim, heads, kv_heads = dims(model)
    out = dict(state)
    emb = f"{_name(model, model.get_input_embeddings())}.weight"
    out[emb] = state[emb].to(Q1.dtype) @ Q1
    head = f"{_name(model, model.get_output_embeddings())}.weight"
    out[head] = state[head].to(Q1.dtype) @ Q1
    for i, Q2 in enumerate(Q2s):
        p = f"model.layers.{i}."
        for n in [f"self_attn.{n}" for n in _READERS_ATTN] + [f"mlp.{n}" for n in _READERS_MLP]:
            out[f"{p}{n}.weight"] = state[f"{p}{n}.weight"].to(Q1.dtype) @ Q1
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            out[f"{p}{n}.weight"] = Q1.T @ state[f"{p}{n}.weight"].to(Q1.dtype)
            if f"{p}{n}.bias" in state:
                out[f"{p}{n}.bias"] = state[f"{p}{n}.bias"].to(Q1.dtype) @ Q1
        # R2: v_proj's rows of head h W_h -> Q2^T W_h, o_proj's columns of head h W[:, h] -> W[:, h] Q2
        Wv = out[f"{p}self_attn.v_proj.weight"].reshape(kv_heads, head_dim, -1)
        out[f"{p}self_attn.v_proj.weight"] = torch.einsum("ji,hjd->hid", Q2, Wv).reshape(kv_heads * head_dim, -1)
        if f"{p}self_attn.v_proj.bias" in state:
            bv = state[f"{p}self_attn.v_proj.bias"].to(Q2.dtype).reshape(kv_heads, head_dim)
            out[f"{p}self_attn.v_proj.bias"] = (bv @ Q2).reshape(-1)
        Wo = out[f"{p}self_attn.o_proj.weight"]
        out[f"{p}self_attn.o_proj.weight"] = (Wo.reshape(Wo.shape[0], heads, head_dim) @ Q2).reshape(Wo.shape[0], -1)
    return out


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def rotation_params(model) -> dict:
    """{name: parameter} of what R1/R2 change: the embeddings, the block linears and the head."""
    keep = (".self_attn.", ".mlp.", "embed_tokens", "lm_head")
    return {n: p for n, p in model.named_parameters() if "norm" not in n and any(k in n for k in keep)}


def rotate_down_inputs(model) -> None:
    """R4's weight side: down_proj W -> W H^T; the forward applies x -> x H^T to its input."""
    for layer in model.model.layers:
        down = layer.mlp.down_proj
        _set(down.weight, hadamard(down.weight.data.double(), dim=-1))


def quarot_rotations(model, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """QuaRot's R1 and R2: seeded random Hadamard matrices (dense, float64), R2 one per layer."""
    hidden, head_dim, _, _ = dims(model)
    n_layers = len(model.model.layers)
    Q1 = RandomHadamard(hidden, seed).matrix().T
    Q2s = [RandomHadamard(head_dim, seed + 1 + i).matrix().T for i in range(n_layers)]
    return Q1, Q2s


def rotate_model(model, Q1: torch.Tensor, Q2s: list[torch.Tensor]) -> None:
    """Fold the norms, then R1, R2 and R4's weight side, in place. The model computes the same function once its
    forward applies the online Hadamards (`quantlib.transforms.activations.install` with rotated=True)."""
    fold_norms(model)
    params = rotation_params(model)
    rotated = rotated_state(model, {n: p.data for n, p in params.items()}, Q1.double(), [Q.double() for Q in Q2s])
    for n, p in params.items():
        _set(p, rotated[n])
    rotate_down_inputs(model)


def quarot(model, spec, tokens=None) -> dict:
    """The `quarot` preprocessor (catalog: quantlib.catalog.rotations): random Hadamard R1/R2 seeded by the spec's
    `rotation_seed`. Returns diagnostics."""
    seed = spec.opt("rotation_seed")
    rotate_model(model, *quarot_rotations(model, seed))
    return {"rotation": "quarot", "seed": seed}
