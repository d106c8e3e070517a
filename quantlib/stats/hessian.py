"""One Hessian capture, one damping policy and one prepared form of a layer's Hessian, used by every
Hessian-based preprocessor and solver.

H = (1/N) sum_t x_t x_t^T over the N calibration tokens that reach a layer (NeUQI's normalisation; every solver
here is invariant to a positive rescaling of H). Accumulated in float64 across chunks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from quantlib.access.lazy import all_finite
from quantlib.errors import NumericalError

log = logging.getLogger("quantlib")


class HessianAccumulator:
    def __init__(self, d_in: int, device=None):
        self.sum = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        # fp32 product per chunk (fast on CPU), fp64 across chunks.
        gram(x, into=self.sum)
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        if self.tokens == 0:
            raise NumericalError("no calibration tokens reached this layer")
        return mean_float32(self.sum, self.tokens)


def mean_float32(total: torch.Tensor, tokens: int, rows: int = 256) -> torch.Tensor:
    """(total / tokens) in float32, a slice of rows at a time: the float64 quotient of a whole 70B down
    projection's Hessian would be 6.6 GB beside the sum's own 6.6 GB. The same values as `(total / tokens).float()`."""
    out = torch.empty(total.shape, dtype=torch.float32, device=total.device)
    for a in range(0, total.shape[-2], rows):
        out[..., a:a + rows, :] = total[..., a:a + rows, :] / tokens
    return out


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
            gram(x * w[:, k:k + 1].sqrt(), into=self.sum[k])  # (sqrt(w) x)^T (sqrt(w) x) = x^T diag(w) x
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        if self.tokens == 0:
            raise NumericalError("no calibration tokens reached this layer")
        return mean_float32(self.sum, self.tokens)


def gram(x: torch.Tensor, block: int = 512, into: torch.Tensor | None = None) -> torch.Tensor:
    """x^T x computed as its upper block triangle and mirrored: about (1 + 1/nb)/2 of a full matmul's work for
    nb column blocks. On the calibration forward this product costs as much as the block's own linears. With
    `into` (a float64 sum), each slice of the product is added to it as it is made, with no d x d product beside
    the sum: the same sum as `into += gram(x)`."""
    d = x.shape[1]
    nb = -(-d // block)
    if nb == 1:
        if into is None:
            return x.T @ x
        return into.add_(x.T @ x)
    edges = [round(i * d / nb) for i in range(nb + 1)]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device) if into is None else into
    for a, b in zip(edges, edges[1:]):
        rows = x[:, a:b].T @ x[:, a:]
        if into is None:
            out[a:b, a:] = rows
            out[b:, a:b] = rows[:, b - a:].T
        else:
            out[a:b, a:] += rows
            out[b:, a:b] += rows[:, b - a:].T
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
                  factor: Callable[[float], tuple[torch.Tensor, torch.Tensor]] | None = None,
                  ladder: str = "gptq") -> tuple[torch.Tensor, float]:
    """Factorise H with `damp * mean(diag H)` added to the diagonal; if the factorisation fails, raise the damping
    with a logged warning: `gptq` doubles it (at least 1 %), up to `max_tries` times; `lnq` (GuidedQuant's LNQ)
    tries 1e-5, then ten times more each time, up to 1.

    `factor(c)` returns (factor, info), like `torch.linalg.cholesky_ex`, of H damped by the fraction c, built
    afresh at every try (so it may factorise in place); info != 0 means not positive definite. The default is the
    Cholesky factor of `add_damping(H, c)`. Returns (factor, damping fraction used).
    """
    factor = factor or (lambda c: torch.linalg.cholesky_ex(add_damping(H, c)))
    mean_diag = torch.diagonal(H).mean()
    if not all_finite(H):
        raise NumericalError(f"the Hessian of layer '{layer}' contains NaN or Inf: the calibration activations "
                             "overflowed (use float32, or check the model's weights)")
    if mean_diag <= 0:
        raise NumericalError(f"the Hessian of layer '{layer}' has a non-positive mean diagonal ({mean_diag:.3g}); "
                             "no calibration signal reached it")
    current = damp
    for attempt in range(max_tries + 1):
        fac, info = factor(current)
        if int(info) == 0 and all_finite(fac):
            return fac, current
        del fac
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
        error of column k costs after error feedback (1 / [chol(H^-1)]_kk^2 in GPTQ's terms). Computed once, in one
        d x d buffer beside H (`_reversed_cholesky`): a 70B down projection's Hessian is 3.3 GB."""
        if self._ldl is None:
            C, self.damp = damp_until_pd(self.H, self.damp, self.layer, ladder=self.ladder,
                                         factor=partial(_reversed_cholesky, self.H, self.perm))
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


def _reversed_cholesky(H: torch.Tensor, perm: torch.Tensor, damp: float, rows: int = 1024):
    """The upper factor C with A = C C^T of A = H permuted by `perm` and damped by the fraction `damp` (the Cholesky
    factor of the index-reversed matrix, reversed back), made in one d x d buffer: the reversal is folded into the
    permuting copy; the factorisation runs in place on the buffer's column-major view (LAPACK's own layout: no copy
    of its input); both axes are then reversed by swapping slices of rows; C is that buffer's column-major view.
    The same bits, and the same layout, as `torch.linalg.cholesky_ex(A.flip(0, 1))` flipped back."""
    rev = perm.flip(0)
    d = rev.numel()
    At = torch.empty_like(H)  # the transpose of the reversed permuted H: its column-major view is that matrix itself
    # Two scratch buffers for every slice of rows (fresh temporaries of tens of MB each would stay with the
    # allocator: +0.8 d x d measured at d = 6144). A Gram matrix in float32 need not be exactly symmetric and the
    # factorisation reads one triangle, so At is gathered from H's columns, as H^T's rows.
    k = max(2, min(rows, d))
    columns, scratch = H.new_empty(d, k), H.new_empty(k, d)
    for r0 in range(0, d, k):
        n = min(k, d - r0)
        picked = scratch.view(-1)[:d * n].view(d, n)
        torch.index_select(H, 1, rev[r0:r0 + n], out=columns[:, :n])
        torch.index_select(columns[:, :n], 0, rev, out=picked)
        At[r0:r0 + n].copy_(picked.mT)
    del columns
    At.diagonal().add_(damp * _permuted_diagonal_mean(H, perm))
    info = torch.empty((), dtype=torch.int32, device=H.device)
    torch.linalg.cholesky_ex(At.mT, out=(At.mT, info))  # the column-major view now holds L: At = L^T
    if int(info):
        return At, info
    _rotate_in_place(At, scratch)  # At[i, j] = L[d-1-j, d-1-i] = C[j, i]
    # C column-major, as the flipped factor was (the solvers' products round by layout)
    return At.mT, info


def _permuted_diagonal_mean(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """mean(diag(H[perm][:, perm])) to the bit, without the permuted matrix: torch sums a strided vector (a
    matrix's diagonal) in another order than a contiguous one, so the values are read through a strided view."""
    spaced = H.new_empty(perm.numel(), 2)
    spaced[:, 0] = torch.diagonal(H)[perm]
    return spaced[:, 0].mean()


def _rotate_in_place(A: torch.Tensor, scratch: torch.Tensor) -> None:
    """A[i, j] <- A[d-1-i, d-1-j] (both axes reversed) in A itself, slices of rows from both ends swapped through
    `scratch` (2k rows)."""
    d = A.shape[0]
    k = scratch.shape[0] // 2
    saved, turned = scratch[:k], scratch[k:2 * k]
    cols = torch.arange(d - 1, -1, -1, device=A.device)
    for a in range(0, d // 2, k):
        n = min(a + k, d // 2) - a
        top, bottom = A[a:a + n], A[d - a - n:d - a]
        rows = torch.arange(n - 1, -1, -1, device=A.device)
        saved[:n].copy_(top)
        torch.index_select(bottom, 0, rows, out=turned[:n])
        torch.index_select(turned[:n], 1, cols, out=top)
        torch.index_select(saved[:n], 0, rows, out=turned[:n])
        torch.index_select(turned[:n], 1, cols, out=bottom)
    if d % 2:
        middle = A[d // 2]
        saved[0].copy_(middle)
        torch.index_select(saved[0], 0, cols, out=middle)

