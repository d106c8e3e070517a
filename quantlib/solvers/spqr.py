"""SpQR (Dettmers et al. 2023, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight Compression"),
as the QuantEase paper uses it as a baseline: GPTQ's column-by-column error feedback (here the shared LDLQ loop,
`ldlq.ErrorFeedback`) with three additions.

1. Small groups (beta1 = the spec's group size, 16 in SpQR) whose per-row statistics are fitted when the loop reaches
   the group, on the current (error-fed) values of its columns, with SpQR's quantizer: the range [min, max] of each
   row of the group and a real zero point (`minmax_params(tight=True)`). The columns are then rounded by the uniform
   grid's projection, whose rows of statistics are filled in as the groups are fitted.
2. The statistics are themselves quantized (`stat_bits`, 3 in SpQR): each group's vector of d_out scales, and its
   vector of zeros, in groups of beta2 = `stat_group` rows, min-max with a real zero point, and dequantized; the
   second-level scale and zero are rounded to float16 (they are counted as 16-bit values).
3. Unstructured outliers kept in full precision. The unit of SpQR's threshold is mean_k var(w_k) D_k (var over rows
   of column k, D_k the cost of a unit rounding error of column k after feedback: D = diag of H = U D U^T, i.e.
   1 / [chol(H^-1)]_kk^2 in GPTQ's terms), times `outlier_threshold` (0.2). Weight (i, k) is an outlier when its
   rounding error costs more than that, (target_ik - w_hat_ik)^2 D_k > tau; it then keeps its target value (a
   float16 correction on top of its code, stored in the `spqr` format), and the feedback spreads the
   (nearly zero) remaining error. Before fitting a group's statistics, SpQR excludes its likely outliers: a weight
   whose leave-one-out reduction of the group row's error, sum_j D_j (rounding error_j)^2 with the statistics
   refitted without it, exceeds tau is replaced by the mean of the row's other weights in the fit (`loo`; off:
   SpQR's `simplified_outliers`, which is how the QuantEase code calls SpQR).

Groups are contiguous in the original column order (static, as LDLQ's), so act order needs no permutation at
inference; with act order a group's statistics are fitted when its first column in processing order comes up, on
the then-current values of all its columns. SpQR instead forms groups along the permuted order (and stores the
permutation); without act order the two coincide.
"""

from __future__ import annotations

import math

import torch

from quantlib.formats.outliers import SparseOutliers
from quantlib.formats.spqr import QuantizedStatistic, SpqrQuantized
from quantlib.formats.uniform import UniformGrid, UniformProjection, group_index, num_groups
from quantlib.solvers.contract import LayerTask, SolveResult
from quantlib.solvers.grid_init import minmax_params
from quantlib.solvers.loops import ErrorFeedback

# A row of a group whose values are nearly equal and far from 0 gets a tight range of almost no width, so a zero point
# -min/scale of 10^5-10^6 (seen on SmolLM2's layer 16 o_proj at w3g16). Quantized with 15 sane ones in a block of
# `stat_group` rows at 3 bits, it leaves the others a step of 10^5; in float16 it overflows to inf. Such a row takes
# GPTQ's range instead (including 0: a zero point in 0..Qmax), which still covers its values.
ZERO_LIMIT = 1024


def _row_errors(X: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, dk: torch.Tensor) -> torch.Tensor:
    """D-weighted squared rounding errors (d_out, n) of X with each row's statistics fitted to the range [lo, hi]."""
    scale, zero = minmax_params(torch.stack([lo, hi], 1), bits, -1, False, tight=True)
    grid = UniformGrid(scale, zero, bits, -1)
    return (grid.dequantize(grid.quantize(X, scale, zero), scale, zero) - X).square() * dk


def leave_one_out_reduction(X: torch.Tensor, dk: torch.Tensor, bits: int) -> torch.Tensor:
    """(d_out, n): for each weight of a group, how much the row's error sum_j D_j (rounding error_j)^2 falls when
    that weight is left out of the quantization and of the fit of the row's statistics (SpQR's
    get_leave_one_out_error). Leaving a weight out changes the tight range only when it is the row's minimum or
    maximum, so only those two refits are computed."""
    d_out, n = X.shape
    if n < 2:
        raise ValueError("the leave-one-out criterion needs groups of at least 2 columns")
    top, bottom = X.topk(2, dim=1), X.topk(2, dim=1, largest=False)
    (hi1, hi2), (lo1, lo2) = top.values.unbind(1), bottom.values.unbind(1)
    i_max, i_min = top.indices[:, 0], bottom.indices[:, 0]
    base = _row_errors(X, lo1, hi1, bits, dk)
    reduction = base.clone()  # an inner weight: the others keep their errors, its own disappears
    rows = torch.arange(d_out, device=X.device)
    for i, lo, hi in ((i_min, lo2, hi1), (i_max, lo1, hi2)):
        refit = _row_errors(X, lo, hi, bits, dk)
        reduction[rows, i] = base.sum(1) - (refit.sum(1) - refit[rows, i])
    return reduction


