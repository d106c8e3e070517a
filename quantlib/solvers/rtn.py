"""Round to nearest on the initialised grid (every group with its own parameters)."""

from __future__ import annotations

import torch

from ..hessian import damped_diag, fix_dead_columns
from ..init import init_grid
from ..quantizer import UniformQuantized
from . import SolveResult


def solve(W: torch.Tensor, H: torch.Tensor | None, spec, layer: str) -> SolveResult:
    # RTN itself ignores H; it is present only when the init weights its error by diag(H).
    hdiag = None if H is None else damped_diag(fix_dead_columns(H)[0], spec.opt("damp"))
    grid = init_grid(W, spec, hdiag)
    rep = UniformQuantized(grid.quantize(W).to(torch.uint8), grid)
    return SolveResult(rep, rep.dequantize())
