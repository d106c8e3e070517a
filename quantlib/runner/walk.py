"""The sequential block runner, shared by every method. One walk over the decoder blocks, in the mode the spec's
catalog entries imply (`QuantSpec.mode`):

- data-free: each linear quantized from its weight alone;
- layer-wise: the linears of each block quantized subgroup by subgroup in execution order (q/k/v -> o -> gate/up ->
  down), each subgroup's Hessian taken from the inputs produced by the already-quantized part of the model ("true
  sequential"), or from one pass of the block (`noseq`), or from the FP model's statistics artifact (`fpin`); the
  quantized block's outputs become the next block's inputs;
- block-wise: a whole block trained at once against the FP block's outputs (`quantlib.runner.blockwise`).

The runner resolves the spec's components once (`LayerSolver`), hands every layer's representation to `on_layer`
(the checkpoint writer packs it) and never packs itself.

When all calibration windows fit in one chunk, one forward pass per block does everything: a pre-forward hook on a
subgroup's first linear accumulates its Hessian from the whole batch, quantizes the subgroup in place and lets the
forward continue with the quantized weights. Otherwise the block is run once per subgroup over all chunks, each
pass stopped at that subgroup's input, then once more to propagate. Both give the same result.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from quantlib.access.adapters import Adapter, adapter_for
from quantlib.access.blocks import BlockAccess
from quantlib.errors import NumericalError
from quantlib.formats.uniform import check_group_size
from quantlib.runner.blockwise import quantize_blocks
from quantlib.solvers.contract import LayerSolver
from quantlib.stats import capture
from quantlib.stats.hessian import GuidedHessian, layer_error, weight_errors

log = logging.getLogger("quantlib")


@dataclass
class QuantizedModelReport:
    layers: dict = field(default_factory=dict)  # full layer name -> diagnostics
    reps: dict = field(default_factory=dict)  # full layer name -> representation (when no `on_layer` took them)
    blocks: list = field(default_factory=list)  # per-block diagnostics (block-wise mode)
    seconds: float = 0.0


def check_shapes(model, spec) -> None:
    """Before any work: every quantized layer must take the spec's group size."""
    adapter = adapter_for(model)
    for i, block in enumerate(adapter.block_list(model)):
        for name, lin in adapter.linears(block):
            check_group_size(lin.in_features, spec.group_size, f"{adapter.blocks}.{i}.{name}")


