"""What a weight-and-activation quantized model does in its forward pass besides its (fake-quantized) weights:
per-token fake quantization of every decoder linear's input, the key and value cache quantized per head in groups,
and the online Hadamards of a rotated model (R4 on down_proj's input, R3 on queries and keys after RoPE; see
`quantlib.transforms.rotation`).

`install(model, settings)` puts it in place without changing any module or parameter name (so checkpoints are
written and read as for any model): a forward pre-hook on each decoder linear, and an attention function
registered with transformers' attention interface (`quantlib_sdpa` / `quantlib_eager`) that rotates and quantizes
q/k/v and then calls the standard one. The settings go into `model.config.quantlib_forward`, so a saved checkpoint's
config.json records them and `quantlib.access.lazy.LazyModel` installs the same forward when loading it.

Fake quantization uses a straight-through estimator, so a forward with quantizers in it can be trained through
(SpinQuant's rotations). The output head's input stays in full precision, as in QuaRot and SpinQuant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from quantlib.errors import ConfigError
from quantlib.transforms.hadamard import hadamard
from quantlib.transforms.rotation import check_rotatable

FULL = 16  # bits meaning "not quantized"
CONFIG_KEY = "quantlib_forward"


@dataclass(frozen=True)
class ForwardQuant:
    """act_*: every decoder linear's input, per token; kv_*: keys (after R3) and values, per token and head in groups
    of kv_group channels (0: the whole head). `rotated`: the online Hadamards R3/R4 of a rotated model;
    `o_rotated`: QuaRot's online Hadamard on o_proj's input too."""

    act_bits: int = FULL
    act_sym: bool = False
    act_clip: float = 1.0
    kv_bits: int = FULL
    kv_sym: bool = False
    kv_clip: float = 1.0
    kv_group: int = 0
    rotated: bool = False
    o_rotated: bool = False

    def __post_init__(self):
        for key in ("act_bits", "kv_bits"):
            if not 2 <= getattr(self, key) <= FULL:
                raise ConfigError(f"{key} must be between 2 and {FULL} ({FULL}: not quantized), got {getattr(self, key)}")
        for key in ("act_clip", "kv_clip"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"{key} is a fraction of each token's range in (0, 1], got {getattr(self, key)}")
        if self.kv_group < 0:
            raise ConfigError(f"kv_group must be >= 0 (0: the whole head), got {self.kv_group}")
        if self.o_rotated and not self.rotated:
            raise ConfigError("o_rotated (an online Hadamard on o_proj's input) belongs to a rotated model")

    @property
    def active(self) -> bool:
        return self.act_bits < FULL or self.kv_bits < FULL or self.rotated

    def to_dict(self) -> dict:
        return asdict(self)


def fake_quant(x: torch.Tensor, bits: int, sym: bool = False, clip: float = 1.0, group: int = 0) -> torch.Tensor:
    """Round-to-nearest along the last dim, one grid per group of `group` entries (0: the whole last dim), from the
    group's range shrunk by `clip`. Asymmetric: codes 0..2^b-1 over [clip * min(x, 0), clip * max(x, 0)] with an
    integer zero point; symmetric: codes -2^(b-1)..2^(b-1)-1, scale clip * max|x| / (2^(b-1) - 1). A group of zeros
    stays zero. Gradients pass straight through."""
    if bits >= FULL:
        return x
    shape = x.shape
    n = shape[-1]
    g = group or n
    if n % g:
        raise ConfigError(f"group size {g} does not divide the quantized dimension {n}")
    y = (x if x.dtype == torch.float64 else x.float()).reshape(*shape[:-1], n // g, g)  # half inputs: in float32
    if sym:
        top = 2 ** (bits - 1) - 1
        scale = (y.abs().amax(-1, keepdim=True) * clip / top).clamp_min(1e-8)
        deq = torch.clamp(torch.round(y / scale), -top - 1, top) * scale
    else:
        top = 2 ** bits - 1
        lo = y.amin(-1, keepdim=True).clamp_max(0) * clip
        hi = y.amax(-1, keepdim=True).clamp_min(0) * clip
        scale = ((hi - lo) / top).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        deq = (torch.clamp(torch.round(y / scale) + zero, 0, top) - zero) * scale
    deq = deq.reshape(shape).to(x.dtype)
    return x + (deq - x).detach() if x.requires_grad else deq


class _LinearInput:
    """Forward pre-hook of a decoder linear: the online Hadamard (R4 on down_proj of a rotated model; QuaRot's on
    o_proj), then the activation quantizer."""

    def __init__(self, fq: ForwardQuant, rotate: bool):
        self.fq, self.rotate = fq, rotate

    def __call__(self, module, args):
        x = args[0]
        if self.rotate:
            x = hadamard(x, dim=-1)
        x = fake_quant(x, self.fq.act_bits, self.fq.act_sym, self.fq.act_clip)
        return (x, *args[1:])


def attention_inputs(fq: ForwardQuant, query, key, value):
    """q, k, v (batch, heads, tokens, head_dim) as the quantized attention sees them: R3 on q and k, then the key and
    value cache fake-quantized per token and head in groups."""
    if fq.rotated:
        query, key = hadamard(query, dim=-1), hadamard(key, dim=-1)
    key = fake_quant(key, fq.kv_bits, fq.kv_sym, fq.kv_clip, fq.kv_group)
    value = fake_quant(value, fq.kv_bits, fq.kv_sym, fq.kv_clip, fq.kv_group)
    return query, key, value


_BASES = ("sdpa", "eager")


def _base_attention(base: str):
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward
    return eager_attention_forward


def _register() -> None:
    """Register `quantlib_{base}` with transformers' attention and mask interfaces (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    for base in _BASES:
        name = f"quantlib_{base}"
        if name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            continue
        inner = _base_attention(base)

        def attention(module, query, key, value, attention_mask, *args, inner=inner, **kwargs):
            fq = getattr(module, "quantlib_forward", None)
            if fq is not None:
                query, key, value = attention_inputs(fq, query, key, value)
            return inner(module, query, key, value, attention_mask, *args, **kwargs)

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])  # the base's own masks


