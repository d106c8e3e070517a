"""Solvers: one module each, listed in `quantlib.methods`. A solver maps a layer's weight (and its Hessian when it
needs one) to a stored representation plus the dequantized weight:

    solve(W: (d_out, d_in) float32, H: (d_in, d_in) float32 | None, spec: QuantSpec, layer: str) -> SolveResult

H is the undamped mean Hessian; each solver applies `spec.opt("damp")` through `quantlib.hessian`. Rows are
independent given H, so the runner may stack layers that share an input (q/k/v) into one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SolveResult:
    rep: Any  # the stored representation (e.g. quantlib.quantizer.UniformQuantized)
    weight: torch.Tensor  # dequantized weight, (d_out, d_in) float32
    stats: dict = field(default_factory=dict)  # solver diagnostics for the per-layer report
