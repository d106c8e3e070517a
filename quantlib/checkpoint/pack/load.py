"""Loading a packed checkpoint (any pack format) into a model whose quantized linears are `PackedLinear` modules: the
codes stay packed in memory and every forward computes through `quantlib.kernels` (a GEMV kernel for inputs of a
few rows on a GPU, otherwise dequantize then matmul). Dequantization follows the external runtimes: (q - z) * s in
the statistics' dtype, then cast to the activations' dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlib.access.lazy import WeightSource
from quantlib.artifacts.integrity import rebuild_hint, verify
from quantlib.checkpoint.pack import layouts
from quantlib.errors import DataError


class PackedLinear(torch.nn.Module):
    """A linear layer stored in a packed format. `view` holds the kernel tensors (quantlib.checkpoint.pack.layouts)."""

    def __init__(self, view: dict, bias: torch.Tensor | None, backend: str = "auto"):
        super().__init__()
        self.kind, self.backend = view["kind"], backend
        self.out_features, self.in_features = view["shape"]
        self.bits, self.group_size = view["bits"], view.get("group_size", -1)
        self._tensor_names = [k for k, v in view.items() if isinstance(v, torch.Tensor)]
        for name in self._tensor_names:
            self.register_buffer(name, view[name])
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def _tensors(self) -> dict:
        return {name: getattr(self, name) for name in self._tensor_names}

    def dequantize(self) -> torch.Tensor:
        """The (d_out, d_in) weight, in the statistics' dtype."""
        from quantlib import kernels  # on first use: the kernels import Triton where it is installed

        t, d_in = self._tensors(), self.in_features
        if self.kind == "uniform":
            return kernels.dequant_uniform(t["qweight"], t["scales"], t["zeros"], self.bits, self.group_size, d_in,
                                           backend=self.backend)
        if self.kind == "lut":
            return kernels.dequant_lut(t["qweight"], t["lut"], self.bits, d_in, backend=self.backend)
        return kernels.dequant_bcq(t["planes"], t["alpha"], t["offset"], self.group_size, d_in, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A GEMV kernel for inputs of at most 8 rows when the backend is Triton (a decoding step on a GPU),
        otherwise dequantize then matmul (quantlib.kernels' matmul_*)."""
        from quantlib import kernels  # on first use: the kernels import Triton where it is installed

        t = self._tensors()
        if self.kind == "uniform":
            y = kernels.matmul_uniform(x, t["qweight"], t["scales"], t["zeros"], self.bits, self.group_size,
                                       backend=self.backend)
        elif self.kind == "lut":
            y = kernels.matmul_lut(x, t["qweight"], t["lut"], self.bits, backend=self.backend)
        else:
            y = kernels.matmul_bcq(x, t["planes"], t["alpha"], t["offset"], self.group_size, backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"bits={self.bits}, group_size={self.group_size}")


def load_packed(path, dtype: torch.dtype | None = None, attn: str = "sdpa", backend: str = "auto"):
    """The model of a packed checkpoint (ct, gptq, anyprec or bcq) with `PackedLinear` modules. Unquantized tensors
    are cast to `dtype` (default: as stored). The checkpoint is sharded (model.safetensors.index.json, as the pack
    stage writes it) or one `model.safetensors` (packed before that)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    verify(path)
    raw = json.loads((path / "config.json").read_text())
    fmt = layouts.detect(raw)
    state = WeightSource(path).state()
    views = layouts.read_layers(fmt, raw, state)
    if not views:
        raise DataError(f"{path}: no packed layer found for format {fmt}; the checkpoint is damaged: "
                        f"{rebuild_hint(path)}")
    model_cfg = layouts.model_config(raw)
    config = AutoConfig.for_model(**model_cfg)
    config._attn_implementation = attn
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    for layer, view in views.items():
        parent_name, _, child = layer.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child, None)
        if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != tuple(view["shape"]):
            raise DataError(f"{path}: packed layer '{layer}' {tuple(view['shape'])} does not match the model "
                            "architecture in config.json")
        bias = state.pop(f"{layer}.bias", None)
        setattr(parent, child, PackedLinear(view, bias, backend))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_packed_buffer(model, k)]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise DataError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]})")
    model.config.use_cache = False
    return model.eval()


def _is_packed_buffer(model, key: str) -> bool:
    module_name, _, _ = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(module_name), PackedLinear)
    except AttributeError:
        return False
