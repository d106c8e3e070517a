"""Activation capture, shared by the runner's modes and the statistics of the FP model: the inputs of decoder
block 0, a block's outputs, and the input Hessians of a block's linears."""

from __future__ import annotations

from pathlib import Path

import torch

from quantlib.stats.hessian import GuidedHessian, HessianAccumulator, WeightedHessianAccumulator


class Stop(Exception):
    """Raised inside a forward pass once the wanted input has been captured."""


def place_outside_blocks(model, blocks, device) -> None:
    """Embeddings, rotary tables and norms go to the compute device; blocks move one at a time."""
    in_blocks = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and id(p) not in in_blocks and p.device.type != "meta":  # meta: not loaded (lazy)
                p.data = p.data.to(device)
        for key, b in list(module._buffers.items()):
            if b is not None and id(b) not in in_blocks:
                module._buffers[key] = b.to(device)


def block_inputs(model, blocks, tokens: torch.Tensor, chunk: int, device) -> list[tuple[torch.Tensor, dict]]:
    """Inputs (hidden states and keyword arguments) of block 0 for each chunk of `chunk` calibration windows.
    Keyword arguments are kept per chunk: some families pass batch-shaped masks or ALiBi tensors."""
    first_on_disk = next(blocks[0].parameters()).device.type == "meta"  # a lazy model: never read, not moved
    if device != "cpu":
        place_outside_blocks(model, blocks, device)
        if not first_on_disk:
            blocks[0].to(device)
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for k in ("past_key_values", "past_key_value", "layer_past", "use_cache"):
            kwargs.pop(k, None)
        captured.append((hidden, kwargs))
        raise Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in range(0, len(tokens), chunk):
                try:
                    model(tokens[s:s + chunk].to(device), use_cache=False)
                except Stop:
                    pass
    finally:
        handle.remove()
    if device != "cpu" and not first_on_disk:
        blocks[0].to("cpu")
    return captured


def block_output(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _GroupAccumulator:
    """A subgroup's Hessian from its shared input; with `weights` ({layer: (windows, tokens, g)}), also each layer's
    g weighted Hessians (GuidedQuant), the weights of a chunk taken at its first window."""

    def __init__(self, block, group, device, weights: dict | None):
        d_in = block.get_submodule(group[0]).in_features
        self.plain = HessianAccumulator(d_in, device=device)
        self.weighted = {} if weights is None else {
            name: (WeightedHessianAccumulator(d_in, weights[name].shape[-1], device=device), weights[name])
            for name in group}

    def add(self, x: torch.Tensor, first_window: int) -> None:
        self.plain.add(x)
        for acc, w in self.weighted.values():
            acc.add(x, w[first_window:first_window + x.shape[0]])

    def result(self):
        if not self.weighted:
            return self.plain.result()
        return GuidedHessian(self.plain.result(), {name: acc.result() for name, (acc, _) in self.weighted.items()})


def group_hessian(block, group, x: torch.Tensor, device, weights: dict | None = None, first_window: int = 0):
    """The Hessian (or GuidedHessian, with weights) of one batch of a subgroup's input."""
    acc = _GroupAccumulator(block, group, device, weights)
    acc.add(x, first_window)
    return acc.result()


def hessians(block, groups, states, device, stop: bool, weights: dict | None = None, chunk: int | None = None) -> list:
    """Input Hessians of `groups` (tuples of layer names sharing an input) over all chunks of `states`. With `stop`,
    each forward ends at the (single) group's input; without it, the whole block runs once per chunk and every
    group's input is captured. With `weights` (saliency per layer, see _GroupAccumulator), each group's result is a
    GuidedHessian; `chunk` is then the number of windows per state."""
    accs = []
    handles = []
    position = {"window": 0}
    for group in groups:
        acc = _GroupAccumulator(block, group, device, weights)
        accs.append(acc)
        seen = set()  # layers of a group share one input: count it once per forward

        def hook(module, args, acc=acc, seen=seen, size=len(group)):
            if not seen:
                acc.add(args[0], position["window"])
            seen.add(id(module))
            if len(seen) == size:
                seen.clear()
            if stop:
                seen.clear()
                raise Stop

        handles += [block.get_submodule(name).register_forward_pre_hook(hook) for name in group]
    try:
        with torch.no_grad():
            for index, (hidden, kwargs) in enumerate(states):
                position["window"] = index * (chunk or 0)
                try:
                    block(hidden, **kwargs)
                except Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return [acc.result() for acc in accs]


class Stream:
    """Per-window activations of one stream, in memory or (`disk`) in files of a temporary folder, so that two
    streams of n windows do not have to fit in memory."""

    def __init__(self, where: str, folder: Path | None = None, device="cpu"):
        if where not in ("memory", "disk"):
            raise ValueError(f"block streams are kept in 'memory' or on 'disk', not '{where}'")
        self.where, self.device = where, device
        self.items: list = []
        self.folder = folder
        self._count = 0

    def append(self, t: torch.Tensor) -> None:
        if self.where == "memory":
            self.items.append(t)
        else:
            path = self.folder / f"{id(self)}-{self._count}.pt"
            torch.save(t.detach().cpu(), path)
            self.items.append(path)
        self._count += 1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return item if self.where == "memory" else torch.load(item).to(self.device)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def drop(self) -> None:
        if self.where == "disk":
            for p in self.items:
                p.unlink(missing_ok=True)
        self.items = []


class States:
    """The (hidden states, keyword arguments) of each calibration chunk at a block's input, the hidden states in a
    `Stream` (memory or disk); iterates as the list of pairs the capture functions take."""

    def __init__(self, pairs, where: str, folder: Path | None, device="cpu"):
        self.hidden, self.kwargs = Stream(where, folder, device), []
        self.tuple_output = False  # whether the block that made these returns a tuple (family-specific)
        for h, kw in pairs:
            self.hidden.append(h)
            self.kwargs.append(kw)

    def __len__(self) -> int:
        return len(self.kwargs)

    def __getitem__(self, i: int):
        return self.hidden[i], self.kwargs[i]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def through(self, block) -> "States":
        """The block's outputs over every chunk, kept where these are; these are dropped."""
        out = States((), self.hidden.where, self.hidden.folder, self.hidden.device)
        for h, kw in self:
            raw = block(h, **kw)
            out.tuple_output = isinstance(raw, tuple)
            out.hidden.append(raw[0] if out.tuple_output else raw)
            out.kwargs.append(kw)
        self.hidden.drop()
        return out
