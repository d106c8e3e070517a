"""QuantEase (Behdin et al., 2023): cyclic coordinate descent on the layer objective f(W_hat) = tr(E H E^T),
E = W - W_hat, with W_hat on the spec's grid. The loop is the core's `CoordinateDescent` (quantlib.solvers.loops) with the
grid's projection; the accelerated schedule (Algorithm 2) interleaves relaxed sweeps, so `solve` returns the best
quantized iterate.

Departures from the released code (docs/methods.md, "QuantEase and outliers"): `gptq_quantease` starts from the LDLQ (= GPTQ)
codes and targets the *original* W (the released code regresses on GPTQ's output and returns GPTQ); the outlier
variant updates W_hat (the released sweep never writes it). H is damped with the common `damp` option (0 gives the
paper's undamped H; damping keeps H_jj > 0 on dead inputs and matches the LDLQ start's objective).
"""

from __future__ import annotations

import torch

from quantlib.formats.outliers import ColumnOutliers, OutlierQuantized, SparseOutliers
from quantlib.formats.uniform import UniformQuantized
from quantlib.solvers import ldlq
from quantlib.solvers.contract import LayerTask, SolveResult
from quantlib.solvers.loops import CoordinateDescent


def _stats(trace, relaxed, start_f, hess, **extra):
    return {"cd_objective": [round(f, 8) for f in trace], "cd_relaxed": relaxed, "cd_start": start_f,
            "cd_final": min(f for i, f in enumerate(trace) if i not in relaxed), "damp": hess.damp,
            "dead_columns": hess.dead, "act_order": hess.act_order, **extra}


def solve(W: torch.Tensor, task: LayerTask) -> SolveResult:
    """QuantEase from W_hat = W on the init's grid (static groups); with `outliers` > 0, Algorithm 3."""
    spec, hess = task.spec, task.hessian
    if spec.opt("outliers") > 0:
        return solve_outliers(W, task)
    grid = task.init_grid(W)
    cd = CoordinateDescent(W, W, hess.permuted(), grid.projection(hess.perm, W.dtype), hess.perm)
    _, codes, _, trace, relaxed = cd.run(spec.opt("iterations"), spec.opt("relax"))
    cd.project.restore(codes)
    rep = UniformQuantized(cd.project.codes(), grid)
    return SolveResult(rep, rep.dequantize(), _stats(trace, relaxed, 0.0, hess))


def solve_gptq(W: torch.Tensor, task: LayerTask) -> SolveResult:
    """GPTQ + QuantEase: the LDLQ (= GPTQ) solution and grid as the start, then QuantEase sweeps on the original W
    with the same damped H, so the result is never worse than LDLQ's on that objective."""
    spec, hess = task.spec, task.hessian
    start = ldlq.solve(W, task)
    grid = start.rep.grid
    cd = CoordinateDescent(W, start.weight, hess.permuted(), grid.projection(hess.perm, W.dtype), hess.perm)
    start_f = cd.f
    best, codes, _, trace, relaxed = cd.run(spec.opt("iterations"), spec.opt("relax"))
    if best is not None and min(trace[i] for i in range(len(trace)) if i not in relaxed) <= start_f:
        cd.project.restore(codes)
        rep = UniformQuantized(cd.project.codes(), grid)
    else:
        rep = start.rep
    return SolveResult(rep, rep.dequantize(), _stats(trace, relaxed, start_f, hess))


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


def solve_outliers(W: torch.Tensor, task: LayerTask) -> SolveResult:
    """Outlier-aware QuantEase (Algorithm 3): min over W_hat on the grid and S with at most k nonzeros (or k whole
    input columns) of tr((W - W_hat - S) H (W - W_hat - S)^T). S starts as the largest entries (columns of largest
    norm) of W, the grid is fitted by `init_grid` to W - S (the part it must represent), and each iteration is one
    CD sweep towards W - S followed by an iterative-hard-thresholding step
    S <- P_k(S + alpha / (2 lambda_max(H)) (W - W_hat - S) H)."""
    spec, hess = task.spec, task.hessian
    d_out, d_in = W.shape
    frac, structured = spec.opt("outliers"), spec.opt("structured")
    k = round(d_in * frac) if structured else round(d_out * d_in * frac)
    if k < 1:
        raise ValueError(f"layer {task.name}: outlier fraction {frac} keeps no weight of a {d_out}x{d_in} matrix")
    perm = hess.perm
    S = _keep_largest(W[:, perm].T.contiguous(), k, structured)  # transposed, permuted layout
    S0 = torch.empty_like(W)
    S0[:, perm] = S.T
    grid = task.init_grid(W - S0)
    cd = CoordinateDescent(W - S0, W - S0, hess.permuted(), grid.projection(perm, W.dtype), perm)
    step = spec.opt("outlier_step") / (2 * float(torch.linalg.eigvalsh(cd.H.double()).max()))
    state = {"S": S}

    def hard_threshold(cd: CoordinateDescent):
        old = state["S"]
        new = _keep_largest(old + step * (cd.H @ cd.E), k, structured)
        cd.E -= new - old  # E = W - S - W_hat
        cd.f = cd.objective()
        state["S"] = new
        return new

    _, codes, best_S, trace, relaxed = cd.run(spec.opt("iterations"), spec.opt("relax"), hard_threshold)
    cd.project.restore(codes)
    S_full = torch.empty_like(W)
    S_full[:, perm] = best_S.T
    if structured:
        columns = perm[torch.nonzero(best_S.abs().sum(1)).flatten()]
        outliers = ColumnOutliers.from_dense(S_full, columns)
    else:
        outliers = SparseOutliers.from_dense(S_full)
    rep = OutlierQuantized(UniformQuantized(cd.project.codes(), grid), outliers)
    return SolveResult(rep, rep.dequantize().to(W.dtype),
                       _stats(trace, relaxed, 0.0, hess, outlier_fraction=rep.outlier_fraction))
