"""The runner's walk without a forward pass: each block's linears quantized from their weights alone (data-free
methods), or with Hessians read from a statistic of the FP model (`fpin`: the Hessians need no calibration pass)."""

from __future__ import annotations

from tqdm.auto import tqdm

from quantlib.runner.group import GroupQuantizer, log_block, to_device
from quantlib.stats.progress import NoProgress


def quantize_without_forward(model, adapter, device, progress: bool, access, quant: GroupQuantizer, source,
                             n_blocks: int, resume: NoProgress) -> None:
    """Quantize the first `n_blocks` blocks, from the first one `resume` has not finished. `source` is the opened
    statistic that hands each subgroup's Hessian (`hessian(block, group)`), or None."""
    blocks = adapter.block_list(model)
    resume.restore("memory", None, device)  # no streams: the random generators only
    for i in tqdm(range(resume.start, n_blocks), initial=resume.start, total=n_blocks, desc="quantize",
                  disable=not progress, mininterval=5):
        block = access.open(i, device)
        for group in adapter.subgroups:
            quant(i, adapter, block, group, None if source is None else to_device(source.hessian(i, group), device),
                  device)
        access.close(i, block)
        if source is not None:
            log_block(quant.report, adapter, i, len(blocks))
        resume.finished(i, quant.report)