def quantize_statistic(v: torch.Tensor, bits: int, rows: int) -> tuple[torch.Tensor, QuantizedStatistic]:
    """SpQR's second level: a (d_out,) statistic quantized min-max (tight range, real zero point) in blocks of
    `rows` consecutive rows (the last block may be shorter). Returns the dequantized values and their storage."""
    out = torch.empty_like(v)
    codes = torch.empty(v.shape[0], dtype=torch.uint8, device=v.device)
    params = []
    n, full = v.shape[0], v.shape[0] // rows * rows
    for r0, r1, size in [(0, full, rows), (full, n, n - full)]:
        if r1 == r0:
            continue
        part = v[r0:r1].reshape(-1, size)
        scale, zero = minmax_params(part, bits, -1, False, tight=True)
        # the second-level statistics are counted as 16-bit values, so they are used as such
        scale, zero = scale.half(), zero.half()
        grid = UniformGrid(scale.to(v.dtype), zero.to(v.dtype), bits, -1)
        q = grid.quantize(part)
        out[r0:r1] = grid.dequantize(q).reshape(-1)
        codes[r0:r1] = q.reshape(-1).to(torch.uint8)
        params.append(torch.cat([scale, zero], 1))
    return out, QuantizedStatistic(codes.unsqueeze(0), torch.cat(params).unsqueeze(0), rows)


def solve(W: torch.Tensor, task: LayerTask) -> SolveResult:
    spec, hess = task.spec, task.hessian
    d_out, d_in = W.shape
    bits, group_size = spec.bits, spec.group_size
    stat_bits, stat_group = spec.opt("stat_bits"), spec.opt("stat_group")
    keep_outliers, loo = spec.opt("keep_outliers"), spec.opt("loo")

    U, D = hess.ldl()
    perm = hess.perm
    D = D.to(W.dtype)
    tau = math.inf
    if keep_outliers:
        tau = spec.opt("outlier_threshold") * float((W[:, perm].var(dim=0) * D).mean())

    # Groups in original column order; each is fitted when its first column in processing order comes up.
    n_groups = num_groups(d_in, group_size)
    position = torch.argsort(perm)
    members = [position[group_index(d_in, group_size) == g] for g in range(n_groups)]
    fit_at = {int(m.min()): g for g, m in enumerate(members)}
    Dk = D.tolist()
    # On W's device, like everything the column loop writes into (a CUDA solve writes with `out=`).
    scale = torch.empty(n_groups, d_out, dtype=W.dtype, device=W.device)  # transposed: one row per group
    zero = torch.empty_like(scale)
    stored = {"scale": [None] * n_groups, "zero": [None] * n_groups}  # quantized statistics, stat_bits < 16
    project = UniformProjection(scale, zero, group_index(d_in, group_size)[perm].tolist(), 2 ** bits - 1, perm)
    # outliers' float16 corrections, in processing order
    corrections = torch.zeros(d_in, d_out, dtype=W.dtype, device=W.device)
    feedback = ErrorFeedback(W, U, perm)

    def fit(g: int) -> None:
        X = feedback.current(members[g]).T  # (d_out, group) current values
        if keep_outliers and loo and X.shape[1] > 1:
            likely = leave_one_out_reduction(X, D[members[g]], bits) > tau
            if likely.any():
                keep = (~likely).to(X.dtype)
                mean = (X * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
                X = torch.where(likely, mean, X)
        s, z = (t[:, 0] for t in minmax_params(X, bits, -1, False, tight=True))
        far = z.abs() > ZERO_LIMIT
        if far.any():  # a nearly constant row far from 0: its grid spans 0 too (see ZERO_LIMIT)
            s[far], z[far] = (t[:, 0] for t in minmax_params(X[far], bits, -1, False))
        if stat_bits < 16:
            s, stored["scale"][g] = quantize_statistic(s, stat_bits, stat_group)
            z, stored["zero"][g] = quantize_statistic(z, stat_bits, stat_group)
        scale[g], zero[g] = s, z

    def round_column(k: int, target: torch.Tensor) -> torch.Tensor:
        if k in fit_at:
            fit(fit_at[k])
        w_hat = project(k, target)
        if keep_outliers:
            delta = target - w_hat
            is_outlier = delta.square() * Dk[k] > tau
            if is_outlier.any():
                corrections[k] = torch.where(is_outlier, delta, 0).half().to(W.dtype)
                w_hat = w_hat + corrections[k]
        return w_hat

    feedback.run(round_column)

    if stat_bits < 16:
        scales, zeros = (QuantizedStatistic(torch.cat([q.codes for q in stored[n]]),
                                            torch.cat([q.params for q in stored[n]]), stat_group)
                         for n in ("scale", "zero"))
    else:
        scales, zeros = scale.T.contiguous(), zero.T.contiguous()
    outliers = None
    if keep_outliers:
        dense = torch.empty(d_out, d_in, dtype=W.dtype, device=W.device)
        dense[:, perm] = corrections.T
        outliers = SparseOutliers.from_dense(dense)
    rep = SpqrQuantized(project.codes(), bits, group_size, stat_bits, stat_group, scales, zeros, outliers)
    stats = {"damp": hess.damp, "dead_columns": hess.dead, "act_order": hess.act_order}
    if keep_outliers:
        stats.update(outlier_tau=tau, outlier_fraction=rep.outlier_fraction)
    return SolveResult(rep, rep.dequantize().to(W.dtype), stats)
