"""The sequential block runner, shared by every layer-wise method.

Walks the decoder blocks once. For each block, the linears are quantized subgroup by subgroup in execution order
(q/k/v -> o -> gate/up -> down), each subgroup's Hessian taken from the inputs produced by the already-quantized
part of the model ("true sequential"); the quantized block's outputs become the next block's inputs.

When all calibration windows fit in one chunk, one forward pass per block does everything: a pre-forward hook on
a subgroup's first linear accumulates its Hessian from the whole batch, quantizes the subgroup in place and lets the
forward continue with the quantized weights. Otherwise the block is run once per subgroup over all chunks, each
pass stopped at that subgroup's input, then once more to propagate. Both give the same result.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .errors import NumericalError
from .hessian import HessianAccumulator, layer_error
from .models import Adapter, adapter_for
from .quantizer import check_group_size

log = logging.getLogger("quantlib")


class _Stop(Exception):
    """Raised inside a forward pass once the wanted input has been captured."""


@dataclass
class QuantizedModelReport:
    layers: dict = field(default_factory=dict)  # full layer name -> diagnostics
    stored: dict = field(default_factory=dict)  # full layer name -> (meta, packed tensors), on the CPU
    seconds: float = 0.0


def check_shapes(model, spec) -> None:
    """Before any work: every quantized layer must take the spec's group size."""
    adapter = adapter_for(model)
    for i, block in enumerate(adapter.block_list(model)):
        for name, lin in adapter.linears(block):
            check_group_size(lin.in_features, spec.group_size, f"{adapter.blocks}.{i}.{name}")


