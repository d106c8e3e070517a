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
- QuaRot's online Hadamard on o_proj's input, as R4: W -> W H^T and x -> x H^T over the whole attention output
  (heads x head_dim), so its activations are quantized after every head is mixed with every other. QuaRot applies
  H_heads (x) I online and fuses its per-head H_d into v_proj, together a Hadamard of the whole size; here R2 is
  that per-head part and the online one covers the whole size, which needs no Hadamard of order heads (there is
  none of order 9, SmolLM2-135M's). SpinQuant has none (its R2 is learned).

Only Llama-style blocks are supported (RMSNorm gains applied as x * g, norms of the residual stream before attention
and MLP only): Llama, Mistral, Qwen2 and Qwen3. Qwen3's per-head norms of the queries and keys act on q_proj's and
k_proj's outputs, which R1 leaves unchanged, before RoPE and R3, so they stay as they are (not folded). Others are
refused by name (Gemma applies (1 + g) and normalises the sublayers' outputs, a gain R1 does not commute with;
OPT/BLOOM/NeoX use LayerNorm with a mean).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from quantlib.errors import UnsupportedArchitecture
from quantlib.transforms.hadamard import RandomHadamard, hadamard

log = logging.getLogger("quantlib")

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3")
_READERS_ATTN = ("q_proj", "k_proj", "v_proj")
_READERS_MLP = ("gate_proj", "up_proj")


def check_rotatable(model) -> None:
    """Refuse an architecture whose blocks the rotations here do not keep equivalent."""
    kind = model.config.model_type
    if kind not in ROTATABLE:
        raise UnsupportedArchitecture(
            f"rotations (QuaRot/SpinQuant) and activation/KV-cache quantization support the Llama-style model "
            f"types {', '.join(ROTATABLE)}; '{kind}' has other norms (LayerNorm's mean, Gemma's (1 + g) and its norms "
            "of the sublayers' outputs) that a rotation of the residual stream does not commute with, or other "
            "attention code")


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


def rotated_tensors(model, state, Q1: torch.Tensor, Q2s: list[torch.Tensor]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of `state` ({parameter name: tensor} of the model's embeddings, block linears
    and head, norms already folded) that R1 and R2 change, one at a time, in the dtype of the rotations: the one
    formula both in place (`apply_rotations`) and differentiably while SpinQuant learns Q1 and Q2s
    (`rotated_state`). Each tensor is read from `state` only when its product is made, and each is yielded as
    soon as it is final, so a consumer that writes each back before taking the next holds one product at a time
    (and a layer's v_proj and o_proj R1 products until their R2)."""
    _, head_dim, heads, kv_heads = dims(model)

    def reader(n):  # a linear reading the stream (or the embeddings): W -> W Q1
        return state[n].to(Q1.dtype) @ Q1

    def writer(n):  # a linear writing the stream: W -> Q1^T W
        return Q1.T @ state[n].to(Q1.dtype)

    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        n = f"{_name(model, module)}.weight"
        yield n, reader(n)
    for i, Q2 in enumerate(Q2s):
        p = f"model.layers.{i}."
        v, o = f"{p}self_attn.v_proj", f"{p}self_attn.o_proj"
        # The products are made in one fixed order (R1 on every linear, then R2 on v_proj's and o_proj's R1
        # products): autograd sums SpinQuant's gradients of R1 and R2 in the order their products were made, so
        # another order changes the learned rotations in their last bits.
        for n in ("self_attn.q_proj", "self_attn.k_proj"):
            yield f"{p}{n}.weight", reader(f"{p}{n}.weight")
        Wv = reader(f"{v}.weight")
        for n in ("mlp.gate_proj", "mlp.up_proj"):
            yield f"{p}{n}.weight", reader(f"{p}{n}.weight")
        Wo = writer(f"{o}.weight")
        yield f"{p}mlp.down_proj.weight", writer(f"{p}mlp.down_proj.weight")
        for n in (o, f"{p}mlp.down_proj"):
            if f"{n}.bias" in state:  # a bias of the stream: b -> b Q1
                yield f"{n}.bias", reader(f"{n}.bias")
        yield f"{v}.weight", _r2_rows(Wv, Q2, kv_heads, head_dim)
        del Wv
        if f"{v}.bias" in state:
            yield f"{v}.bias", (state[f"{v}.bias"].to(Q2.dtype).reshape(kv_heads, head_dim) @ Q2).reshape(-1)
        yield f"{o}.weight", _r2_cols(Wo, Q2, heads, head_dim)
        del Wo


def _r2_rows(W: torch.Tensor, Q2: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """v_proj's rows of head h W_h -> Q2^T W_h."""
    return torch.einsum("ji,hjd->hid", Q2, W.reshape(heads, head_dim, -1)).reshape(heads * head_dim, -1)


def _r2_cols(W: torch.Tensor, Q2: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """o_proj's columns of head h W[:, h] -> W[:, h] Q2."""
    return (W.reshape(W.shape[0], heads, head_dim) @ Q2).reshape(W.shape[0], -1)


def rotated_state(model, state: dict, Q1: torch.Tensor, Q2s: list[torch.Tensor]) -> dict:
    """`state` with R1 and R2 applied (`rotated_tensors`), as a new dict: what SpinQuant evaluates the model with
    while it learns Q1 and Q2s (the products keep the dtype, and the autograd graph, of the rotations)."""
    return {**state, **dict(rotated_tensors(model, state, Q1, Q2s))}


def apply_rotations(model, Q1: torch.Tensor, Q2s: list[torch.Tensor]) -> None:
    """R1 and R2 into the weights of a model whose norms are folded, in place and one tensor at a time: each
    float64 product is written back in the model's dtype and freed before the next is made, so the model is not
    held twice (`rotated_state`'s dict would hold every product at once)."""
    params = rotation_params(model)
    with torch.no_grad():  # the parameters themselves are the state: each read just before it is replaced
        for n, value in rotated_tensors(model, params, Q1.double(), [Q.double() for Q in Q2s]):
            _set(params[n], value)
            del value  # freed before the next product is made


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def rotation_params(model) -> dict:
    """{name: parameter} of what R1/R2 change: the embeddings, the block linears and the head."""
    keep = (".self_attn.", ".mlp.", "embed_tokens", "lm_head")
    return {n: p for n, p in model.named_parameters() if "norm" not in n and any(k in n for k in keep)}


def rotate_down_inputs(model) -> None:
    """R4's weight side: down_proj W -> W H^T; the forward applies x -> x H^T to its input."""
    for layer in model.model.layers:
        _rotate_input_side(layer.mlp.down_proj)


def rotate_o_inputs(model) -> None:
    """QuaRot's o_proj Hadamard, weight side: o_proj W -> W H^T; the forward applies x -> x H^T to its input."""
    for layer in model.model.layers:
        _rotate_input_side(layer.self_attn.o_proj)


def _rotate_input_side(linear) -> None:
    _set(linear.weight, hadamard(linear.weight.data.double(), dim=-1))


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
    apply_rotations(model, Q1, Q2s)
    rotate_down_inputs(model)


def quarot(model, spec, tokens=None) -> dict:
    """The `quarot` preprocessor (catalog: quantlib.catalog.rotations): random Hadamard R1/R2 seeded by the spec's
    `rotation_seed`, and the o_proj Hadamard unless `o_hadamard` is off. Returns diagnostics."""
    seed = spec.opt("rotation_seed")
    rotate_model(model, *quarot_rotations(model, seed))
    if spec.opt("o_hadamard"):
        rotate_o_inputs(model)
    return {"rotation": "quarot", "seed": seed, "o_hadamard": spec.opt("o_hadamard")}
