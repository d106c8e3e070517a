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


def unit_upper_factor(H: torch.Tensor, damp: float, layer: str):
    """(U unit upper triangular with H_damped = U D U^T, damping used)."""
    _, C, used = damp_until_pd(H, damp, layer, factor=_reversed_cholesky)
    return C / torch.diagonal(C), used


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
    # Work on transposed, contiguous copies: column k of W is row k here, so every step touches contiguous memory.
    Wt = W[:, perm].T.contiguous()
    scale, zero = (t.T.contiguous() for t in grid.column_params(d_in, perm))
    maxq = grid.maxq
    U = U.to(W.dtype)
    err = torch.empty_like(Wt)  # w - w_hat, permuted order
    codes = torch.empty_like(Wt)
    for b0 in range(0, d_in, BLOCK):
        b1 = min(b0 + BLOCK, d_in)
        target = Wt[b0:b1].clone()
        if b0:
            target += U[:b0, b0:b1].T @ err[:b0]
        Ub = U[b0:b1, b0:b1]
        for j in range(b1 - b0):
            k = b0 + j
            q = torch.clamp(torch.round(target[j] / scale[k] + zero[k]), 0, maxq)
            codes[k] = q
            e = torch.sub(Wt[k], scale[k] * (q - zero[k]), out=err[k])
            if j + 1 < b1 - b0:
                target[j + 1:].addr_(Ub[j, j + 1:], e)
    out = torch.empty(d_out, d_in, dtype=torch.uint8)
    out[:, perm] = codes.T.to(torch.uint8)
    return out
