"""Block-wise reconstruction: the runner's third mode, for methods that train a whole decoder block at once
(BRECQ, Li et al. 2021; FlexRound, Lee et al. 2023; UniQuanF).

Per block, two streams of activations: the FP model's own block inputs `x_fp` and the quantized model's block inputs
`x_q` (equal at block 0). The FP block's outputs `y_fp = B(x_fp)` are the targets. The block's linears are swapped
for the method's trainable fake-quant modules (`FakeQuantLinear`), which train with gradients on against
mean((B_q(x) - y_fp)^2), where x mixes the two streams elementwise (`qdrop`: the probability of taking the
quantized stream's value; QDrop, Wei et al. 2022). Then each module is frozen to its stored representation, the
block's weights become the dequantized ones, and `x_q <- B_q(x_q)`, `x_fp <- y_fp` go on to the next block.

A block-wise method is a module whose catalog entry has `mode="block"` and points at a function
`wrap(linear, task) -> FakeQuantLinear`; its training settings are the options of `quantlib.catalog.contract.block_training`.
Everything else (streams, the swap, the optimiser, the schedule, diagnostics) is here.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantlib.access.blocks import BlockAccess
from quantlib.errors import NumericalError
from quantlib.stats.progress import NoProgress
from quantlib.runner.training import cosine, train
from quantlib.solvers.contract import LayerSolver
from quantlib.stats import capture
from quantlib.stats.capture import Stream
from quantlib.stats.hessian import weight_errors

log = logging.getLogger("quantlib")


def _swap(block, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, module)


def quantize_blocks(model, adapter, spec, tokens, device, report, sink, progress: bool, seed: int,
                    streams: str = "memory", access=None, n_blocks: int | None = None,
                    resume: NoProgress | None = None) -> None:
    """The block-wise mode of `quantlib.runner.walk.quantize_model` (see the module's docstring); `access` is the
    runner's `BlockAccess`; the walk starts at the first block `resume` has not finished."""
    access = access or BlockAccess(model)
    resume = resume or NoProgress()
    layer_solver = LayerSolver(spec)  # resolves the init (and the wrap function, as `solve`)
    wrap = layer_solver.solve
    blocks = adapter.block_list(model)
    n_blocks = n_blocks or len(blocks)
    with resume.stream_folder(streams) as folder:
        with torch.no_grad(), access.outer(device):
            # One window per entry: training steps take `batch` windows at a time.
            states = capture.block_inputs(model, blocks, tokens, 1, device)
        kwargs = [kw for _, kw in states]
        x_q, x_fp = Stream(streams, folder, device), Stream(streams, folder, device)
        for h, _ in states:
            x_q.append(h)
            x_fp.append(h)
        del states
        saved = resume.restore(streams, folder, device)
        if saved is not None:  # both streams as they were after the last finished block
            x_q.drop()
            x_fp.drop()
            x_q, x_fp = saved["x_q"], saved["x_fp"]
        for i in tqdm(range(resume.start, n_blocks), initial=resume.start, total=n_blocks, desc="reconstruct",
                      disable=not progress, mininterval=5):
            block = access.open(i, device)
            x_q, x_fp = _reconstruct_block(i, adapter, block, spec, layer_solver, wrap, x_q, x_fp, kwargs, device,
                                           report, sink, seed, streams, folder)
            access.close(i, block)
            resume.finished(i, report, {"x_q": x_q, "x_fp": x_fp})


def _reconstruct_block(i, adapter, block, spec, layer_solver, wrap, x_q, x_fp, kwargs, device, report, sink, seed,
                       streams, folder):
    t0 = time.time()
    for p in block.parameters():
        p.requires_grad_(False)  # norms and everything else stay as they are; only the quantizers train
    with torch.no_grad():
        y_fp = Stream(streams, folder, device)
        for x, kw in zip(x_fp, kwargs):
            y_fp.append(capture.block_output(block, x, kw))
        hessians = {}
        if spec.needs_hessian:  # an init weighted by diag(H): from the quantized stream through the FP block
            found = capture.hessians(block, adapter.subgroups, list(zip(x_q, kwargs)), device, stop=False)
            hessians = {name: H for group, H in zip(adapter.subgroups, found) for name in group}
    originals = dict(adapter.linears(block))
    modules = {}
    for name, linear in originals.items():
        task = layer_solver.task(hessians.get(name), f"{adapter.blocks}.{i}.{name}")
        modules[name] = wrap(linear, task).to(device)
        _swap(block, name, modules[name])
    before = _block_error(block, x_q, y_fp, kwargs)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
    t_train = time.time()
    losses = _train(block, modules, x_q, x_fp, y_fp, kwargs, spec, generator, i)
    train_seconds = time.time() - t_train
    for name, module in modules.items():
        result = module.freeze()
        linear = originals[name]
        W_hat = result.weight
        if not torch.isfinite(W_hat).all():
            raise NumericalError(f"quantized weight of layer '{adapter.blocks}.{i}.{name}' contains NaN or Inf")
        full = f"{adapter.blocks}.{i}.{name}"
        report.layers[full] = {"shape": [linear.out_features, linear.in_features],
                               "bits_per_weight": result.rep.bits_per_weight, **result.stats,
                               **weight_errors(module.weight_fp, W_hat, hessians.get(name))}
        linear.weight.data.copy_(W_hat.to(linear.weight.dtype))
        _swap(block, name, linear)
        sink(full, result.rep)
    with torch.no_grad():
        new_q = Stream(streams, folder, device)
        num = den = 0.0
        for x, y, kw in zip(x_q, y_fp, kwargs):
            out = capture.block_output(block, x, kw)
            new_q.append(out)
            num += float((out - y).double().square().sum())
            den += float(y.double().square().sum())
    after = num / den
    x_q.drop()
    x_fp.drop()
    took = time.time() - t0
    report.blocks.append({"block": i, "error_before": before, "error_after": after, "steps": len(losses),
                          "loss": _every_tenth(losses), "seconds": round(took, 2),
                          "train_seconds": round(train_seconds, 2)})
    log.info("block %d reconstructed in %.1fs: output error %.4g -> %.4g (relative, calibration windows)",
             i + 1, took, before, after)
    return new_q, y_fp


def _block_error(block, x_q, y_fp, kwargs) -> float:
    """sum (B(x_q) - y_fp)^2 / sum y_fp^2 over the windows, with the block as it is now."""
    num = den = 0.0
    with torch.no_grad():
        for x, y, kw in zip(x_q, y_fp, kwargs):
            out = capture.block_output(block, x, kw)
            num += float((out - y).double().square().sum())
            den += float(y.double().square().sum())
    return num / den


def _every_tenth(losses: list[float]) -> list[list]:
    """[step, loss] at the first step and at every 10 % of the steps."""
    if not losses:
        return []
    marks = sorted({0, *(max(0, math.ceil(len(losses) * k / 10) - 1) for k in range(1, 11))})
    return [[m + 1, round(losses[m], 8)] for m in marks]


def _train(block, modules, x_q, x_fp, y_fp, kwargs, spec, generator, block_idx) -> list[float]:
    """Adam on the modules' parameter groups, cosine schedule to 0, `epochs` passes over the windows in a seeded
    order, `batch` windows per step (the loop is `quantlib.runner.training.train`; the QDrop mixing, which draws from
    the same generator after each epoch's order, is here). Returns the loss of every step."""
    epochs, batch, qdrop = spec.opt("epochs"), spec.opt("batch"), spec.opt("qdrop")
    groups = [g for m in modules.values() for g in m.param_groups(spec)]
    if not groups:
        return []

    def loss_of(idx: list[int]) -> torch.Tensor:
        xq = torch.cat([x_q[j] for j in idx])
        y = torch.cat([y_fp[j] for j in idx])
        if qdrop >= 1:
            x = xq
        else:
            xf = torch.cat([x_fp[j] for j in idx])
            keep_q = torch.rand(xq.shape, generator=generator).to(xq.device) < qdrop
            x = torch.where(keep_q, xq, xf)
        return F.mse_loss(capture.block_output(block, x, kwargs[idx[0]]), y)

    # Adam's fused kernel: one pass per step over the (per-weight) parameters instead of one per operation
    return train(groups, partial(torch.optim.Adam, fused=True), cosine, loss_of, len(x_q), epochs, batch, generator,
                 f"block {block_idx} reconstruction").losses
