"""Quantization-parameter initialisation: how (scale, zero) of each (row, group) are chosen before solving.

Every init has the signature `init(W, spec, hdiag) -> UniformGrid`, where `W` is (d_out, d_in) float32 and
`hdiag` is diag(H) after damping (None for data-free runs). The runner resolves the spec's init once and hands it
to the solver (`LayerTask.init_grid`), so every init composes with every solver that takes one.
"""

from __future__ import annotations

import torch

from quantlib.catalog import registry
from quantlib.formats.uniform import UniformGrid, num_groups


def init_grid(W: torch.Tensor, spec, hdiag: torch.Tensor | None) -> UniformGrid:
    """The spec's init looked up and applied once (for scripts and tests; the runner resolves it once per run)."""
    return registry.component("init", spec.init).load()(W, spec, hdiag)


def grouped(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """(d_out, d_in) -> (d_out, n_groups, group) view of the groups of each row."""
    d_out, d_in = W.shape
    return W.reshape(d_out, num_groups(d_in, group_size), -1)


def minmax_params(W: torch.Tensor, bits: int, group_size: int, sym: bool,
                  tight: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's quantizer: range [min(w, 0), max(w, 0)] per group (0 always representable, so the integer zero
    point fits in `bits` bits); symmetric grids centre the zero point. An all-zero group gets the range [-1, 1].
    `tight` is SpQR's quantizer: the range [min(w), max(w)] of the group itself and a real zero point (a constant
    group gets [-1, 1])."""
    maxq = 2 ** bits - 1
    g = grouped(W, group_size)
    xmin, xmax = g.amin(-1), g.amax(-1)
    if not tight:
        zero_t = torch.zeros((), dtype=W.dtype, device=W.device)
        xmin, xmax = torch.minimum(xmin, zero_t), torch.maximum(xmax, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = xmin == xmax
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = -xmin / scale
        zero = zero if tight else torch.round(zero)
    return scale, zero


def minmax_init(W: torch.Tensor, spec, hdiag: torch.Tensor | None = None) -> UniformGrid:
    scale, zero = minmax_params(W, spec.bits, spec.group_size, spec.opt("sym"))
    return UniformGrid(scale, zero, spec.bits, spec.group_size)


def mse_params(W: torch.Tensor, bits: int, group_size: int, sym: bool, norm: float = 2.4, grid: int = 100,
               maxshrink: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's quantizer with its `mse` search (the weight clipping QuaRot and SpinQuant run with, `--w_clip`): per
    (row, group), the min-max range of `minmax_params` shrunk by p = 1 - i / grid, i = 0 .. maxshrink * grid - 1,
    keeping the p whose round-to-nearest error sum |w_hat - w|^norm is smallest (the first on ties, p = 1 included,
    so the result is never worse than min-max in that norm)."""
    scale0, zero0 = minmax_params(W, bits, group_size, sym)
    scales = []
    rows, step = _chunks(W.shape[0], 3 * W.shape[1])
    for r0 in rows:
        w, s0, z0 = W[r0:r0 + step], scale0[r0:r0 + step], zero0[r0:r0 + step]
        # Shrinking the range [xmin, xmax] by p scales the step by p and leaves the zero point round(-xmin / step)
        # where it was (symmetric: fixed), so each candidate is (p * s0, z0), rounded on the grid the solvers use.
        best = (s0, z0, torch.full_like(s0, float("inf")))
        for i in range(int(maxshrink * grid)):
            s = s0 * (1 - i / grid)
            err = grouped(UniformGrid(s, z0, bits, group_size).round(w) - w, group_size).abs_().pow_(norm).sum(-1)
            best = _keep_better(best, (s, z0, err))
        scales.append(best[0])
    return torch.cat(scales), zero0


def mse_init(W: torch.Tensor, spec, hdiag: torch.Tensor | None = None) -> UniformGrid:
    scale, zero = mse_params(W, spec.bits, spec.group_size, spec.opt("sym"), spec.opt("mse_norm"),
                             spec.opt("mse_grid"), spec.opt("mse_maxshrink"))
    return UniformGrid(scale, zero, spec.bits, spec.group_size)


