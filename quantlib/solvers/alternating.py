"""ALTERNATING: data-free binary-coding quantization (Xu et al. 2018, "Alternating Multi-bit Quantization for
Recurrent Neural Networks"), as UniQuanF runs it.

Per (row, group) vector x: greedy start (i = 1..b: beta_i = sign(r) with sign(0) = +1, alpha_i = mean |r|,
r -= alpha_i beta_i), then T rounds of: least-squares alpha for the current signs and offset ((B^T B + 1e-6 I) alpha
= B^T (x - o)), alpha <- |alpha| sorted descending, each weight's signs <- its nearest of the 2^b levels, and the
offset o <- mean(x - B alpha) (`nooffset`: o = 0). Stored in the `bcq` format.
"""

from __future__ import annotations

import torch

from quantlib.formats.bcq import BcqQuantized, levels, signs_of
from quantlib.solvers.contract import LayerTask, SolveResult


def nearest_level(x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Cartesian index of the level nearest to each value, x (R, n), alphas (R, b); never builds n x 2^b."""
    lv = levels(alphas)  # (R, 2^b)
    ordered, by_value = lv.sort(-1)
    pos = torch.searchsorted(ordered.contiguous(), x.contiguous()).clamp(1, lv.shape[-1] - 1)
    lower, upper = ordered.gather(-1, pos - 1), ordered.gather(-1, pos)
    pick = torch.where((x - lower).abs() <= (upper - x).abs(), pos - 1, pos)
    return by_value.gather(-1, pick)


def _apply(alphas: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """sum_i alpha_i beta_i for each weight's level index (R, n)."""
    b = alphas.shape[-1]
    beta = signs_of(index, b).to(alphas.dtype) * 2 - 1  # (b, R, n)
    return torch.einsum("rb,brn->rn", alphas, beta)


def greedy(x: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas (R, b), level index (R, n)) of the greedy residual fit."""
    r = x.clone()
    alphas, bits = [], []
    for _ in range(b):
        beta = torch.where(r >= 0, 1.0, -1.0).to(x.dtype)
        a = r.abs().mean(-1, keepdim=True)
        r -= a * beta
        alphas.append(a[:, 0])
        bits.append(beta < 0)
    alphas = torch.stack(alphas, -1)
    index = torch.zeros_like(x, dtype=torch.long)
    for bit in bits:
        index = index * 2 + bit.long()
    return alphas, index


def fit(x: torch.Tensor, b: int, rounds: int, offset: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALTERNATING on the rows of x (R, n): (alphas (R, b) descending, level index (R, n), offsets (R,))."""
    alphas, index = greedy(x, b)
    o = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    # The b x b systems are solved in float64: B^T B holds counts up to n, beside which float32 loses the 1e-6 ridge,
    # and a group whose sign planes coincide (one outlier among near-equal weights: a row of Gemma 3's down_proj)
    # is then exactly singular.
    eye = 1e-6 * torch.eye(b, dtype=torch.float64, device=x.device)
    for _ in range(rounds):
        B = (signs_of(index, b).to(x.dtype) * 2 - 1).permute(1, 2, 0)  # (R, n, b)
        A = (B.transpose(1, 2) @ B).double() + eye
        rhs = (B * (x - o.unsqueeze(1)).unsqueeze(-1)).sum(1).double()
        alphas = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1).to(x.dtype)
        alphas = alphas.abs().sort(-1, descending=True).values
        index = nearest_level(x - o.unsqueeze(1), alphas)
        if offset:
            o = (x - _apply(alphas, index)).mean(-1)
    return alphas, index, o


def to_bcq(alphas: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, d_out: int, group_size: int) -> BcqQuantized:
    """The `bcq` representation of per-(row, group) fits: alphas (d_out * n_groups, b), index (same rows, group)."""
    b = alphas.shape[-1]
    n_groups = alphas.shape[0] // d_out
    signs = signs_of(index.reshape(d_out, -1), b)
    return BcqQuantized(signs, alphas.reshape(d_out, n_groups, b).half(), offsets.reshape(d_out, n_groups).half(),
                        group_size)


def solve(W: torch.Tensor, task: LayerTask) -> SolveResult:
    spec = task.spec
    d_out, d_in = W.shape
    gs = d_in if spec.group_size == -1 else spec.group_size
    x = W.reshape(-1, gs)  # one row per (row, group)
    alphas, index, o = fit(x, spec.bits, spec.opt("alternations"), spec.opt("offset"))
    rep = to_bcq(alphas, index, o, d_out, spec.group_size)
    return SolveResult(rep, rep.dequantize())
