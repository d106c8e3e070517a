"""Block access: how a walk over the decoder blocks (quantization, statistics, evaluation) reaches block i, held in
memory or read lazily from the checkpoint and freed after."""

from __future__ import annotations

import contextlib
from typing import Callable

from quantlib.access.adapters import adapter_for


class BlockAccess:
    """How the runner reaches decoder block i. In memory (the default): the model's own block, moved to the compute
    device and back. With `lazy` (a `quantlib.access.lazy.LazyModel`): read from the checkpoint when opened and freed when
    closed, the embeddings loaded only while the calibration windows go through them. `on_block(i, block)` is
    called when block i is done, before it is released (the checkpoint writer writes its shard)."""

    def __init__(self, model, lazy=None, on_block: Callable | None = None):
        self.blocks = adapter_for(model).block_list(model)
        self.lazy, self.on_block = lazy, on_block

    def open(self, i: int, device):
        if self.lazy is not None:
            return self.lazy.load_block(i, device)
        return self.blocks[i].to(device)

    def close(self, i: int, block) -> None:
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
