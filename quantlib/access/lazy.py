"""Models larger than memory: the decoder blocks stay in the checkpoint's safetensors (memory-mapped) until a job
reaches them, and go back to the meta device when it is done with them.

`WeightSource` reads single tensors from a checkpoint directory: one `model.safetensors`, or shards listed by
`model.safetensors.index.json` (Hugging Face's sharded layout, which `quantlib.checkpoint.export` also writes). `LazyModel` is
the model's skeleton on the meta device (no memory, no random init; buffers such as rotary tables are built) with
`load_block(i)` / `release_block(i)` and `load_outer()` / `release_outer()` for everything outside the blocks
(embeddings, final norm, head). A quantlib-quantized checkpoint is read the same way, each quantized layer
dequantized from its stored tensors when its block is loaded.

Peak memory is then one block (plus whatever the job holds per block: Hessians, activations) instead of the model;
`quantlib.jobs.memory` gives the figures.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from quantlib.access.adapters import get_adapter
from quantlib.artifacts.integrity import rebuild_hint, verify
from quantlib.catalog.names import QUANT_METHOD
from quantlib.errors import DataError
from quantlib.formats import load_representation
from quantlib.transforms.activations import CONFIG_KEY as FORWARD_KEY
from quantlib.transforms.activations import install as install_forward

INDEX = "model.safetensors.index.json"


class WeightSource:
    """The tensors of a checkpoint directory by name, each read from its file (memory-mapped) when asked for."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise DataError(f"{self.path} holds no safetensors weights; {rebuild_hint(self.path)}")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    weight_map.update({k: f.name for k in handle.keys()})
        self.files = weight_map  # tensor name -> file name

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self):
        return self.files.keys()

    def get(self, key: str) -> torch.Tensor:
        return self.read([key])[key]

    def read(self, keys) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once and closed again: a file kept open stays mapped, and the pages
        read from it would count in the process's resident memory until the end of the job."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for name, names in by_file.items():
            with safe_open(str(self.path / name), framework="pt") as handle:
                out.update({k: handle.get_tensor(k) for k in names})
        return out

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with `prefix`."""
        return self.read([k for k in self.files if k.startswith(prefix)])


def _unmapped(rep, mapped: set[int]):
    """`rep` (a format's dataclass) with its tensors that are stored tensors themselves (storage at an address in
    `mapped`, such as a grid's scales) copied: one of them alive keeps its whole file mapped, with every page read
    from it (the packed codes too) in the resident memory of a job that holds representations (distillation:
    ~100 MB per Llama-2-7B block)."""
    for field in dataclasses.fields(rep):
        value = getattr(rep, field.name)
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in mapped:
            object.__setattr__(rep, field.name, value.clone())  # frozen dataclasses too
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _unmapped(value, mapped)
    return rep


def all_finite(t: torch.Tensor, chunk: int = 1 << 17) -> bool:
    """No NaN or Inf in `t`, checked a slice of about `chunk` elements at a time along its first dimension, in any
    layout (a transposed view is read in its own, not copied): isfinite over a whole tensor takes 1.7x its size in
    temporaries (an embedding of 32k x 4096 floats: 0.9 GB), and slices of several MB stay with the allocator
    (+0.2 of a 6144^2 matrix measured with 4M-element slices)."""
    if t.dim() == 2 and not t.is_contiguous() and t.mT.is_contiguous():
        t = t.mT  # finiteness does not depend on the layout
    if t.dim() == 0:
        return bool(torch.isfinite(t))
    rows = max(1, chunk // max(1, t[0].numel()))
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


def quantized_layers(config: dict) -> dict:
    """{layer: metadata} of a quantlib checkpoint's config (empty for a plain model)."""
    qcfg = config.get("quantization_config") or {}
    return qcfg.get("layers", {}) if qcfg.get("quant_method") == QUANT_METHOD else {}


def _free(module: torch.nn.Module, keep: frozenset = frozenset()) -> None:
    """Parameters back to the meta device, but for those whose id is in `keep` (buffers stay: rotary tables and the
    like are not in the checkpoint)."""
    for mod in module.modules():
        for key, p in mod._parameters.items():
            if p is not None and p.device.type != "meta" and id(p) not in keep:
                mod._parameters[key] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=False)


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; nothing elsewhere). Called when a block is
    released: tensors of a few MB come from the heap, which otherwise keeps what they freed, and a job reading one
    block after another grows by ~10 MB per block (measured on the offline model: quantize peaked at 1.30 GB and
    rising without it). Fixing glibc's mmap threshold instead stops the growth too but makes every large
    allocation fault in fresh pages: perplexity ran 3x slower."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class LazyModel:
    """A model of the checkpoint at `path` whose weights are read block by block (see the module's docstring)."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path, self.dtype = Path(path), dtype
        verify(self.path)
        raw = json.loads((self.path / "config.json").read_text())
        self.adapter = get_adapter(raw.get("model_type", "?"))
        self.quantized = quantized_layers(raw)
        raw.pop("quantization_config", None)
        config = AutoConfig.for_model(**raw)
        config._attn_implementation = attn
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
        self.model.config.use_cache = False
        self.model.eval()
        if raw.get(FORWARD_KEY):  # a weight-and-activation quantized model: its quantized forward, as stored
            install_forward(self.model, raw[FORWARD_KEY])
        self.source = WeightSource(self.path)
        self.blocks = self.adapter.block_list(self.model)
        self.prefix = self.adapter.blocks
        # Some checkpoints (BLOOM) name tensors without the base model's prefix ("h.0..." for "transformer.h.0...").
        base = getattr(self.model, "base_model_prefix", "")
        self._strip = f"{base}." if base and not any(k.startswith(f"{base}.") for k in self.source.keys()) else ""
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def __len__(self) -> int:
        return len(self.blocks)

    def _key(self, name: str) -> str:
        return name[len(self._strip):] if self._strip and name.startswith(self._strip) else name

    def _stored_keys(self, layer: str) -> tuple[str, list[str]]:
        """(the checkpoint's prefix of a quantized layer, the keys of its stored tensors)."""
        prefix = f"{self._key(layer)}."
        return prefix, [k for k in self.source.keys() if k.startswith(prefix) and k[len(prefix):] != "bias"]

    def representations(self, layers) -> dict:
        """{layer: its stored representation} of quantized layers (model names), as the checkpoint holds them: the
        codes and the grid, not dequantized (a job that trains the grid, such as distillation)."""
        keys = {layer: self._stored_keys(layer) for layer in layers}
        tensors = self.source.read([k for _, names in keys.values() for k in names])
        reps = {}
        for layer, (prefix, names) in keys.items():
            stored = {k[len(prefix):]: tensors.pop(k) for k in names}
            reps[layer] = _unmapped(load_representation(self.quantized[layer], stored),
                                    {t.untyped_storage().data_ptr() for t in stored.values()})
        return reps

    def _read(self, names: list[str], where: str) -> dict[str, torch.Tensor]:
        """The named tensors (model names), quantized layers dequantized, in the model's dtype, checked finite."""
        wanted, quantized = {}, {}
        for name in names:
            layer, _, leaf = name.rpartition(".")
            if leaf == "weight" and layer in self.quantized:
                quantized[name] = (layer, *self._stored_keys(layer))
                wanted.update({k: None for k in quantized[name][2]})
            elif self._key(name) in self.source:
                wanted[self._key(name)] = None
            else:
                raise DataError(f"{self.path}: tensor '{name}' of {where} is not in the checkpoint; the checkpoint "
                                "does not match its config.json")
        tensors = self.source.read(list(wanted))  # mapped, not yet read: each is read as it is converted
        state = {}
        for name in names:
            if name in quantized:
                layer, prefix, keys = quantized[name]
                value = load_representation(self.quantized[layer], {k[len(prefix):]: tensors.pop(k) for k in keys}
                                            ).dequantize()
            else:
                value = tensors.pop(self._key(name))
            if value.is_floating_point():
                value = value.to(self.dtype)
                if not all_finite(value):
                    raise DataError(f"tensor '{name}' of the model in {self.path} holds NaN or Inf values; the "
                                    "checkpoint is damaged or was saved in a dtype too narrow for its values")
            state[name] = value
        return state

    def _load(self, module: torch.nn.Module, prefix: str, names: list[str], device) -> None:
        state = self._read([f"{prefix}{n}" for n in names], prefix.rstrip(".") or "the model")
        state = {n: state[f"{prefix}{n}"].to(device) for n in names}
        module.load_state_dict(state, strict=False, assign=True)

    def load_block(self, i: int, device="cpu", quantized: bool = True) -> torch.nn.Module:
        """Block i's weights read into its modules; without `quantized`, the quantized layers' weights stay on the
        meta device (a job that builds those layers from `representations` instead)."""
        block = self.blocks[i]
        skip = set() if quantized else {f"{layer[len(f'{self.prefix}.{i}.'):]}.weight" for layer in self.quantized
                                        if layer.startswith(f"{self.prefix}.{i}.")}
        names = [n for n, _ in block.named_parameters() if n not in skip]
        self._load(block, f"{self.prefix}.{i}.", names, device)
        return block

    def release_block(self, i: int) -> None:
        _free(self.blocks[i])
        return_freed_memory()

    def outer_names(self, head: bool = True) -> list[str]:
        """Parameters outside the decoder blocks (without the output head unless `head`; a tied head is the
        embedding and is never read on its own)."""
        in_blocks = {id(p) for p in self.blocks.parameters()}
        head_params = {id(p) for p in self.model.get_output_embeddings().parameters()}
        names = []
        for name, p in self.model.named_parameters(remove_duplicate=True):
            if id(p) in in_blocks or (id(p) in head_params and (not head or self.tied)):
                continue
            names.append(name)
        return names

    def load_outer(self, head: bool = True, device="cpu") -> None:
        """Embeddings, norms (and the head): what a forward pass needs besides the blocks."""
        self._load(self.model, "", self.outer_names(head), device)
        if self.tied:
            self.model.tie_weights()

    def release_outer(self) -> None:
        _free(self.model, keep=frozenset(id(p) for p in self.blocks.parameters()))

    def load_all(self, device="cpu"):
        """The whole model in memory (every block and everything outside them)."""
        self.load_outer(head=True, device=device)
        for i in range(len(self)):
            self.load_block(i, device)
        return self.model

    def outer_state(self) -> dict[str, torch.Tensor]:
        """Everything outside the blocks as the checkpoint stores it (tied head left out), in the model's dtype."""
        return self._read(self.outer_names(head=True), "the model")


def offloaded(lazy: LazyModel, folder: str | Path, device: str = "cpu"):
    """The whole model for a library that runs it in one piece (lm-eval), with the decoder blocks on disk:
    each block is written (dequantized, in the model's dtype) to `folder` as accelerate's offload files, and
    accelerate's hooks read it back for its forward and free it after. Peak memory: the embeddings and head, one
    block and one batch's activations; the price is reading every block from disk for every batch."""
    from accelerate import dispatch_model
    from accelerate.utils import offload_state_dict

    folder = Path(folder)
    for i in range(len(lazy)):
        block = lazy.load_block(i)
        offload_state_dict(folder, {f"{lazy.prefix}.{i}.{k}": v for k, v in block.state_dict().items()})
        lazy.release_block(i)
    lazy.load_outer(head=True, device=device)
    device_map = {f"{lazy.prefix}.{i}": "disk" for i in range(len(lazy))}
    in_blocks = {id(p) for p in lazy.blocks.parameters()}
    for name, p in lazy.model.named_parameters(remove_duplicate=False):  # the rest (a tied head too) on `device`
        if id(p) not in in_blocks:
            device_map[name.rpartition(".")[0]] = device
    return dispatch_model(lazy.model, device_map=device_map, main_device=device, offload_dir=str(folder),
                          offload_buffers=False)
