"""Lookup-table solvers (format `lut`): SqueezeLLM and LNQ, the layer-wise methods of GuidedQuant.

SqueezeLLM (Kim et al. 2024): per output row, 1-D k-means of the row's weights into 2^b centres, each weight
weighted by its diagonal Fisher information (the sum over calibration windows of its squared end-loss gradient;
exact zeros weigh 0), k-means++ seeding and Lloyd iterations (flash1dkmeans, seeded).

LNQ (GuidedQuant, Kim et al. 2025, Algorithm 2-4): from SqueezeLLM's codes and tables, minimise the layer objective
tr((W - W_hat) H (W - W_hat)^T) by alternating
- the tables in closed form, per row: (P^T H P + lambda I) c = P^T H w with P the row's one-hot codes, lambda =
  1e-7 mean diag(H) (GuidedQuant uses 1e-7 on its unnormalised H; relative here, so it does not depend on H's
  scale), in float64;
- the codes by the core's coordinate descent with the tables' projection (each coordinate's exact minimiser
  rounded to the nearest entry of its row's table: the exact minimiser over the table), or by LDLQ's error feedback
  (`gptqassign`).
One table update, then `alternations` times (`cd_cycles` sweeps, one table update); the best objective is kept and
the loop stops at the first table update that does not improve it (the released code's early stop, per layer).
With GuidedQuant's objective (`gq`) the runner calls these per block of output rows with that block's Hessian.
"""

from __future__ import annotations

import numpy as np
import torch

from quantlib.formats.lut import LutQuantized
from quantlib.solvers.contract import LayerTask, SolveResult
from quantlib.solvers.loops import CoordinateDescent, ErrorFeedback


def weighted_kmeans(W: torch.Tensor, weights: torch.Tensor, bits: int, iters: int, seed: int):
    """Per row of W: weighted 1-D k-means into 2^b centres. Returns (codes uint8, tables float16)."""
    from flash1dkmeans import kmeans_1d

    d_out, d_in = W.shape
    k = 2 ** bits
    W64, w64 = W.double().cpu().numpy(), weights.double().cpu().numpy()  # k-means runs on the CPU (numpy)
    codes = np.empty((d_out, d_in), dtype=np.uint8)
    tables = np.empty((d_out, k), dtype=np.float64)
    ones = np.ones(d_in)
    for r in range(d_out):
        sw = w64[r]
        if not (sw > 0).any():  # no information for this row: plain k-means
            sw = ones
        centres, labels = kmeans_1d(W64[r], k, max_iter=iters, sample_weights=sw, random_state=seed)
        tables[r, : len(centres)] = centres
        tables[r, len(centres):] = centres[-1] if len(centres) else 0.0
        codes[r] = labels
    return torch.from_numpy(codes).to(W.device), torch.from_numpy(tables).half().to(W.device)


def _start(W: torch.Tensor, task: LayerTask, hdiag: torch.Tensor | None) -> LutQuantized:
    spec = task.spec
    if hdiag is None:
        fisher = task.stat("fisher")
        weights = fisher * (W != 0)
    else:
        weights = hdiag.clamp_min(0).expand_as(W) * (W != 0)
    codes, tables = weighted_kmeans(W, weights, spec.bits, spec.opt("kmeans_iters"), spec.opt("kmeans_seed"))
    return LutQuantized(codes, tables, spec.bits)


def solve_squeezellm(W: torch.Tensor, task: LayerTask) -> SolveResult:
    rep = _start(W, task, None)
    return SolveResult(rep, rep.dequantize())


def objective(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - W_hat).double()
    return float(((D @ H.double()) * D).sum())


def table_update(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """Per row, the table minimising (w - P c)^T H (w - P c) + lambda |c|^2 for the row's fixed codes, in float64
    (an unused entry gets 0)."""
    d_out, d_in = W.shape
    Hd, Wd = H.double(), W.double()
    out = torch.empty(d_out, k, dtype=torch.float64, device=W.device)
    rows = max(1, (1 << 22) // (d_in * k))
    eye = lam * torch.eye(k, dtype=torch.float64, device=W.device)
    for r0 in range(0, d_out, rows):
        r1 = min(r0 + rows, d_out)
        P = torch.zeros(r1 - r0, d_in, k, dtype=torch.float64, device=W.device)
        P.scatter_(2, codes[r0:r1].long().unsqueeze(-1), 1.0)
        HP = torch.matmul(Hd, P)  # H symmetric: (H P)^T w = P^T H w
        A = P.transpose(1, 2) @ HP + eye
        b = (HP * Wd[r0:r1].unsqueeze(-1)).sum(1)
        out[r0:r1] = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    return out


def _finite_half(t: torch.Tensor, layer: str) -> torch.Tensor:
    half = t.to(torch.float16)
    if not torch.isfinite(half).all():
        raise ValueError(f"layer {layer}: a lookup table value is outside float16's range")
    return half


def solve_lnq(W: torch.Tensor, task: LayerTask) -> SolveResult:
    spec, hess = task.spec, task.hessian
    k = 2 ** spec.bits
    hess.ensure_positive_definite()  # LNQ damps only a Hessian that is not positive definite
    H = hess.matrix()
    lam = 1e-7 * float(torch.diagonal(H).mean())
    start = _start(W, task, torch.diagonal(H) if spec.opt("hd_init") else None)
    best = start
    best_f = objective(W, start.dequantize(), H)
    trace = [best_f]
    codes, tables = start.codes, start.tables
    for t in range(spec.opt("alternations") + 1):
        if t > 0:
            codes = _assign(W, H, LutQuantized(codes, tables, spec.bits), hess, spec)
            trace.append(objective(W, LutQuantized(codes, tables, spec.bits).dequantize(), H))
        tables = _finite_half(table_update(W, H, codes, k, lam), task.name)
        current = LutQuantized(codes, tables, spec.bits)
        f = objective(W, current.dequantize(), H)
        trace.append(f)
        if f >= best_f:
            break  # the released code's early stop: keep the best so far
        best, best_f = current, f
    changed = float((best.codes != start.codes).float().mean())
    return SolveResult(best, best.dequantize(), {"lnq_objective": [round(f, 10) for f in trace], "lnq_start": trace[0],
                                                 "lnq_final": best_f, "codes_changed": changed, "damp": hess.damp,
                                                 "dead_columns": hess.dead})


def _assign(W: torch.Tensor, H: torch.Tensor, rep: LutQuantized, hess, spec) -> torch.Tensor:
    """New codes for fixed tables: coordinate descent from the current codes, or LDLQ's feedback (`gptqassign`)."""
    perm = hess.perm
    project = rep.projection(perm)
    if spec.opt("gptq_assign"):
        U, _ = hess.ldl()
        ErrorFeedback(W, U, perm).run(project)
        return project.codes()
    cd = CoordinateDescent(W, rep.dequantize(), H[perm][:, perm], project, perm)
    project.restore(rep.codes.T[perm].long())  # the starting codes, in case no sweep runs
    _, codes, _, _, _ = cd.run(spec.opt("cd_cycles"), relax=False)
    if codes is not None:
        project.restore(codes)
    return project.codes()
