"""Weight preprocessing run before the solver, on each subgroup of layers that shares a Hessian.

Signature: `preprocess(W, task) -> W'` with W (d_out, d_in) float32 and `task` the layer's LayerTask (its prepared
Hessian is the one the solver gets next). The solver then quantizes W'; the runner still measures the layer error
against the original W.
"""

from __future__ import annotations

import torch

from quantlib.solvers.grid_init import grouped


def _clip_level(srt: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, complete) from the k largest magnitudes of each vector, sorted descending: the level t at which the
    magnitudes clipped above it sum to alpha, when the clipped entries lie among those k (complete)."""
    css = srt.cumsum(-1) - alpha
    idx = torch.arange(1, srt.shape[-1] + 1, dtype=srt.dtype, device=srt.device)
    clipped = srt * idx > css  # true on a prefix: the entries above the level
    rho = clipped.sum(-1, keepdim=True).clamp_min(1)
    level = (css.gather(-1, rho - 1) / rho.to(srt.dtype)).clamp_min(0)
    return level, ~clipped[..., -1:]


def prox_linf(v: torch.Tensor, alpha: float, top: int = 8) -> torch.Tensor:
    """prox of alpha * ||.||_inf along the last dim: clips each vector's magnitudes at the level t where the clipped
    parts sum to alpha, or returns 0 when ||v||_1 <= alpha (Moreau: v - alpha * P_{l1 ball}(v / alpha)).

    MagR's small penalty clips only a few entries per group, so the level is found from the `top` largest
    magnitudes (a partial sort); only the vectors that clip more entries are fully sorted."""
    a = v.abs()
    n = v.shape[-1]
    level, complete = _clip_level(a.topk(min(top, n), -1).values, alpha)
    if n > top and not bool(complete.all()):
        flat_a, flat_level = a.reshape(-1, n), level.reshape(-1, 1).clone()
        redo = (~complete.reshape(-1)).nonzero().flatten()
        flat_level[redo] = _clip_level(flat_a[redo].sort(-1, descending=True).values, alpha)[0]
        level = flat_level.reshape(level.shape)
    small = a.sum(-1, keepdim=True) <= alpha
    return torch.where(small, torch.zeros_like(v), v.clamp(-level, level))


def magr(W: torch.Tensor, task) -> torch.Tensor:
    """MagR (Zhang et al. 2024, "MagR: Weight Magnitude Reduction for Enhancing Post-Training Quantization"): minimise 1/2 tr((V - W) Hn (V - W)^T) + alpha * sum over (row, group) of
    ||v||_inf by proximal gradient from V = W, with Hn = H_damped / lambda_max (so a unit step is safe).
    It lowers the largest magnitudes of each group while keeping the layer's output close."""
    spec, hess = task.spec, task.hessian
    hess.ensure_positive_definite()  # settles the damping; the factor is kept for the solver
    Hd = hess.matrix().to(W.dtype)
    Hn = Hd / torch.linalg.eigvalsh(Hd.double())[-1].to(W.dtype)
    alpha = spec.opt("magr_alpha")
    V = W.clone()
    for _ in range(spec.opt("magr_iters")):
        step = V - (V - W) @ Hn
        V = prox_linf(grouped(step, spec.group_size), alpha).reshape_as(W)
    return V
