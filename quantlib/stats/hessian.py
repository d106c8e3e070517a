"""One Hessian capture, one damping policy and one prepared form of a layer's Hessian, used by every
Hessian-based preprocessor and solver.

H = (1/N) sum_t x_t x_t^T over the N calibration tokens that reach a layer (NeUQI's normalisation; every solver
here is invariant to a positive rescaling of H). Accumulated in float64 across chunks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from quantlib.errors import NumericalError

log = logging.getLogger("quantlib")


class HessianAccumulator:
    def __init__(self, d_in: int, device=None):
        self.sum = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        # fp32 product per chunk (fast on CPU), fp64 across chunks.
        self.sum += gram(x)
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        if self.tokens == 0:
            raise NumericalError("no calibration tokens reached this layer")
        return (self.sum / self.tokens).float()


@dataclass
class GuidedHessian:
    """A subgroup's Hessians for GuidedQuant's objective: the plain one, and per linear (g, d_in, d_in), one per
    contiguous block of its output rows."""

    plain: torch.Tensor
    per_linear: dict


class WeightedHessianAccumulator:
    """g Hessians of the same inputs, token t weighted by w_tk in the k-th: H_k = (1/N) sum_t w_tk x_t x_t^T
    (GuidedQuant's saliency-weighted Hessians). Weights are non-negative."""

    def __init__(self, d_in: int, groups: int, device=None):
        self.sum = torch.zeros(groups, d_in, d_in, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, weights: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        w = weights.reshape(x.shape[0], -1).to(device=x.device, dtype=x.dtype)
        for k in range(self.sum.shape[0]):
            self.sum[k] += gram(x * w[:, k:k + 1].sqrt())  # (sqrt(w) x)^T (sqrt(w) x) = x^T diag(w) x
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        if self.tokens == 0:
            raise NumericalError("no calibration tokens reached this layer")
        return (self.sum / self.tokens).float()


def gram(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """x^T x computed as its upper block triangle and mirrored: about (1 + 1/nb)/2 of a full matmul's work for
    nb column blocks. On the calibration forward this product costs as much as the block's own linears."""
    d = x.shape[1]
    nb = -(-d // block)
    if nb == 1:
        return x.T @ x
    edges = [round(i * d / nb) for i in range(nb + 1)]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for a, b in zip(edges, edges[1:]):
        rows = x[:, a:b].T @ x[:, a:]
        out[a:b, a:] = rows
        out[b:, a:b] = rows[:, b - a:].T
    return out


def fix_dead_columns(H: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Inputs that are always zero (H_ii = 0) get H_ii = 1, GPTQ's convention: their weights are rounded
    independently. Returns a copy (H itself when no column is dead: nothing writes into it, and a copy of a 70B
    down projection's Hessian is 3.3 GB) and the number of such columns."""
    dead = torch.diagonal(H) == 0
    n = int(dead.sum())
    if n:
        H = H.clone()
        H[dead, dead] = 1.0
    return H, n


def damp_until_pd(H: torch.Tensor, damp: float, layer: str, max_tries: int = 10,
                  factor: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                  ladder: str = "gptq"):
    """Add `damp * mean(diag H)` to the diagonal; if the factorisation fails, raise the damping with a logged
    warning: `gptq` doubles it (at least 1 %), up to `max_tries` times; `lnq` (GuidedQuant's LNQ) tries 1e-5, then
    ten times more each time, up to 1.

    `factor(A)` returns (factor, info) like `torch.linalg.cholesky_ex`; info != 0 means not positive definite.
    Returns (damped H, factor of it, damping fraction used).
    """
    factor = factor or torch.linalg.cholesky_ex
    mean_diag = torch.diagonal(H).mean()
    if not torch.isfinite(H).all():
        raise NumericalError(f"the Hessian of layer '{layer}' contains NaN or Inf: the calibration activations "
                             "overflowed (use float32, or check the model's weights)")
    if mean_diag <= 0:
        raise NumericalError(f"the Hessian of layer '{layer}' has a non-positive mean diagonal ({mean_diag:.3g}); "
                             "no calibration signal reached it")
    current = damp
    for attempt in range(max_tries + 1):
        Hd = add_damping(H, current)
        fac, info = factor(Hd)
        if int(info) == 0 and torch.isfinite(fac).all():
            return Hd, fac, current
        nxt = _next_damping(current, ladder)
        if nxt is None or attempt == max_tries:
            break
        log.warning("layer %s: Hessian not positive definite with damping %.3g; retrying with %.3g",
                    layer, current, nxt)
        current = nxt
    raise NumericalError(
        f"the Hessian of layer '{layer}' is not positive definite even with damping {current:.3g} "
        f"({attempt} retries). More calibration tokens (nsamples x seqlen well above the layer's input size "
        f"{H.shape[0]}) or a larger `damp` option usually fix this.")


def _next_damping(current: float, ladder: str) -> float | None:
    if ladder == "lnq":
        nxt = max(10 * current, 1e-5)
        return nxt if nxt <= 1 else None
    return max(2 * current, 0.01)


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the layer's mean squared output error per token."""
    D = (W - W_hat).to(H.dtype)
    return float(((D @ H) * D).sum())


def weight_errors(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> dict:
    """A layer's error: under its Hessian when there is one (absolute and relative to tr(W H W^T)), else the
    relative squared weight error."""
    if H is None:
        return {"rel_error": float(((W - W_hat) ** 2).sum() / (W ** 2).sum())}
    err = layer_error(W, W_hat, H)
    ref = float(((W @ H) * W).sum())
    return {"error": err, "rel_error": err / ref if ref > 0 else math.nan}


def add_damping(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I: the one damping rule (methods that need no factorisation call it directly). A
    copy with its diagonal raised in place: no d x d identity beside it."""
    out = H.clone()
    out.diagonal().add_(damp * torch.diagonal(H).mean())
    return out


class PreparedHessian:
    """A layer's Hessian prepared once and handed to its preprocessors and solver.

    Dead inputs (H_ii = 0) get H_ii = 1 (GPTQ's convention), columns are ordered by decreasing diag(H) under act
    order, and `damp * mean(diag H)` is added to the diagonal. The first factorisation (`ldl`) raises the damping,
    with a logged warning, until H is positive definite; everything handed out afterwards (`matrix`, `diag`) uses the
    damping actually applied, so a preprocessor and the solver after it see one matrix. `raw` is the undamped mean
    Hessian, which the runner's layer errors use.
    """

    def __init__(self, H: torch.Tensor, damp: float, act_order: bool, layer: str, ladder: str = "gptq"):
        self.raw = H
        self.ladder = ladder
        self.H, self.dead = fix_dead_columns(H)
        self.layer = layer
        self.act_order = act_order
        d_in = H.shape[0]
        self.perm = (torch.argsort(torch.diagonal(self.H), descending=True, stable=True) if act_order
                     else torch.arange(d_in))
        self.damp = damp  # raised by `ldl` when the damped matrix is not positive definite
        self._ldl = None

    @property
    def d_in(self) -> int:
        return self.H.shape[0]

    def ldl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, D) with the damped, permuted H = U diag(D) U^T, U unit upper triangular: D_k is what a unit rounding
        error of column k costs after error feedback (1 / [chol(H^-1)]_kk^2 in GPTQ's terms). Computed once."""
        if self._ldl is None:
            # No permuted copy without act order, U divided in place: the solve's peak is the damped H, its
            # flipped copy and the factor (3 d x d beside the Hessian itself)
            Hp = self.H[self.perm][:, self.perm] if self.act_order else self.H
            _, C, self.damp = damp_until_pd(Hp, self.damp, self.layer, factor=_reversed_cholesky, ladder=self.ladder)
            d = torch.diagonal(C).clone()
            self._ldl = (C.div_(d), d * d)
        return self._ldl

    def ensure_positive_definite(self) -> None:
        """Settle the damping (one factorisation, kept for the solver)."""
        self.ldl()

    def matrix(self) -> torch.Tensor:
        """The damped H in the original column order."""
        return add_damping(self.H, self.damp)

    def permuted(self) -> torch.Tensor:
        """The damped H in processing order."""
        return self.matrix()[self.perm][:, self.perm]

    def diag(self) -> torch.Tensor:
        """diag(H) after damping, original order (the weights of diag-weighted inits)."""
        d = torch.diagonal(self.H)
        return d + self.damp * d.mean()


def _reversed_cholesky(A: torch.Tensor):
    """The upper factor C with A = C C^T (the Cholesky factor of the index-reversed matrix, reversed back)."""
    L, info = torch.linalg.cholesky_ex(A.flip(0, 1))
    return L.flip(0, 1), info
