"""Loading a packed checkpoint (any pack format) into a model whose quantized linears are `PackedLinear` modules: the
codes stay packed in memory and every forward computes through `quantlib.kernels` (a GEMV kernel for inputs of a
few rows on a GPU, otherwise dequantize then matmul). Dequantization follows the external runtimes: (q - z) * s in
the statistics' dtype, then cast to the activations' dtype.

`trellis` layers (QTIP) have no pack format; `use_trellis_kernels` puts the same `PackedLinear` (kind "trellis", the
quantlib checkpoint's own tensors) in place of a loaded model's dequantized linears, so that their forward runs
through `quantlib.kernels.matmul_trellis` (`load_quantized(..., trellis_backend=...)` does it on loading).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch

from quantlib.access.lazy import WeightSource
from quantlib.artifacts.integrity import rebuild_hint, verify
from quantlib.checkpoint.pack import layouts
from quantlib.errors import DataError


class PackedLinear(torch.nn.Module):
    """A linear layer stored in a packed format. `view` holds the kernel tensors (quantlib.checkpoint.pack.layouts)."""

    # trellis: the float tensors kept as their raw bits (`model.to(dtype)` casts floating buffers; these are the
    # codes' exact parameters: float32 scales, float16 HYB table)
    _RAW_BITS: ClassVar[dict] = {"scales": torch.int32, "tlut": torch.int16}

    def __init__(self, view: dict, bias: torch.Tensor | None, backend: str = "auto"):
        super().__init__()
        self.kind, self.backend = view["kind"], backend
        self.out_features, self.in_features = view["shape"]
        self.bits, self.group_size = view["bits"], view.get("group_size", -1)
        if self.kind == "trellis":
            self.L, self.V, self.code, self.tile = view["L"], view["V"], view["code"], tuple(view["tile"])
        self._tensor_names = [k for k, v in view.items() if isinstance(v, torch.Tensor)]
        for name in self._tensor_names:
            t = view[name]
            if self.kind == "trellis" and name in self._RAW_BITS:
                t = t.to({torch.int32: torch.float32, torch.int16: torch.float16}[self._RAW_BITS[name]])
                t = t.contiguous().view(self._RAW_BITS[name])
            self.register_buffer(name, t)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def _tensors(self) -> dict:
        t = {name: getattr(self, name) for name in self._tensor_names}
        if self.kind == "trellis":
            t.update({name: t[name].view({torch.int32: torch.float32, torch.int16: torch.float16}[dtype])
                      for name, dtype in self._RAW_BITS.items() if name in t})
        return t

    def _trellis_args(self, t: dict) -> tuple:
        return (t["trellis"], t["scales"], t["seeds"], t["segments"], self.bits, self.L, self.V, self.code, self.tile)

    def dequantize(self) -> torch.Tensor:
        """The (d_out, d_in) weight, in the statistics' dtype."""
        from quantlib import kernels  # on first use: the kernels import Triton where it is installed

        t, d_in = self._tensors(), self.in_features
        if self.kind == "trellis":
            return kernels.dequant_trellis(*self._trellis_args(t), d_in, t.get("tlut"), backend=self.backend)
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
        if self.kind == "trellis":  # the GEMV in the transformed domain, y = A^T (W_t (B x)), or dequantize
            y = kernels.matmul_trellis(x, *self._trellis_args(t), t.get("tlut"), backend=self.backend)
        elif self.kind == "uniform":
            y = kernels.matmul_uniform(x, t["qweight"], t["scales"], t["zeros"], self.bits, self.group_size,
                                       backend=self.backend)
        elif self.kind == "lut":
            y = kernels.matmul_lut(x, t["qweight"], t["lut"], self.bits, backend=self.backend)
        else:
            y = kernels.matmul_bcq(x, t["planes"], t["alpha"], t["offset"], self.group_size, backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        if self.kind == "trellis":
            return (f"in_features={self.in_features}, out_features={self.out_features}, kind=trellis, k={self.bits}, "
                    f"L={self.L}, V={self.V}, code={self.code}, tile={self.tile}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"bits={self.bits}, group_size={self.group_size}")


def trellis_view(rep) -> dict:
    """A `PackedLinear` view of a `quantlib.formats.trellis.TrellisQuantized` layer: its stored tensors (the
    checkpoint's own layout) and parameters."""
    meta = rep.meta()
    return {"kind": "trellis", "shape": meta["shape"], "bits": meta["bits"], "L": meta["L"], "V": meta["V"],
            "code": meta["code"], "tile": meta["tile"], **rep.to_tensors()}


def use_trellis_kernels(model: torch.nn.Module, representations: dict, backend: str = "auto") -> list[str]:
    """Replace the linears of `model` whose representation (by module name) is a trellis layer with `PackedLinear`
    modules on their stored tensors (on the linear's device), so their forward runs through
    `quantlib.kernels.matmul_trellis`. Returns the replaced layers' names."""
    done = []
    for name, rep in representations.items():
        if getattr(rep, "format", None) != "trellis":  # not importing the format: the loader imports none but uniform
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != rep.shape:
            raise DataError(f"trellis layer '{name}' {rep.shape} does not match the model's module {old!r}")
        device = old.weight.device
        view = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in trellis_view(rep).items()}
        bias = None if old.bias is None else old.bias.detach()
        setattr(parent, child, PackedLinear(view, bias, backend))
        done.append(name)
    return done


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
