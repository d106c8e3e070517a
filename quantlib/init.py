"""Quantization-parameter initialisation: how (scale, zero) of each (row, group) are chosen before solving.

Every init has the signature `init(W, spec, hdiag) -> UniformGrid`, where `W` is (d_out, d_in) float32 and
`hdiag` is diag(H) after damping (None for data-free runs). Solvers that use a uniform grid call
`init_grid(W, spec, hdiag)`, so every init composes with every such solver.
"""

from __future__ import annotations

import torch

from . import methods
from .quantizer import UniformGrid, num_groups


def init_grid(W: torch.Tensor, spec, hdiag: torch.Tensor | None) -> UniformGrid:
    return methods.component("init", spec.init).load()(W, spec, hdiag)


def grouped(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """(d_out, d_in) -> (d_out, n_groups, group) view of the groups of each row."""
    d_out, d_in = W.shape
    return W.reshape(d_out, num_groups(d_in, group_size), -1)


def minmax_params(W: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's quantizer: range [min(w, 0), max(w, 0)] per group (0 always representable, so the integer zero
    point fits in `bits` bits); symmetric grids centre the zero point. An all-zero group gets the range [-1, 1]."""
    maxq = 2 ** bits - 1
    g = grouped(W, group_size)
    zero_t = torch.zeros((), dtype=W.dtype, device=W.device)
    xmin = torch.minimum(g.amin(-1), zero_t)
    xmax = torch.maximum(g.amax(-1), zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def minmax_init(W: torch.Tensor, spec, hdiag: torch.Tensor | None = None) -> UniformGrid:
    scale, zero = minmax_params(W, spec.bits, spec.group_size, spec.opt("sym"))
    return UniformGrid(scale, zero, spec.bits, spec.group_size)
