"""LDLQ: GPTQ's error feedback written through the LDL factorisation of H (QuIP), with H reorder (act order).

With the columns permuted by decreasing diag(H) (when act_order), factor H_pi = U D U^T with U unit upper
triangular (the Cholesky factor of the index-reversed matrix, reversed back). The error e = w - w_hat then costs
sum_k D_k ((e U)_k)^2, and column k is quantized as

    w_hat_k = Q_k( w_k + sum_{j<k} (w_j - w_hat_j) U_jk ),

which makes (eU)_k the rounding error of column k alone. Q_k uses the grid of column k's *original* group
(static groups), so act order needs no g_idx at inference. Feedback from earlier blocks of columns is one matmul
per block ("lazy batch"); the result does not depend on the block size.
"""

from __future__ import annotations

import torch

from ..hessian import damp_until_pd, fix_dead_columns
from ..init import init_grid
from ..quantizer import UniformQuantized
from . import SolveResult

BLOCK = 128


def _reversed_cholesky(A: torch.Tensor):
    L, info = torch.linalg.cholesky_ex(A.flip(0, 1))
    return L.flip(0, 1), info


def ldl_factor(H: torch.Tensor, damp: float, layer: str):
    """(U unit upper triangular, D, damping used) with H_damped = U diag(D) U^T. D_k is what a unit rounding error
    of column k (after feedback) costs: D_k = 1 / [H^-1 Cholesky factor]_kk^2 in GPTQ's terms."""
    _, C, used = damp_until_pd(H, damp, layer, factor=_reversed_cholesky)
    d = torch.diagonal(C)
    return C / d, d * d, used


def unit_upper_factor(H: torch.Tensor, damp: float, layer: str):
    """(U unit upper triangular with H_damped = U D U^T, damping used)."""
    U, _, used = ldl_factor(H, damp, layer)
    return U, used


def solve(W: torch.Tensor, H: torch.Tensor, spec, layer: str) -> SolveResult:
    d_out, d_in = W.shape
    H, dead = fix_dead_columns(H)
    act_order = spec.opt("act_order")
    # Damp first so the init's diag weights and the factorisation see the same matrix.
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(d_in)
    U, used = unit_upper_factor(H[perm][:, perm], spec.opt("damp"), layer)
    hdiag = torch.diagonal(H) + used * torch.diagonal(H).mean()
    grid = init_grid(W, spec, hdiag)
    codes = ldlq_codes(W, U, grid, perm)
    rep = UniformQuantized(codes, grid)
    return SolveResult(rep, rep.dequantize(), {"damp": used, "dead_columns": dead, "act_order": act_order})


def ldlq_codes(W: torch.Tensor, U: torch.Tensor, grid, perm: torch.Tensor) -> torch.Tensor:
    """Codes (d_out, d_in, original column order) from the LDLQ feedback with unit upper U of the permuted H."""
    d_out, d_in = W.shape
    scale, zero = (t.T.contiguous() for t in grid.column_params(d_in, perm))
    maxq = grid.maxq
    codes = torch.empty(d_in, d_out, dtype=W.dtype)
    w_hat = torch.empty(d_out, dtype=W.dtype)

    # In place and into preallocated rows: this runs once per column, so dispatch and allocation dominate.
    def round_column(k: int, target: torch.Tensor) -> torch.Tensor:
        q, s, z = codes[k], scale[k], zero[k]
        torch.div(target, s, out=q)
        q.add_(z).round_().clamp_(0, maxq)
        torch.sub(q, z, out=w_hat)
        return w_hat.mul_(s)

    ErrorFeedback(W, U, perm).run(round_column)
    out = torch.empty(d_out, d_in, dtype=torch.uint8)
    out[:, perm] = codes.T.to(torch.uint8)
    return out


class ErrorFeedback:
    """The LDLQ column loop, shared by every solver that rounds column by column with error feedback (LDLQ, SpQR).

    Works on transposed, contiguous copies in processing order (column k of W[:, perm] is row k here, so every step
    touches contiguous memory). `run(step)` calls `step(k, target_k)` for k = 0..d_in-1, where target_k = w_k +
    sum_{j<k} (w_j - w_hat_j) U_jk, and `step` returns w_hat_k. Feedback from earlier blocks of columns is one matmul
    per block ("lazy batch"); the result does not depend on the block size.

    In terms of the rounding errors r_j = target_j - w_hat_j (r = e U), target_k = w_k + sum_{j<k} r_j V_jk with
    V = I - U^-1: GPTQ's form, whose partial sums are GPTQ's working matrix (`current`).
    """

    def __init__(self, W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor):
        self.Wt = W[:, perm].T.contiguous()
        self.U = U.to(W.dtype)
        self.err = torch.empty_like(self.Wt)  # w - w_hat of the columns done so far
        # target_k of the columns done so far; the rounding errors target - w_hat = target - w + err are formed
        # only when `current` needs them, which keeps the column loop short.
        self.targets = torch.empty_like(self.Wt)
        self.done = 0  # columns 0..done-1 have their w_hat
        self._V = None

    def current(self, positions: torch.Tensor) -> torch.Tensor:
        """(len(positions), d_out): GPTQ's working values of columns not yet done, i.e. the best unquantized values
        given the columns done so far (w_p + sum_{j<done} r_j V_jp). Costs one triangular inverse on first use."""
        if self._V is None:
            eye = torch.eye(self.U.shape[0], dtype=self.U.dtype)
            self._V = eye - torch.linalg.solve_triangular(self.U, eye, upper=True, unitriangular=True)
        out = self.Wt[positions].clone()
        if self.done:
            done = slice(0, self.done)
            rounding = self.targets[done] - self.Wt[done] + self.err[done]
            out += self._V[done, positions].T @ rounding
        return out

    def run(self, step) -> None:
        Wt, U, err = self.Wt, self.U, self.err
        d_in = Wt.shape[0]
        for b0 in range(0, d_in, BLOCK):
            b1 = min(b0 + BLOCK, d_in)
            target = self.targets[b0:b1]
            target.copy_(Wt[b0:b1])
            if b0:
                target.addmm_(U[:b0, b0:b1].T, err[:b0])
            Ub = U[b0:b1, b0:b1]
            for j in range(b1 - b0):
                k = b0 + j
                self.done = k
                e = err[k]
                torch.sub(Wt[k], step(k, target[j]), out=e)
                if j + 1 < b1 - b0:
                    target[j + 1:].addr_(Ub[j, j + 1:], e)
        self.done = d_in
