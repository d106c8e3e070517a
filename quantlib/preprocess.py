"""Weight preprocessing run before the solver, on each subgroup of layers that shares a Hessian.

Signature: `preprocess(W, H, spec, layer) -> W'` with W (d_out, d_in) float32 and H the undamped mean Hessian.
The solver then quantizes W'; the runner still measures the layer error against the original W.
"""

from __future__ import annotations

import torch

from .hessian import damp_until_pd, fix_dead_columns
from .init import grouped


def project_l1_ball(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each vector along the last dim onto {u : ||u||_1 <= 1} (sort-based)."""
    a = v.abs()
    inside = a.sum(-1, keepdim=True) <= 1
    srt = a.sort(-1, descending=True).values
    css = srt.cumsum(-1) - 1
    idx = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    rho = ((srt * idx) > css).sum(-1, keepdim=True).clamp_min(1)  # the active entries form a prefix
    theta = (css.gather(-1, rho - 1) / rho.to(v.dtype)).clamp_min(0)
    return torch.where(inside, v, torch.sign(v) * (a - theta).clamp_min(0))


def prox_linf(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """prox of alpha * ||.||_inf along the last dim (Moreau: v - alpha * P_{l1 ball}(v / alpha)): clips each
    vector's largest magnitudes down to a common level, or returns 0 when ||v||_1 <= alpha."""
    return v - alpha * project_l1_ball(v / alpha)


def magr(W: torch.Tensor, H: torch.Tensor, spec, layer: str) -> torch.Tensor:
    """MagR (algorithms.md 2.5): minimise 1/2 tr((V - W) Hn (V - W)^T) + alpha * sum over (row, group) of
    ||v||_inf by proximal gradient from V = W, with Hn = H_damped / lambda_max (so a unit step is safe).
    It lowers the largest magnitudes of each group while keeping the layer's output close."""
    H, _ = fix_dead_columns(H)
    Hd, _, _ = damp_until_pd(H, spec.opt("damp"), layer)
    Hd = Hd.to(W.dtype)
    Hn = Hd / torch.linalg.eigvalsh(Hd.double())[-1].to(W.dtype)
    alpha = spec.opt("magr_alpha")
    V = W.clone()
    for _ in range(spec.opt("magr_iters")):
        step = V - (V - W) @ Hn
        V = prox_linf(grouped(step, spec.group_size), alpha).reshape_as(W)
    return V
