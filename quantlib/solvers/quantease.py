"""QuantEase (Behdin et al., 2023): cyclic coordinate descent on the layer objective f(W_hat) = tr(E H E^T),
E = W - W_hat, with W_hat on the uniform grid.

One coordinate step updates column j of every row at once: with the other columns fixed, f is a convex quadratic in
w_hat_j whose unconstrained minimiser is u = w_hat_j + (E H)_j / H_jj, and the nearest grid point to u (clamped) is
the exact minimiser over the grid. A quantized sweep therefore never increases f once W_hat is on the grid. The
accelerated schedule (Algorithm 2) interleaves relaxed sweeps (w_hat_j = u, no rounding) every third iteration
before the last few; those move W_hat off the grid, so `solve` returns the best quantized iterate (the paper returns
the last; with the schedule below they coincide unless a sweep after a relaxed one ends higher).

Implementation: columns in blocks; at a block start (E H) for the block's columns is one matmul with the current E,
inside a block rank-1 updates, so a sweep costs about one (d_out x d_in x d_in) matmul. f is tracked exactly per
column step (df = 2 delta.(EH)_j + H_jj |delta|^2), so per-iteration objectives cost nothing extra.

Departures from the released code, as algorithms.md 4.3/4.4 records: `gptq_quantease` starts from the LDLQ (= GPTQ)
codes and targets the *original* W (the released code regresses on GPTQ's output and returns GPTQ); the outlier
variant updates W_hat (the released sweep never writes it). H is damped with the common `damp` option (0 gives the
paper's undamped H; damping keeps H_jj > 0 on dead inputs and matches the LDLQ start's objective).
"""

from __future__ import annotations

import torch

from ..hessian import add_damping, fix_dead_columns
from ..init import init_grid
from ..quantizer import ColumnOutliers, OutlierQuantized, SparseOutliers, UniformQuantized
from . import SolveResult
from . import ldlq

BLOCK = 128


def is_relaxed(it: int, iterations: int) -> bool:
    """Algorithm 2's schedule: every third sweep (it = 1, 4, 7, ...) skips rounding, except the last four, so with
    30 iterations the relaxed sweeps are 1, 4, ..., 25 and the final sweep is quantized."""
    return it % 3 == 1 and it < iterations - 4


class CoordinateDescent:
    """State of the coordinate descent in the permuted, transposed layout (column k of W is row k here, so every
    step touches contiguous memory). `target` is what W_hat approximates (W, or W - S with outliers)."""

    def __init__(self, target: torch.Tensor, start: torch.Tensor, H: torch.Tensor, grid, perm: torch.Tensor):
        d_in = target.shape[1]
        self.perm = perm
        self.H = H[perm][:, perm].contiguous()
        self.hdiag = torch.diagonal(self.H).clone()
        self.X = start[:, perm].T.contiguous()  # W_hat^T
        self.E = target[:, perm].T.contiguous() - self.X  # (W_target - W_hat)^T
        self.scale, self.zero = (t.T.contiguous() for t in grid.column_params(d_in, perm))
        self.maxq = grid.maxq
        self.f = self.objective()

    def objective(self) -> float:
        """tr(E H E^T), computed exactly (float64 accumulation)."""
        return float(((self.H @ self.E) * self.E).sum(dtype=torch.float64))

    def sweep(self, quantize: bool) -> float:
        d_in = self.E.shape[0]
        hdiag = self.hdiag.tolist()
        # Row views made once per sweep: per-column indexing is most of the cost of a step on a CPU.
        X, E, scale, zero = self.X.unbind(0), self.E.unbind(0), self.scale.unbind(0), self.zero.unbind(0)
        inv_scale = (1 / self.scale).unbind(0)
        gains = []  # per column: delta . (g + H_jj delta / 2), so df = 2 * gain
        for b0 in range(0, d_in, BLOCK):
            b1 = min(b0 + BLOCK, d_in)
            G = self.H[b0:b1] @ self.E  # rows of (E H)^T for the block's columns, with the current E
            rows, Hb = G.unbind(0), self.H[b0:b1, b0:b1]
            for j in range(b1 - b0):
                k = b0 + j
                g = rows[j]
                u = torch.add(X[k], g, alpha=1 / hdiag[k])
                if quantize:
                    u = torch.addcmul(zero[k], u, inv_scale[k]).round_().clamp_(0, self.maxq).sub_(zero[k]).mul_(scale[k])
                delta = X[k] - u  # change of E_k
                gains.append(torch.dot(delta, torch.add(g, delta, alpha=hdiag[k] / 2)))
                X[k].copy_(u)
                E[k].add_(delta)
                if j + 1 < b1 - b0:
                    G[j + 1:].addr_(Hb[j, j + 1:], delta)  # H symmetric: a contiguous row
        self.f += 2 * float(torch.stack(gains).sum(dtype=torch.float64))
        return self.f

    def codes(self) -> torch.Tensor:
        """Codes (d_out, d_in, original column order) of W_hat, which must be on the grid."""
        q = torch.clamp(torch.round(self.X / self.scale + self.zero), 0, self.maxq)
        out = torch.empty(q.shape[1], q.shape[0], dtype=torch.uint8)
        out[:, self.perm] = q.T.to(torch.uint8)
        return out