def quantize_model(model, spec, tokens: torch.Tensor | None, device: str = "cpu", chunk_tokens: int = 65536,
                   progress: bool = True) -> QuantizedModelReport:
    """Quantize every decoder linear of `model` in place according to `spec`.

    `tokens` (n, seqlen) are the calibration windows (None for data-free specs). Returns per-layer diagnostics and
    the stored representation of each layer.
    """
    from .methods import component

    adapter = adapter_for(model)
    check_shapes(model, spec)
    solve = component("solver", spec.solver).load()
    blocks = adapter.block_list(model)
    report = QuantizedModelReport()
    t0 = time.time()
    quant = _GroupQuantizer(spec, solve, report)

    if not spec.needs_hessian:
        for i, block in enumerate(tqdm(blocks, desc="quantize", disable=not progress, mininterval=5)):
            for group in adapter.subgroups:
                quant(i, adapter, block, group, None, device)
        report.seconds = time.time() - t0
        return report

    if tokens is None:
        raise ValueError(f"{spec.describe()} needs calibration tokens")
    chunk = max(1, min(len(tokens), chunk_tokens // tokens.shape[1]))
    with torch.no_grad():
        states = _capture_block_inputs(model, blocks, tokens, chunk, device)
        for i, block in enumerate(tqdm(blocks, desc="quantize", disable=not progress, mininterval=5)):
            tb = time.time()
            block.to(device)
            if not spec.opt("true_sequential"):
                hessians = _capture_hessians(block, adapter.subgroups, states, device, stop=False)
                for group, H in zip(adapter.subgroups, hessians):
                    quant(i, adapter, block, group, H, device)
                states = [(_block_output(block, h, kw), kw) for h, kw in states]
            elif len(states) == 1:
                states = [_single_pass(i, adapter, block, states[0], quant, device)]
            else:
                for group in adapter.subgroups:
                    (H,) = _capture_hessians(block, [group], states, device, stop=True)
                    quant(i, adapter, block, group, H, device)
                states = [(_block_output(block, h, kw), kw) for h, kw in states]
            if device != "cpu":
                block.to("cpu")
            errs = [report.layers[f"{adapter.blocks}.{i}.{n}"]["rel_error"] for g in adapter.subgroups for n in g]
            log.info("block %d/%d quantized in %.1fs, mean relative layer error %.4g",
                     i + 1, len(blocks), time.time() - tb, sum(errs) / len(errs))
    report.seconds = time.time() - t0
    return report


class _GroupQuantizer:
    """Quantizes one subgroup (layers sharing an input) in place and records its diagnostics."""

    def __init__(self, spec, solve, report: QuantizedModelReport):
        from .methods import component

        self.spec, self.solve, self.report = spec, solve, report
        self.preprocessors = [component("preprocess", p).load() for p in spec.preprocess]

    def __call__(self, block_idx: int, adapter: Adapter, block, group: tuple[str, ...], H, device) -> None:
        t = time.time()
        linears = [block.get_submodule(name) for name in group]
        W = torch.cat([lin.weight.data.to(device=device, dtype=torch.float32) for lin in linears])
        label = f"{adapter.blocks}.{block_idx}.{'+'.join(group)}"
        W_in = W
        # Preprocessing (e.g. MagR) changes what the solver quantizes; diagnostics below still compare with W.
        for pre in self.preprocessors:
            W_in = pre(W_in, H, self.spec, label)
        result = self.solve(W_in, H, self.spec, label)
        row = 0
        for name, lin in zip(group, linears):
            full = f"{adapter.blocks}.{block_idx}.{name}"
            rows = slice(row, row + lin.out_features)
            row += lin.out_features
            W_hat = result.weight[rows]
            if not torch.isfinite(W_hat).all():
                raise NumericalError(f"quantized weight of layer '{full}' contains NaN or Inf")
            rep = result.rep.select_rows(rows)
            diag = {"shape": [lin.out_features, lin.in_features], "seconds": round(time.time() - t, 4),
                    "bits_per_weight": rep.bits_per_weight, **result.stats}
            if H is not None:
                err = layer_error(W[rows], W_hat, H)
                ref = float(((W[rows] @ H) * W[rows]).sum())
                diag.update(error=err, rel_error=err / ref if ref > 0 else math.nan)
            else:
                diag.update(rel_error=float(((W[rows] - W_hat) ** 2).sum() / (W[rows] ** 2).sum()))
            lin.weight.data.copy_(W_hat.to(lin.weight.dtype))
            self.report.layers[full] = diag
            self.report.stored[full] = (rep.meta(), {k: v.cpu() for k, v in rep.to_tensors().items()})


def _place_outside_blocks(model, blocks, device) -> None:
    """Embeddings, rotary tables and norms go to the compute device; blocks move one at a time."""
    in_blocks = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and id(p) not in in_blocks:
                p.data = p.data.to(device)
        for key, b in list(module._buffers.items()):
            if b is not None and id(b) not in in_blocks:
                module._buffers[key] = b.to(device)


def _capture_block_inputs(model, blocks, tokens, chunk, device):
    """Inputs (hidden states and keyword arguments) of block 0 for each chunk of calibration windows. Keyword
    arguments are kept per chunk: some families pass batch-shaped masks or ALiBi tensors."""
    if device != "cpu":
        _place_outside_blocks(model, blocks, device)
        blocks[0].to(device)
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for k in ("past_key_values", "past_key_value", "layer_past", "use_cache"):
            kwargs.pop(k, None)
        captured.append((hidden, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in range(0, len(tokens), chunk):
            try:
                model(tokens[s:s + chunk].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if device != "cpu":
        blocks[0].to("cpu")
    return captured


def _block_output(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _single_pass(block_idx, adapter, block, state, quant, device):
    """All windows in one batch: quantize each subgroup from inside the forward pass, then keep the output."""
    hidden, kwargs = state
    pending = list(adapter.subgroups)
    handles = []

    def make_hook(group):
        def hook(module, args):
            if group in pending:
                pending.remove(group)
                acc = HessianAccumulator(module.in_features, device=args[0].device)
                acc.add(args[0])
                quant(block_idx, adapter, block, group, acc.result(), device)
        return hook

    for group in adapter.subgroups:
        for name in group:
            handles.append(block.get_submodule(name).register_forward_pre_hook(make_hook(group)))
    try:
        out = _block_output(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    if pending:
        raise RuntimeError(f"block {block_idx}: layers {pending} were never called in the forward pass")
    return out, kwargs


def _capture_hessians(block, groups, states, device, stop: bool) -> list:
    """Hessians of the inputs of `groups` over all chunks. With `stop`, each forward ends at the (single) group's
    input; without it, the whole block runs once per chunk and every group's input is captured."""
    accs = []
    handles = []
    for group in groups:
        acc = HessianAccumulator(block.get_submodule(group[0]).in_features, device=device)
        accs.append(acc)
        seen = set()  # layers of a group share one input: count it once per forward

        def hook(module, args, acc=acc, seen=seen, size=len(group)):
            if not seen:
                acc.add(args[0])
            seen.add(id(module))
            if len(seen) == size:
                seen.clear()
            if stop:
                seen.clear()
                raise _Stop

        handles += [block.get_submodule(name).register_forward_pre_hook(hook) for name in group]
    try:
        for hidden, kwargs in states:
            try:
                block(hidden, **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return [acc.result() for acc in accs]