def install(model, fq: ForwardQuant | dict) -> ForwardQuant:
    """Put the quantized forward in place on a Llama-style `model` (its modules may still be on the meta device: a
    lazily read model) and record the settings in its config. Installing again replaces the earlier one."""
    fq = ForwardQuant(**fq) if isinstance(fq, dict) else fq
    check_rotatable(model)
    uninstall(model)
    base = model.config._attn_implementation
    base = base.removeprefix("quantlib_") if isinstance(base, str) else base
    if base not in _BASES:
        raise ConfigError(f"activation/KV quantization wraps the sdpa or eager attention, not '{base}'")
    _register()
    hooks = []
    for layer in model.model.layers:
        layer.self_attn.quantlib_forward = fq
        for sub in (layer.self_attn, layer.mlp):
            for name, lin in sub.named_children():
                if isinstance(lin, torch.nn.Linear):
                    rotate = ((fq.rotated and sub is layer.mlp and name == "down_proj")
                              or (fq.o_rotated and sub is layer.self_attn and name == "o_proj"))
                    hooks.append(lin.register_forward_pre_hook(_LinearInput(fq, rotate)))
    model._quantlib_forward_hooks = hooks
    model.config._attn_implementation = f"quantlib_{base}"
    setattr(model.config, CONFIG_KEY, fq.to_dict())
    return fq


def uninstall(model) -> None:
    """Back to the plain forward (the weights stay as they are)."""
    for h in getattr(model, "_quantlib_forward_hooks", []):
        h.remove()
    model._quantlib_forward_hooks = []
    for layer in getattr(getattr(model, "model", None), "layers", []):
        layer.self_attn.__dict__.pop("quantlib_forward", None)
    impl = model.config._attn_implementation
    if isinstance(impl, str) and impl.startswith("quantlib_"):
        model.config._attn_implementation = impl.removeprefix("quantlib_")
    model.config.__dict__.pop(CONFIG_KEY, None)