def clip_params(W: torch.Tensor, bits: int, group_size: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped min-max grid of NeUQI's reference (`clip_wo_shift_zp`, the init it pairs with MagR): each group's
    own range [min w, max w] (0 need not be inside it), its step shrunk by beta, s = beta (max - min) / Qmax, and the
    integer zero point that keeps the group's minimum on code 0, so the range is clipped at the top only. A group
    whose step would be below 1e-9 gets step 1, as in the reference."""
    maxq = 2 ** bits - 1
    g = grouped(W, group_size)
    xmin, xmax = g.amin(-1), g.amax(-1)
    scale = (xmax - xmin) / maxq * beta
    scale = torch.where(scale < 1e-9, torch.ones_like(scale), scale)
    return scale, -torch.round(xmin / scale)


def clip_init(W: torch.Tensor, spec, hdiag: torch.Tensor | None = None) -> UniformGrid:
    scale, zero = clip_params(W, spec.bits, spec.group_size, spec.opt("clip_beta"))
    return UniformGrid(scale, zero, spec.bits, spec.group_size)


# ---------------------------------------------------------------------------------------------- NeUQI
# NeUQI (Lin et al. 2025, "NeUQI: Near-Optimal Uniform Quantization Parameter Initialization"): per (row, group) search the scale on a grid of fractions of the min-max step
# s0 = (max - min) / Qmax (the range here does not include 0), and for each candidate scale pick the zero point
# that minimises the diag(H)-weighted rounding error  sum_i h_i (w_i - w_hat_i)^2  (h normalised per group).
# `neuqi` takes the exact optimal real zero point and a coarse-to-fine scale grid; `neuqi_int` takes the best
# integer zero point in 0..Qmax (0 stays representable) on a fine scale grid. Everything is batched over
# (row, group); the loops run over candidate scales only.

_CHUNK_ELEMENTS = 1 << 22  # elements of the largest temporary per chunk of rows (memory, cache)


def group_weights(hdiag: torch.Tensor | None, d_in: int, group_size: int, weighted: bool,
                  dtype=torch.float32, device=None) -> torch.Tensor:
    """(n_groups, group) weights of each group's columns, summing to 1: diag(H) or uniform."""
    n_groups = num_groups(d_in, group_size)
    if weighted:
        if hdiag is None:
            raise ValueError("a diag(H)-weighted init needs the Hessian diagonal")
        h = hdiag.to(dtype).reshape(n_groups, -1).clamp_min(0)
    else:
        h = torch.ones(n_groups, d_in // n_groups, dtype=dtype, device=device)
    total = h.sum(-1, keepdim=True)
    # A group without any calibration signal falls back to uniform weights.
    return torch.where(total > 0, h / total.clamp_min(torch.finfo(dtype).tiny), 1.0 / h.shape[-1])


def weighted_error(W: torch.Tensor, grid: UniformGrid, h: torch.Tensor) -> torch.Tensor:
    """The init objective per (row, group): sum_i h_i (w_i - w_hat_i)^2 with h from `group_weights`."""
    d = grouped(W - grid.round(W), grid.group_size)
    return (d * d * h).sum(-1)


def _neuqi_range(g: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, s0) per (row, group); a constant group gets s0 = 1 as in the reference."""
    lo = g.amin(-1)
    s0 = (g.amax(-1) - lo) / maxq
    return lo, torch.where(s0 < 1e-9, torch.ones_like(s0), s0)


def _merge_order(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The permutation that stably sorts cat([a, b], -1) when a and b are each sorted along the last dimension:
    two binary searches instead of a sort (ties: a's elements first, as a stable sort of the concatenation)."""
    n_a, n_b = a.shape[-1], b.shape[-1]
    rank = torch.cat([torch.arange(n_a, device=a.device) + torch.searchsorted(b, a, side="left"),
                      torch.arange(n_b, device=a.device) + torch.searchsorted(a, b, side="right")], -1)
    order = torch.empty_like(rank)
    return order.scatter_(-1, rank, torch.arange(n_a + n_b, device=a.device).expand_as(rank))


def _surrogate_zero(x: torch.Tensor, h: torch.Tensor, maxq: int) -> torch.Tensor:
    """Stage 1: the minimiser of a convex piecewise-quadratic upper bound of the loss in zeta (an element costs its
    exact clipping error when clipped and the worst rounding error 1/4 otherwise). x: (R, G, n) sorted ascending,
    h: its weights in the same order."""
    P = maxq + 1
    c = x - maxq  # the error of a right-clipped element is c - zeta
    h = h.expand_as(x)
    hc = h * c
    # At zeta = -inf every element is right-clipped: cost sum h (c - zeta)^2 = a0 zeta^2 - 2 a1 zeta + a2.
    a0 = h.sum(-1, keepdim=True)
    a1 = hc.sum(-1, keepdim=True)
    a2 = (hc * c).sum(-1, keepdim=True)
    # Breakpoints right-clipped -> middle at x - P + 1/2 and middle -> left-clipped at x + 1/2: two sorted lists.
    right, left = x - P + 0.5, x + 0.5
    order = _merge_order(right, left)
    pos = torch.cat([right, left], -1).gather(-1, order)
    d0 = torch.cat([-h, h], -1)
    d1 = torch.cat([-hc, h * x], -1)
    d2 = torch.cat([0.25 * h - hc * c, h * x * x - 0.25 * h], -1)
    A0 = torch.cat([a0, a0 + d0.gather(-1, order).cumsum(-1)], -1)
    A1 = torch.cat([a1, a1 + d1.gather(-1, order).cumsum(-1)], -1)
    A2 = torch.cat([a2, a2 + d2.gather(-1, order).cumsum(-1)], -1)
    inf = torch.full_like(a0, float("inf"))
    lo = torch.cat([-inf, pos], -1)
    hi = torch.cat([pos, inf], -1)
    flat = A0 <= 1e-12  # every element in its middle piece: any point of the interval
    v = torch.where(flat, torch.where(torch.isfinite(lo), lo, hi), A1 / torch.where(flat, 1.0, A0))
    v = torch.minimum(torch.maximum(v, lo), hi)
    cost = A0 * v * v - 2 * A1 * v + A2
    return v.gather(-1, cost.argmin(-1, keepdim=True)).squeeze(-1)


def _exact_zero(x: torch.Tensor, h: torch.Tensor, maxq: int, start: torch.Tensor) -> torch.Tensor:
    """Stage 2: the exact minimiser of sum_i h_i (x_i - zeta - clamp(round(x_i - zeta), 0, Qmax))^2 over
    zeta in [start, start + 2]. In that window each code drops at most twice; between drops the loss is
    (zeta - A1)^2 + A2 - A1^2 with A1, A2 the weighted moments of the residuals x - q (sum h = 1)."""
    h = h.expand_as(x)
    zl = start.unsqueeze(-1)
    zr = zl + 2
    q = torch.clamp(torch.floor(x + 0.5 - zl), 0, maxq)
    r = x - q
    A1 = (h * r).sum(-1, keepdim=True)
    A2 = (h * r * r).sum(-1, keepdim=True)
    p = torch.maximum(r + 0.5, zl)  # q -> q - 1 here, and q - 1 -> q - 2 at p + 1
    # Sort the first drops once; the second drops are the same list shifted by 1. Drops that cannot happen in the
    # window keep their place with zero weight (an extra breakpoint that changes nothing).
    p, by_p = p.sort(dim=-1, stable=True)
    q, r, h = q.gather(-1, by_p), r.gather(-1, by_p), h.gather(-1, by_p)
    ok1 = ((q >= 1) & (p <= zr)).to(x.dtype)
    ok2 = ((q >= 2) & (p + 1 <= zr)).to(x.dtype)
    order = _merge_order(p, p + 1)
    pos = torch.cat([p, p + 1], -1).gather(-1, order)
    d1 = torch.cat([h * ok1, h * ok2], -1)
    d2 = torch.cat([h * (2 * r + 1) * ok1, h * (2 * r + 3) * ok2], -1)
    B1 = torch.cat([A1, A1 + d1.gather(-1, order).cumsum(-1)], -1)
    B2 = torch.cat([A2, A2 + d2.gather(-1, order).cumsum(-1)], -1)
    edges = torch.minimum(pos, zr)
    lo = torch.cat([zl, edges], -1)
    hi = torch.cat([edges, zr], -1)
    v = torch.minimum(torch.maximum(B1, lo), hi)
    cost = (v - B1) ** 2 + B2 - B1 * B1
    return v.gather(-1, cost.argmin(-1, keepdim=True)).squeeze(-1)


def optimal_zero(x: torch.Tensor, h: torch.Tensor, maxq: int) -> torch.Tensor:
    """The real zeta minimising sum_i h_i (x_i - zeta - clamp(round(x_i - zeta), 0, Qmax))^2 per (row, group)
    (NeUQI's two-stage solver). x: (R, G, n) weights in units of the scale; h: (G, n), each row summing to 1."""
    x, order = x.sort(-1)  # the loss does not depend on the order of the elements
    return _optimal_zero_sorted(x, h.expand_as(x).gather(-1, order), maxq)


def _optimal_zero_sorted(x: torch.Tensor, h: torch.Tensor, maxq: int) -> torch.Tensor:
    """`optimal_zero` for groups already sorted ascending, h in the same order."""
    shift = x[..., :1]  # the loss is shift-invariant; centring keeps the prefix sums accurate
    x = x - shift
    zeta = _exact_zero(x, h, maxq, _surrogate_zero(x, h, maxq) - 1)
    return zeta + shift.squeeze(-1)


def _loss(g: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The objective of (scale, zero) per (row, group), g: (R, G, n)."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    e = g - s * (torch.clamp(torch.round(g / s + z), 0, maxq) - z)
    return (e * e * h).sum(-1)


def _best_real_zero(g_sorted, h_sorted, scale, maxq):
    """(zero, loss) with the optimal real zero point for the given scales; zero = -zeta. Groups sorted ascending,
    h in the same order."""
    zero = -_optimal_zero_sorted(g_sorted / scale.unsqueeze(-1), h_sorted, maxq)
    return zero, _loss(g_sorted, h_sorted, scale, zero, maxq)


class _IntZeroSearch:
    """The best integer zero point in 0..Qmax for a given scale, per (row, group), from prefix sums over each group
    sorted ascending. With an integer zero z, round(x + z) = round(x) + z, so only the clipped elements (a prefix
    and a suffix of the sorted group) differ from plain rounding; the prefix sums of h, h*w and h*w^2 do not depend
    on the scale and are formed once, leaving one prefix sum (of the rounding errors) per candidate scale.
    g_sorted: (R, G, n) ascending; h_sorted: h in the same order."""

    def __init__(self, g_sorted: torch.Tensor, h_sorted: torch.Tensor, maxq: int):
        self.g, self.h, self.maxq = g_sorted, h_sorted, maxq
        lead, n = g_sorted.shape[:-1], g_sorted.shape[-1]
        # (3, R, G, n + 1): prefix sums of h, h*w, h*w^2, each starting at 0.
        terms = torch.stack([h_sorted, h_sorted * g_sorted, h_sorted * g_sorted * g_sorted])
        self.static = g_sorted.new_zeros(3, *lead, n + 1)
        torch.cumsum(terms, -1, out=self.static[..., 1:])
        self.Cf = g_sorted.new_zeros(*lead, n + 1)  # prefix sums of h * (rounding error)^2, per candidate
        self.zeros = torch.arange(maxq + 1, dtype=g_sorted.dtype, device=g_sorted.device)
        # Clipping thresholds on round(x) for each zero point: left-clipped when round(x) + z < 0, right-clipped
        # when round(x) + z > Qmax. round(x) is non-decreasing along a sorted group, so both sets are counted by
        # binary search: the first Qmax + 1 counts are the left-clipped prefixes, the rest the unclipped-or-left.
        self.thresholds = torch.cat([-self.zeros - 0.5, maxq - self.zeros + 0.5]).expand(*lead, -1).contiguous()

    def __call__(self, scale: torch.Tensor):
        s = scale.unsqueeze(-1)
        x = self.g / s
        k = torch.round(x)
        f = x - k
        torch.cumsum(self.h * f * f, -1, out=self.Cf[..., 1:])
        idx = torch.searchsorted(k, self.thresholds)
        c0, c1, c2 = self.static.gather(-1, idx.expand(3, *idx.shape))
        cf = self.Cf.gather(-1, idx)
        t0, t1, t2 = self.static[..., -1:]
        tf = self.Cf[..., -1:]
        c1, t1 = c1 / s, t1 / s  # sums of h*x = h*w/s and h*x^2 = h*w^2/s^2
        c2, t2 = c2 / (s * s), t2 / (s * s)
        P = self.maxq + 1
        z, u = self.zeros, self.zeros - self.maxq
        left = c2[..., :P] + 2 * z * c1[..., :P] + z * z * c0[..., :P] - cf[..., :P]
        right = ((t2 - c2[..., P:]) + 2 * u * (t1 - c1[..., P:]) + u * u * (t0 - c0[..., P:])
                 - (tf - cf[..., P:]))
        loss = (tf + left + right) * (s * s)
        best, idx = loss.min(-1)
        return self.zeros[idx], best


def _keep_better(best, cand):
    """Per (row, group), keep the candidate (scale, zero, loss) where it strictly improves."""
    better = cand[2] < best[2]
    return tuple(torch.where(better, c, b) for b, c in zip(best, cand))


def _chunks(d_out: int, per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    return range(0, d_out, step), step


def neuqi_init(W: torch.Tensor, spec, hdiag: torch.Tensor | None = None) -> UniformGrid:
    """NeUQI (the reference's grid2_s_best_zp): coarse scales s0*t/Tm (t = 1..Tm), then a fine pass of
    +-half a coarse step in steps s0/T around the best, each with its optimal real zero point."""
    maxq = 2 ** spec.bits - 1
    coarse, fine = spec.opt("grid_coarse"), spec.opt("grid")  # fine % coarse == 0: checked by the catalog
    h = group_weights(hdiag, W.shape[1], spec.group_size, spec.opt("hdiag_weight"), W.dtype, W.device)
    G = grouped(W, spec.group_size)
    scales, zeros = [], []
    rows, step = _chunks(G.shape[0], 4 * G.shape[1] * G.shape[2])
    for r0 in rows:
        # Sorted once: each candidate scale's breakpoints then come in this order (see _surrogate_zero).
        g, order = G[r0:r0 + step].sort(-1)
        h_sorted = h.expand_as(g).gather(-1, order)
        _, s0 = _neuqi_range(g, maxq)
        best = (s0, torch.zeros_like(s0), torch.full_like(s0, float("inf")))
        for t in range(1, coarse + 1):
            s = s0 * (t / coarse)
            best = _keep_better(best, (s, *_best_real_zero(g, h_sorted, s, maxq)))
        centre = best[0]
        half = fine // coarse // 2
        for j in range(-half, half + 1):
            if j:
                s = (centre + s0 * (j / fine)).clamp_min(s0 * (1 / fine))
                best = _keep_better(best, (s, *_best_real_zero(g, h_sorted, s, maxq)))
        scales.append(best[0])
        zeros.append(best[1])
    return UniformGrid(torch.cat(scales), torch.cat(zeros), spec.bits, spec.group_size)


def neuqi_int_init(W: torch.Tensor, spec, hdiag: torch.Tensor | None = None) -> UniformGrid:
    """NeUQI_int (the reference's grid_s_zp): scales s0*t/T, t = 1..T, each with its best integer zero point in
    0..Qmax."""
    maxq = 2 ** spec.bits - 1
    steps = spec.opt("grid")
    h = group_weights(hdiag, W.shape[1], spec.group_size, spec.opt("hdiag_weight"), torch.float64, W.device)
    G = grouped(W, spec.group_size)
    scales, zeros = [], []
    rows, step = _chunks(G.shape[0], 6 * G.shape[1] * G.shape[2])
    for r0 in rows:
        # float64: the prefix sums subtract large, nearly equal moments of the clipped elements.
        g, order = G[r0:r0 + step].double().sort(-1)
        search = _IntZeroSearch(g, h.expand_as(g).gather(-1, order), maxq)
        _, s0 = _neuqi_range(g, maxq)
        best = (s0, torch.zeros_like(s0), torch.full_like(s0, float("inf")))
        for t in range(1, steps + 1):
            s = s0 * (t / steps)
            best = _keep_better(best, (s, *search(s)))
        scales.append(best[0].to(W.dtype))
        zeros.append(best[1].to(W.dtype))
    return UniformGrid(torch.cat(scales), torch.cat(zeros), spec.bits, spec.group_size)
