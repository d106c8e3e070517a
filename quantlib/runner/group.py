"""One subgroup of layers (sharing an input) quantized in place by the spec's resolved solver, with its diagnostics:
the step every non-block-wise walk of the runner shares."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from quantlib.access.adapters import Adapter
from quantlib.errors import NumericalError
from quantlib.solvers.contract import LayerSolver
from quantlib.stats.hessian import GuidedHessian, layer_error, weight_errors

log = logging.getLogger("quantlib")


@dataclass
class QuantizedModelReport:
    layers: dict = field(default_factory=dict)  # full layer name -> diagnostics
    reps: dict = field(default_factory=dict)  # full layer name -> representation (when no `on_layer` took them)
    blocks: list = field(default_factory=list)  # per-block diagnostics (block-wise mode)
    preprocess: dict = field(default_factory=dict)  # model-scope preprocessors' diagnostics (rotations' training)
    seconds: float = 0.0


def log_block(report, adapter, i: int, n_blocks: int, seconds: float | None = None) -> None:
    errs = [report.layers[f"{adapter.blocks}.{i}.{n}"]["rel_error"] for g in adapter.subgroups for n in g]
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    log.info("block %d/%d quantized%s, mean relative layer error %.4g", i + 1, n_blocks, took, sum(errs) / len(errs))


def to_device(H, device):
    if isinstance(H, GuidedHessian):
        return GuidedHessian(H.plain.to(device), {k: v.to(device) for k, v in H.per_linear.items()})
    return H.to(device)


class GroupQuantizer:
    """Quantizes one subgroup (layers sharing an input) in place and records its diagnostics. `layer_stats(block,
    group)` gives per-weight statistics of the layers stacked (what the statistics hand the solver)."""

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
        result = self.solver(W, H, f"{adapter.blocks}.{block_idx}.{'+'.join(group)}", stats,
                             tuple(lin.out_features for lin in linears))
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
