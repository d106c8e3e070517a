"""SpQR (Dettmers et al. 2023, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight Compression"),
as the QuantEase paper uses it as a baseline: GPTQ's column-by-column error feedback (here the shared LDLQ loop,
`ldlq.ErrorFeedback`) with three additions.

1. Small groups (beta1 = the spec's group size, 16 in SpQR) whose per-row statistics are fitted when the loop reaches
   the group, on the current (error-fed) values of its columns, with SpQR's quantizer: the range [min, max] of each
   row of the group and a real zero point (`minmax_params(tight=True)`).
2. The statistics are themselves quantized (`stat_bits`, 3 in SpQR): each group's vector of d_out scales, and its
   vector of zeros, in groups of beta2 = `stat_group` rows, min-max with a real zero point, and dequantized; the
   second-level scale and zero are rounded to float16 (they are counted as 16-bit values).
3. Unstructured outliers kept in full precision. The unit of SpQR's threshold is mean_k var(w_k) D_k (var over rows
   of column k, D_k the cost of a unit rounding error of column k after feedback: D = diag of H = U D U^T, i.e.
   1 / [chol(H^-1)]_kk^2 in GPTQ's terms), times `outlier_threshold` (0.2). Weight (i, k) is an outlier when its
   rounding error costs more than that, (target_ik - w_hat_ik)^2 D_k > tau; it then keeps its target value (a
   float16 correction on top of its code, in the shared `uniform_outliers` format), and the feedback spreads the
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

from ..errors import ConfigError
from ..hessian import fix_dead_columns
from ..init import minmax_params
from ..quantizer import OutlierQuantized, SparseOutliers, UniformGrid, UniformQuantized, group_index, num_groups
from . import SolveResult
from .ldlq import ErrorFeedback, ldl_factor

STAT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)  # 16: the statistics are not quantized


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
    rows = torch.arange(d_out)
    for i, lo, hi in ((i_min, lo2, hi1), (i_max, lo1, hi2)):
        refit = _row_errors(X, lo, hi, bits, dk)
        reduction[rows, i] = base.sum(1) - (refit.sum(1) - refit[rows, i])
    return reduction


def quantize_statistic(v: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """SpQR's second level: a (d_out,) statistic quantized min-max (tight range, real zero point) in groups of
    `rows` consecutive rows (the last group may be shorter), dequantized."""
    out = torch.empty_like(v)
    n, full = v.shape[0], v.shape[0] // rows * rows
    for r0, r1, size in [(0, full, rows), (full, n, n - full)]:
        if r1 == r0:
            continue
        part = v[r0:r1].reshape(-1, size)
        scale, zero = minmax_params(part, bits, -1, False, tight=True)
        # the second-level statistics are counted as 16-bit values, so they are used as such
        grid = UniformGrid(scale.half().to(v.dtype), zero.half().to(v.dtype), bits, -1)
        out[r0:r1] = grid.round(part).reshape(-1)
    return out


def _check(spec, layer: str):
    if spec.opt("sym"):
        raise ConfigError(f"layer {layer}: spqr fits asymmetric statistics (SpQR's default); drop the 'sym' option")
    if spec.opt("stat_bits") not in STAT_BITS:
        raise ConfigError(f"layer {layer}: stat_bits must be one of {list(STAT_BITS)} (16: unquantized statistics), "
                          f"got {spec.opt('stat_bits')}")
    if spec.opt("stat_group") < 1:
        raise ConfigError(f"layer {layer}: stat_group must be a positive number of rows, got {spec.opt('stat_group')}")
    threshold = spec.opt("outlier_threshold")
    if spec.opt("keep_outliers") and not (0 < threshold < math.inf):
        raise ConfigError(f"layer {layer}: outlier_threshold must be a positive finite number, got {threshold}; "
                          "for no outliers set keep_outliers: false")


def solve(W: torch.Tensor, H: torch.Tensor, spec, layer: str) -> SolveResult:
    _check(spec, layer)
    d_out, d_in = W.shape
    bits, group_size = spec.bits, spec.group_size
    stat_bits, stat_group = spec.opt("stat_bits"), spec.opt("stat_group")
    keep_outliers, loo = spec.opt("keep_outliers"), spec.opt("loo")
    maxq = 2 ** bits - 1

    H, dead = fix_dead_columns(H)
    act_order = spec.opt("act_order")
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(d_in)
    U, D, used = ldl_factor(H[perm][:, perm], spec.opt("damp"), layer)
    D = D.to(W.dtype)
    tau = math.inf
    if keep_outliers:
        tau = spec.opt("outlier_threshold") * float((W[:, perm].var(dim=0) * D).mean())

    # Groups in original column order; each is fitted when its first column in processing order comes up.
    n_groups = num_groups(d_in, group_size)
    group_of_position = group_index(d_in, group_size)[perm]
    position = torch.argsort(perm)
    members = [position[group_index(d_in, group_size) == g] for g in range(n_groups)]
    fit_at = {int(m.min()): g for g, m in enumerate(members)}
    group_of = group_of_position.tolist()
    Dk = D.tolist()
    scale = torch.empty(n_groups, d_out, dtype=W.dtype)  # transposed: one contiguous row per group
    zero = torch.empty_like(scale)
    codes = torch.empty(d_in, d_out, dtype=W.dtype)
    corrections = torch.zeros(d_in, d_out, dtype=W.dtype)  # outliers' float16 corrections, processing order
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
        if stat_bits < 16:
            s, z = quantize_statistic(s, stat_bits, stat_group), quantize_statistic(z, stat_bits, stat_group)
        scale[g], zero[g] = s, z

    def round_column(k: int, target: torch.Tensor) -> torch.Tensor:
        if k in fit_at:
            fit(fit_at[k])
        s, z = scale[group_of[k]], zero[group_of[k]]
        q = torch.clamp(torch.round(target / s + z), 0, maxq)
        codes[k] = q
        w_hat = s * (q - z)
        if keep_outliers:
            delta = target - w_hat
            is_outlier = delta.square() * Dk[k] > tau
            if is_outlier.any():
                corrections[k] = torch.where(is_outlier, delta, 0).half().to(W.dtype)
                w_hat = w_hat + corrections[k]
        return w_hat

    feedback.run(round_column)

    def original_order(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(d_out, d_in, dtype=t.dtype)
        out[:, perm] = t.T
        return out

    grid = UniformGrid(scale.T.contiguous(), zero.T.contiguous(), bits, group_size,
                       stat_bits, stat_group if stat_bits < 16 else 0)
    rep = UniformQuantized(original_order(codes).to(torch.uint8), grid)
    stats = {"damp": used, "dead_columns": dead, "act_order": act_order}
    if keep_outliers:
        rep = OutlierQuantized(rep, SparseOutliers.from_dense(original_order(corrections)))
        stats.update(outlier_tau=tau, outlier_fraction=rep.outlier_fraction)
    return SolveResult(rep, rep.dequantize().to(W.dtype), stats)
