"""Back-propagation through a model read block by block, the one implementation behind the end-loss gradients of the
FP model (`quantlib.stats.gradients`) and distillation (`quantlib.runner.distill`).

Forward (`BlockChain.forward`): the items (one calibration window each, or one batch of windows, with the keyword
arguments that block 0 received for them: rotary tables, masks) go through decoder blocks 0..B-1 without gradients;
each block is opened (`quantlib.access.blocks.BlockAccess`: read from the checkpoint when the model is lazy), run over
every item and closed again, and its inputs are kept per item in a `Stream` (in memory, or in files on disk).
The loss is then taken on the final states by the model's own forward with every block stood in for
(`final_states`): the family's final norm, head and loss, whatever they are, give the loss's gradient with respect
to the final states. Backward (`BlockChain.backward`): from the last block to the first, each block is opened
again, its forward recomputed from its kept inputs with gradients on and the output gradient back-propagated
through it. Its parameters' gradients accumulate (and their hooks fire) exactly as in one backward pass through the
whole model, and the gradient of its inputs is the output gradient of the block before; nothing flows into the
embeddings.

Held at a time: one block and its autograd graph over one item, the kept inputs of the blocks not yet gone back
through (over every item; with streams on disk, the one item in use), the final states or the two gradient streams
of the block in hand. `quantlib.jobs.memory_backward.backward_phases` gives the figures.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from quantlib.stats.capture import Stream, block_output

log = logging.getLogger("quantlib")


def _entered(install: Callable | None, i: int, block):
    return install(i, block) if install is not None else contextlib.nullcontext()


class BlockChain:
    """Forward through the blocks reached by `access` keeping each block's inputs, then backward block by block
    with recomputation (see the module's docstring). `kwargs[k]` are item k's keyword arguments of a block;
    `streams` (`memory` or `disk`) is where the kept inputs and gradients of every item are (on disk in `folder`, or
    a temporary folder of the chain's own); `precision()` gives the context of every forward (autocast, say).

    `install(i, block)`, given to `forward` or `backward`, returns a context manager entered while block i is in use
    (the caller swaps in trainable modules, registers hooks); it must leave the block as it found it, since a lazy
    block is freed when closed. `position` is (block, item) of the item going back through a block, for hooks."""

    def __init__(self, access, kwargs: list[dict], device, streams: str = "memory", folder: Path | None = None,
                 precision: Callable = contextlib.nullcontext):
        self.access, self.kwargs, self.device, self.precision = access, kwargs, device, precision
        self.streams = streams
        self._own = streams == "disk" and folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="quantlib-chain-")) if self._own else folder
        self.inputs: list[Stream] = []  # inputs[i]: block i's inputs, per item
        self.tuple_output = False  # whether a block returns a tuple (family-specific)
        self.position = (0, 0)
        self._held = None  # (i, block): the last block, kept open from the forward for the backward

    def __enter__(self) -> "BlockChain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for s in self.inputs:
            s.drop()
        self.inputs = []
        if self._held is not None:
            self.access.close(*self._held)
            self._held = None
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)

    def stream(self, items=()) -> Stream:
        """A stream where this chain keeps its activations, holding `items`."""
        s = Stream(self.streams, self.folder, self.device)
        for t in items:
            s.append(t)
        return s

    def forward(self, x0, n_blocks: int, install: Callable | None = None, keep: bool = True) -> Stream:
        """The items' states `x0` (block 0's inputs, a list or a Stream) through blocks 0..n_blocks-1, without
        gradients; returns the final states. With `keep`, each block's inputs are kept for `backward` and the last
        block stays open for it; without, this is a plain streamed forward."""
        x = x0 if isinstance(x0, Stream) else self.stream(x0)
        for i in range(n_blocks):
            block = self.access.open(i, self.device)
            out = self.stream()
            with _entered(install, i, block), torch.no_grad():
                for h, kw in zip(x, self.kwargs):
                    with self.precision():
                        raw = block(h, **kw)
                    self.tuple_output = isinstance(raw, tuple)
                    out.append(raw[0] if self.tuple_output else raw)
            if keep:
                self.inputs.append(x)
            else:
                x.drop()
            x = out
            if keep and i == n_blocks - 1:
                self._held = (i, block)
            else:
                self.access.close(i, block)
        return x

    def inputs_up_to(self, x0, n_blocks: int) -> None:
        """Keep the inputs of blocks 0..n_blocks-1 for a backward that starts at block n_blocks-1 (one resumed there):
        a forward through blocks 0..n_blocks-2 only, no block left open. The forward is deterministic, so these are
        the inputs an uninterrupted `forward` kept."""
        x = self.forward(x0, n_blocks - 1)
        if self._held is not None:  # not the backward's first block: closed, as the chain holds one block at most
            self.access.close(*self._held)
            self._held = None
        self.inputs.append(x)

    def backward(self, grads, install: Callable | None = None, label: str = "", after: Callable | None = None
                 ) -> None:
        """Back-propagate `grads` (per item, the loss's gradient w.r.t. the final states `forward` returned, or the
        output gradient of the last kept block) through the kept blocks, last to first, each block's forward
        recomputed from its kept inputs with gradients on. `install(i, block)` is entered around block i's items
        (hooks that read the parameters' gradients fire inside it); `after(i, g)`, when block i is done and closed,
        gets the stream of gradients flowing into block i-1's output (empty for block 0: a job's progress); the
        kept inputs and gradients are dropped as the pass goes."""
        g = grads if isinstance(grads, Stream) else self.stream(grads)
        while self.inputs:
            i = len(self.inputs) - 1
            t0 = time.time()
            if self._held is not None and self._held[0] == i:
                block, self._held = self._held[1], None
            else:
                block = self.access.open(i, self.device)
            x_in, g_in = self.inputs.pop(), self.stream()
            try:
                with _entered(install, i, block):
                    for k, kw in enumerate(self.kwargs):
                        self.position = (i, k)
                        x = x_in[k].detach()
                        if i:
                            x.requires_grad_(True)
                        with torch.enable_grad(), self.precision():
                            y = block_output(block, x, kw)
                        torch.autograd.backward(y, g[k])
                        if i:
                            g_in.append(x.grad)
                        del x, y
            finally:
                x_in.drop()
                g.drop()
                self.access.close(i, block)
            g = g_in
            if label:
                log.info("%s: backward through block %d in %.1fs", label, i + 1, time.time() - t0)
            if after is not None:
                after(i, g)
        g.drop()


class Handback(torch.nn.Module):
    """Stands in for a decoder block: returns the states it was given (`value`) or passes its input on."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple, self.value = as_tuple, None

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.value is None else self.value
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def final_states(blocks, as_tuple: bool):
    """The decoder blocks (a ModuleList) stood in for while the context lasts: in the model's own forward,
    `feed(h)` makes them hand on the final states `h` (a batch's), so the forward gives what the family computes
    after its blocks (final norm, head, loss) from `h`, with gradients to `h` when it requires them. The embeddings
    must be loaded (the forward looks them up, then drops them)."""
    originals = list(blocks)
    first, rest = Handback(as_tuple), Handback(as_tuple)
    for i in range(len(blocks)):
        blocks[i] = first if i == 0 else rest

    def feed(h: torch.Tensor) -> None:
        first.value = h

    try:
        yield feed
    finally:
        first.value = None
        for i, block in enumerate(originals):
            blocks[i] = block
