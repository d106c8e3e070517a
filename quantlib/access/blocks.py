"""Block access: how a walk over the decoder blocks (quantization, statistics, evaluation) reaches block i, held in
memory or read lazily from the checkpoint and freed after, with the keyword arguments of its own kind of layer."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from quantlib.access.adapters import adapter_for


class BlockAccess:
    """How the runner reaches decoder block i. In memory (the default): the model's own block, moved to the compute
    device and back. With `lazy` (a `quantlib.access.lazy.LazyModel`): read from the checkpoint when opened and freed when
    closed, the embeddings loaded only while the calibration windows go through them. `on_block(i, block)` is
    called when block i is done, before it is released (the checkpoint writer writes its shard). While block i is
    open it takes the keyword arguments of its own kind of layer (`LayerKwargs`). Without `quantized_weights`, a
    lazy model's quantized layers are not read (their weights stay on the meta device): the job builds those layers
    from their representations (distillation)."""

    def __init__(self, model, lazy=None, on_block: Callable | None = None, quantized_weights: bool = True):
        self.blocks = adapter_for(model).block_list(model)
        self.lazy, self.on_block, self.quantized_weights = lazy, on_block, quantized_weights
        self.layer_kwargs = LayerKwargs(model, self.blocks)
        self._hooks = {}

    def open(self, i: int, device):
        block = (self.lazy.load_block(i, device, quantized=self.quantized_weights) if self.lazy is not None
                 else self.blocks[i].to(device))
        if self.layer_kwargs.differs(i) and i not in self._hooks:
            self._hooks[i] = block.register_forward_pre_hook(self.layer_kwargs.hook(i), with_kwargs=True)
        return block

    def close(self, i: int, block) -> None:
        if i in self._hooks:
            self._hooks.pop(i).remove()
        if self.on_block is not None:
            self.on_block(i, block)
        if self.lazy is not None:
            self.lazy.release_block(i)
        elif str(next(block.parameters()).device) != "cpu":
            block.to("cpu")

    @contextlib.contextmanager
    def outer(self, device, head: bool = False):
        """The embeddings and everything else a forward pass needs before block 0 (and the output head)."""
        if self.lazy is None:
            yield
            return
        self.lazy.load_outer(head=head, device=device)
        try:
            yield
        finally:
            self.lazy.release_outer()


class _Stop(Exception):
    """Ends the recording pass once every kind of layer has been reached."""


class _Recorder(torch.nn.Module):
    """Stands in for a decoder block in the recording pass: keeps the keyword arguments the model hands it and passes
    the hidden states on (the families with several kinds of layer return a block's states bare, not in a tuple)."""

    def __init__(self, seen: dict, kind: str | None, last: bool):
        super().__init__()
        self.seen, self.kind, self.last = seen, kind, last

    def forward(self, hidden_states, *args, **kwargs):
        if self.kind is not None:
            self.seen[self.kind] = kwargs
        if self.last:
            raise _Stop
        return hidden_states


class LayerKwargs:
    """The keyword arguments that differ between kinds of decoder layer. Gemma 2 and 3 (and Qwen2 or Mistral with
    sliding windows on some layers) interleave sliding-window and global attention layers (`config.layer_types`):
    the model's forward hands each block the attention mask and the rotary table (cos, sin; Gemma 3's global layers
    have their own base frequency) of its kind. The walks capture block 0's arguments once and pass them to every
    block, so a block of another kind gets those values replaced by its own: what the model's own forward hands the
    first block of its kind, recorded once per input shape by one pass of the model on zero embeddings of that shape
    with every block replaced by a `_Recorder` (the windows carry no padding mask, so the masks and tables depend on
    the shape alone). Nothing changes for a model with one kind of layer."""

    def __init__(self, model, blocks):
        types = list(getattr(model.config, "layer_types", None) or [])[:len(blocks)]
        self.model, self.blocks = model, blocks
        self.types = types if len(set(types)) > 1 and len(types) == len(blocks) else None
        self._recorded: dict[tuple, dict] = {}

    def differs(self, i: int) -> bool:
        return self.types is not None and self.types[i] != self.types[0]

    def hook(self, i: int):
        def own_kwargs(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            return args, {**kwargs, **self.of(self.types[i], hidden)}
        return own_kwargs

    def of(self, kind: str, hidden: torch.Tensor) -> dict:
        """The arguments of a block of `kind` that differ from block 0's, for inputs shaped like `hidden`."""
        key = (tuple(hidden.shape[:2]), hidden.device, hidden.dtype)
        if key not in self._recorded:
            self._recorded[key] = self._record(hidden)
        return self._recorded[key][kind]

    def _record(self, hidden: torch.Tensor) -> dict[str, dict]:
        first = {}
        for i, kind in enumerate(self.types):
            first.setdefault(kind, i)
        last = max(first.values())
        seen: dict[str, dict] = {}
        originals = list(self.blocks)
        for i in range(len(self.blocks)):
            kind = self.types[i] if first[self.types[i]] == i else None
            self.blocks[i] = _Recorder(seen, kind, i == last)
        try:
            with torch.no_grad():
                self.model(inputs_embeds=torch.zeros_like(hidden), use_cache=False)
        except _Stop:
            pass
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
        base = seen[self.types[0]]
        # Values the model shares between kinds (the position ids) are the same objects: only the others differ.
        return {kind: {k: v for k, v in kw.items() if k not in base or v is not base[k]} for kind, kw in seen.items()}