def _prepare(H: torch.Tensor, damp: float, act_order: bool):
    H, dead = fix_dead_columns(H)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(H.shape[0])
    return add_damping(H, damp), perm, dead


def run_sweeps(cd: CoordinateDescent, iterations: int, relax: bool, after_sweep=None):
    """`iterations` sweeps; returns (best quantized W_hat^T, its extra state, per-iteration objectives, relaxed its).
    `after_sweep(cd)` (the outlier step) runs after every sweep and returns state to keep with the best iterate."""
    trace, relaxed = [], []
    best, best_f, best_extra = None, float("inf"), None
    for it in range(iterations):
        quantize = not (relax and is_relaxed(it, iterations))
        cd.sweep(quantize)
        extra = after_sweep(cd) if after_sweep else None
        trace.append(cd.f)
        if not quantize:
            relaxed.append(it)
        elif cd.f <= best_f:
            best, best_f, best_extra = cd.X.clone(), cd.f, extra
    return best, best_extra, trace, relaxed


def _stats(trace, relaxed, start_f, damp, dead, act_order, **extra):
    return {"cd_objective": [round(f, 8) for f in trace], "cd_relaxed": relaxed, "cd_start": start_f,
            "cd_final": min(f for i, f in enumerate(trace) if i not in relaxed), "damp": damp, "dead_columns": dead,
            "act_order": act_order, **extra}


def solve(W: torch.Tensor, H: torch.Tensor, spec, layer: str) -> SolveResult:
    """QuantEase from W_hat = W on the grid of `init_grid` (static groups); with `outliers` > 0, Algorithm 3."""
    if spec.opt("outliers") > 0:
        return solve_outliers(W, H, spec, layer)
    if spec.opt("structured"):
        raise ValueError(f"layer {layer}: the 'structured' option needs an outlier fraction (option outliers > 0)")
    damp, act_order = spec.opt("damp"), spec.opt("act_order")
    Hd, perm, dead = _prepare(H, damp, act_order)
    grid = init_grid(W, spec, torch.diagonal(Hd))
    cd = CoordinateDescent(W, W, Hd, grid, perm)
    best, _, trace, relaxed = run_sweeps(cd, spec.opt("iterations"), spec.opt("relax"))
    cd.X = best
    rep = UniformQuantized(cd.codes(), grid)
    return SolveResult(rep, rep.dequantize(), _stats(trace, relaxed, 0.0, damp, dead, act_order))


