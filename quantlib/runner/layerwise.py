"""The runner's layer-wise walk: the calibration windows go through the model block by block; in each block the
linears are quantized subgroup by subgroup in execution order (q/k/v -> o -> gate/up -> down), each subgroup's
Hessian taken from the inputs produced by the already-quantized part of the model ("true sequential"), or from one
pass of the block (`noseq`); the quantized block's outputs become the next block's inputs.

When all calibration windows fit in one chunk, one forward pass per block does everything: a pre-forward hook on a
subgroup's first linear accumulates its Hessian from the whole batch, quantizes the subgroup in place and lets the
forward continue with the quantized weights. Otherwise the block is run once per subgroup over all chunks, each
pass stopped at that subgroup's input, then once more to propagate. Both give the same result.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from quantlib.runner.group import GroupQuantizer, log_block
from quantlib.stats.progress import NoProgress
from quantlib.stats import capture


def quantize_layerwise(model, adapter, spec, tokens, device, chunk_tokens: int, progress: bool, streams: str,
                       access, quant: GroupQuantizer, token_weights, n_blocks: int, resume: NoProgress) -> None:
    """The layer-wise walk over the first `n_blocks` blocks (see the module's docstring), from the first one
    `resume` has not finished. `token_weights(block)` gives the per-token weights of each layer's inputs in the
    Hessian capture ({layer: (windows, tokens, g)}, GuidedQuant's objective) or None."""
    blocks = adapter.block_list(model)
    report = quant.report
    chunk = max(1, min(len(tokens), chunk_tokens // tokens.shape[1]))
    with torch.no_grad(), resume.stream_folder(streams) as folder:
        with access.outer(device):
            states = capture.States(capture.block_inputs(model, blocks, tokens, chunk, device), streams, folder,
                                    device)
        saved = resume.restore(streams, folder, device)
        if saved is not None:  # the quantized prefix's outputs, saved after the last finished block
            if len(saved["hidden"]) != len(states):
                raise RuntimeError(f"the saved progress holds {len(saved['hidden'])} chunks, not {len(states)}")
            states.hidden.drop()
            states.hidden = saved["hidden"]
        for i in tqdm(range(resume.start, n_blocks), initial=resume.start, total=n_blocks, desc="quantize",
                      disable=not progress, mininterval=5):
            tb = time.time()
            block = access.open(i, device)
            weights = token_weights(i)
            if not spec.opt("true_sequential"):
                hessians = capture.hessians(block, adapter.subgroups, states, device, stop=False, weights=weights,
                                            chunk=chunk)
                for group, H in zip(adapter.subgroups, hessians):
                    quant(i, adapter, block, group, H, device)
                states = states.through(block)
            elif len(states) == 1:
                single = _single_pass(i, adapter, block, states[0], quant, device, weights)
                states.hidden.drop()
                states = capture.States([single], streams, folder, device)
            else:
                for group in adapter.subgroups:
                    (H,) = capture.hessians(block, [group], states, device, stop=True, weights=weights, chunk=chunk)
                    quant(i, adapter, block, group, H, device)
                states = states.through(block)
            access.close(i, block)
            log_block(report, adapter, i, len(blocks), time.time() - tb)
            resume.finished(i, report, {"hidden": states.hidden})


def _single_pass(block_idx, adapter, block, state, quant, device, weights=None):
    """All windows in one batch: quantize each subgroup from inside the forward pass, then keep the output."""
    hidden, kwargs = state
    pending = list(adapter.subgroups)
    handles = []

    def make_hook(group):
        def hook(module, args):
            if group in pending:
                pending.remove(group)
                H = capture.group_hessian(block, group, args[0], args[0].device, weights)
                quant(block_idx, adapter, block, group, H, device)
        return hook

    for group in adapter.subgroups:
        for name in group:
            handles.append(block.get_submodule(name).register_forward_pre_hook(make_hook(group)))
    try:
        out = capture.block_output(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    if pending:
        raise RuntimeError(f"block {block_idx}: layers {pending} were never called in the forward pass")
    return out, kwargs