def quantize_model(model, spec, tokens: torch.Tensor | None = None, device: str = "cpu", chunk_tokens: int = 65536,
                   progress: bool = True, statistics: dict | None = None,
                   on_layer: Callable | None = None, seed: int = 0, streams: str = "memory",
                   access: "BlockAccess | None" = None) -> QuantizedModelReport:
    """Quantize every decoder linear of `model` in place according to `spec`.

    `tokens` (n, seqlen) are the calibration windows (None when the spec reads none); `statistics` maps each
    statistic the spec needs to its opened artifact (`quantlib.stats.artifacts.open_statistic`). Each layer's representation
    goes to `on_layer(name, rep)`, or into the report's `reps`. `seed` is for block-wise methods; `streams`
    (`memory` or `disk`) is where the calibration activations are kept between blocks. `access` reaches the blocks
    (default: all in memory; `BlockAccess(model, lazy=...)` reads each from disk and frees it when done). Returns
    per-layer diagnostics.
    """
    adapter = adapter_for(model)
    access = access or BlockAccess(model)
    check_shapes(model, spec)
    statistics = statistics or {}
    missing = [s for s in spec.statistic_kinds() if s not in statistics]
    if missing:
        raise ValueError(f"{spec.describe()} needs the statistics {missing}")
    grads = statistics.get("gradients")
    if grads is not None and tokens is not None:
        grads.check_tokens(tokens)
    blocks = adapter.block_list(model)
    report = QuantizedModelReport()
    sink = on_layer or report.reps.__setitem__
    t0 = time.time()
    mode = spec.mode
    if mode != "data_free" and spec.needs_tokens and tokens is None:
        raise ValueError(f"{spec.describe()} needs calibration tokens")

    if mode == "block":
        quantize_blocks(model, adapter, spec, tokens, device, report, sink, progress, seed, streams, access)
        report.seconds = time.time() - t0
        return report

    layer_stats = None if grads is None else (lambda i, names: {"fisher": grads.fisher(i, names)})
    quant = _GroupQuantizer(LayerSolver(spec), report, sink, layer_stats)
    if mode == "data_free" or not spec.needs_tokens:
        # No forward pass: Hessians (if any) from the FP model's statistics artifacts.
        source = statistics.get("guided_hessian") or statistics.get("fp_hessian")
        for i in tqdm(range(len(blocks)), desc="quantize", disable=not progress, mininterval=5):
            block = access.open(i, device)
            for group in adapter.subgroups:
                quant(i, adapter, block, group, None if source is None else _to(source.hessian(i, group), device),
                      device)
            access.close(i, block)
            if source is not None:
                _log_block(report, adapter, i, len(blocks))
        report.seconds = time.time() - t0
        return report

    guided = spec.opt("guided_groups") if "guided_groups" in spec.option_defs() else 0

    chunk = max(1, min(len(tokens), chunk_tokens // tokens.shape[1]))
    folder = Path(tempfile.mkdtemp(prefix="quantlib-streams-")) if streams == "disk" else None
    with torch.no_grad(), _removed(folder):
        with access.outer(device):
            states = capture.States(capture.block_inputs(model, blocks, tokens, chunk, device), streams, folder,
                                    device)
        for i in tqdm(range(len(blocks)), desc="quantize", disable=not progress, mininterval=5):
            tb = time.time()
            block = access.open(i, device)
            # GuidedQuant's objective: each token's input weighted by the saliency of each layer's outputs.
            weights = {name: grads.saliency(i, name, guided) for g in adapter.subgroups for name in g} if guided \
                else None
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
            _log_block(report, adapter, i, len(blocks), time.time() - tb)
    report.seconds = time.time() - t0
    return report


@contextlib.contextmanager
def _removed(folder: Path | None):
    try:
        yield
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _log_block(report, adapter, i: int, n_blocks: int, seconds: float | None = None) -> None:
    errs = [report.layers[f"{adapter.blocks}.{i}.{n}"]["rel_error"] for g in adapter.subgroups for n in g]
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    log.info("block %d/%d quantized%s, mean relative layer error %.4g", i + 1, n_blocks, took, sum(errs) / len(errs))


def _to(H, device):
    if isinstance(H, GuidedHessian):
        return GuidedHessian(H.plain.to(device), {k: v.to(device) for k, v in H.per_linear.items()})
    return H.to(device)


class _GroupQuantizer:
    """Quantizes one subgroup (layers sharing an input) in place and records its diagnostics. `layer_stats(block,
    names)` gives per-weight statistics of the layers stacked (e.g. the Fisher information)."""

    def __init__(self, solver: LayerSolver, report: QuantizedModelReport, sink: Callable,
                 layer_stats: Callable | None = None):
        self.solver, self.report, self.sink, self.layer_stats = solver, report, sink, layer_stats
        self.format = solver.spec.format

    def _check_format(self, rep) -> None:
        if rep.format != self.format:
            raise RuntimeError(f"{self.solver.spec.describe()} returned format '{rep.format}', its catalog "
                               f"entry declares '{self.format}'")

    def __call__(self, block_idx: int, adapter: Adapter, block, group: tuple[str, ...], H, device) -> None:
        t = time.time()
        linears = [block.get_submodule(name) for name in group]
        W = torch.cat([lin.weight.data.to(device=device, dtype=torch.float32) for lin in linears])
        stats = self.layer_stats(block_idx, group) if self.layer_stats else {}
        if isinstance(H, GuidedHessian):
            self._guided(block_idx, adapter, group, linears, W, H, stats, t)
            return
        result = self.solver(W, H, f"{adapter.blocks}.{block_idx}.{'+'.join(group)}", stats)
        self._check_format(result.rep)
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
            diag.update(weight_errors(W[rows], W_hat, H))
            lin.weight.data.copy_(W_hat.to(lin.weight.dtype))
            self.report.layers[full] = diag
            self.sink(full, rep)

    def _guided(self, block_idx, adapter, group, linears, W, H: GuidedHessian, stats, t) -> None:
        """GuidedQuant's objective: each layer apart, its output rows in g contiguous blocks, each block solved with
        its own saliency-weighted Hessian."""
        row = 0
        for name, lin in zip(group, linears):
            full = f"{adapter.blocks}.{block_idx}.{name}"
            W_lin = W[row:row + lin.out_features]
            lin_stats = {k: v[row:row + lin.out_features] for k, v in stats.items()}
            row += lin.out_features
            Hs = H.per_linear[name]
            g = Hs.shape[0]
            size = lin.out_features // g
            parts, guided_error = [], 0.0
            for k in range(g):
                rows = slice(k * size, (k + 1) * size)
                label = f"{full} rows {rows.start}-{rows.stop - 1} (block {k + 1} of {g})"
                part = self.solver(W_lin[rows], Hs[k], label, {key: v[rows] for key, v in lin_stats.items()})
                self._check_format(part.rep)
                parts.append(part)
                guided_error += layer_error(W_lin[rows], part.weight, Hs[k])
            rep = type(parts[0].rep).stack_rows([p.rep for p in parts])
            W_hat = torch.cat([p.weight for p in parts])
            if not torch.isfinite(W_hat).all():
                raise NumericalError(f"quantized weight of layer '{full}' contains NaN or Inf")
            diag = {"shape": [lin.out_features, lin.in_features], "seconds": round(time.time() - t, 4),
                    "bits_per_weight": rep.bits_per_weight, "guided_groups": g, "guided_error": guided_error,
                    "row_blocks": [p.stats for p in parts], **weight_errors(W_lin, W_hat, H.plain)}
            lin.weight.data.copy_(W_hat.to(lin.weight.dtype))
            self.report.layers[full] = diag
            self.sink(full, rep)


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