def solve_gptq(W: torch.Tensor, H: torch.Tensor, spec, layer: str) -> SolveResult:
    """GPTQ + QuantEase: the LDLQ (= GPTQ) solution and grid as the start, then QuantEase sweeps on the original W
    with the same damped H, so the result is never worse than LDLQ's on that objective."""
    start = ldlq.solve(W, H, spec, layer)
    used, act_order = start.stats["damp"], spec.opt("act_order")
    Hd, perm, dead = _prepare(H, used, act_order)
    grid = start.rep.grid
    cd = CoordinateDescent(W, start.weight, Hd, grid, perm)
    start_f = cd.f
    best, _, trace, relaxed = run_sweeps(cd, spec.opt("iterations"), spec.opt("relax"))
    if best is not None and min(trace[i] for i in range(len(trace)) if i not in relaxed) <= start_f:
        cd.X = best
        rep = UniformQuantized(cd.codes(), grid)
    else:
        rep = start.rep
    return SolveResult(rep, rep.dequantize(), _stats(trace, relaxed, start_f, used, dead, act_order))


def _keep_largest(S: torch.Tensor, k: int, structured: bool) -> torch.Tensor:
    """P_k: the k largest |entries| of S (unstructured) or its k rows of largest norm (structured; S is
    transposed here, so a row is an input column); everything else zero."""
    out = torch.zeros_like(S)
    if structured:
        keep = torch.topk(S.norm(dim=1), k).indices
        out[keep] = S[keep]
    else:
        flat = S.reshape(-1)
        keep = torch.topk(flat.abs(), k).indices
        out.view(-1)[keep] = flat[keep]
    return out


def solve_outliers(W: torch.Tensor, H: torch.Tensor, spec, layer: str) -> SolveResult:
    """Outlier-aware QuantEase (Algorithm 3): min over W_hat on the grid and S with at most k nonzeros (or k whole
    input columns) of tr((W - W_hat - S) H (W - W_hat - S)^T). S starts as the largest entries (columns of largest
    norm) of W, the grid is fitted by `init_grid` to W - S (the part it must represent), and each iteration is one
    CD sweep towards W - S followed by an iterative-hard-thresholding step
    S <- P_k(S + alpha / (2 lambda_max(H)) (W - W_hat - S) H)."""
    d_out, d_in = W.shape
    frac, structured = spec.opt("outliers"), spec.opt("structured")
    damp, act_order = spec.opt("damp"), spec.opt("act_order")
    k = round(d_in * frac) if structured else round(d_out * d_in * frac)
    if k < 1:
        raise ValueError(f"layer {layer}: outlier fraction {frac} keeps no weight of a {d_out}x{d_in} matrix")
    Hd, perm, dead = _prepare(H, damp, act_order)
    S = _keep_largest(W[:, perm].T.contiguous(), k, structured)  # transposed, permuted layout
    S0 = torch.empty_like(W)
    S0[:, perm] = S.T
    grid = init_grid(W - S0, spec, torch.diagonal(Hd))
    cd = CoordinateDescent(W - S0, W - S0, Hd, grid, perm)
    step = spec.opt("alpha") / (2 * float(torch.linalg.eigvalsh(cd.H.double()).max()))
    state = {"S": S}

    def hard_threshold(cd: CoordinateDescent):
        old = state["S"]
        new = _keep_largest(old + step * (cd.H @ cd.E), k, structured)
        cd.E -= new - old  # E = W - S - W_hat
        cd.f = cd.objective()
        state["S"] = new
        return new

    best, best_S, trace, relaxed = run_sweeps(cd, spec.opt("iterations"), spec.opt("relax"), hard_threshold)
    cd.X = best
    S_full = torch.empty_like(W)
    S_full[:, perm] = best_S.T
    if structured:
        columns = perm[torch.nonzero(best_S.abs().sum(1)).flatten()]
        outliers = ColumnOutliers.from_dense(S_full, columns)
    else:
        outliers = SparseOutliers.from_dense(S_full)
    rep = OutlierQuantized(UniformQuantized(cd.codes(), grid), outliers)
    return SolveResult(rep, rep.dequantize().to(W.dtype),
                       _stats(trace, relaxed, 0.0, damp, dead, act_order, outlier_fraction=rep.outlier_fraction))
