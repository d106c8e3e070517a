"""Methods on the uniform grid: the parameter inits (min-max; NeUQI's), MagR, RTN, LDLQ (GPTQ), QuantEase, SpQR and
LSQ (block-wise)."""

from __future__ import annotations

import math

from quantlib.catalog.contract import SYM, block_training
from quantlib.catalog.names import Option
from quantlib.catalog.registry import Component, register
from quantlib.errors import ConfigError

register(Component(
    "minmax", "init", "quantlib.solvers.grid_init:minmax_init", "min-max", options=(SYM,),
    help="scale and integer zero point from the range of each group, 0 always inside the range (GPTQ's quantizer)",
))

register(Component(
    "rtn", "solver", "quantlib.solvers.rtn:solve", "RTN", mode="data_free",
    help="round to nearest on the initialised grid",
))

_ACT_ORDER = Option("act_order", True, bool, "noreorder",
                    "process columns by decreasing diag(H) (GPTQ's act order, NeUQI's H reorder); groups stay static")

register(Component(
    "ldlq", "solver", "quantlib.solvers.ldlq:solve", "LDLQ", needs=("hessian",), takes_guided=True,
    options=(_ACT_ORDER,),
    help="GPTQ-equivalent error feedback through the LDL factorisation of H",
))


# NeUQI's inits (NeUQI, Lin et al. 2025, section 3). Both weight each group's error by diag(H) unless told not to,
# so they need the Hessian even under RTN. Defaults are the released code's (64 coarse, 2048 fine scale steps).
_HDIAG_WEIGHT = Option("hdiag_weight", True, bool, "unweighted",
                       "weight each column's error by diag(H), normalised per group (the reference's "
                       "--enable_H_diag_weight); off: uniform weights")
_GRID = Option("grid", 2048, int, "grid", "number of fine scale steps T: candidate scales are multiples of s0/T")


def _check_neuqi(spec) -> None:
    fine, coarse = spec.opt("grid"), spec.opt("grid_coarse")
    if coarse < 1 or fine < 1:
        raise ConfigError(f"neuqi: grid ({fine}) and grid_coarse ({coarse}) must be positive")
    if fine % coarse:
        raise ConfigError(f"neuqi: grid ({fine}) must be a multiple of grid_coarse ({coarse})")


def _check_neuqi_int(spec) -> None:
    if spec.opt("grid") < 1:
        raise ConfigError(f"neuqi_int: grid must be positive, got {spec.opt('grid')}")


register(Component(
    "neuqi", "init", "quantlib.solvers.grid_init:neuqi_init", "NeUQI", needs=("hessian",),
    options=(_HDIAG_WEIGHT, _GRID,
             Option("grid_coarse", 64, int, "coarse", "coarse scale steps Tm of the coarse-to-fine search")),
    check=_check_neuqi,
    help="coarse-to-fine scale search with the optimal real zero point per scale (reference: grid2_s_best_zp)",
))

register(Component(
    "neuqi_int", "init", "quantlib.solvers.grid_init:neuqi_int_init", "NeUQI_int", needs=("hessian",),
    options=(_HDIAG_WEIGHT, _GRID), check=_check_neuqi_int,
    help="scale search on T steps with the best integer zero point in 0..Qmax per scale (reference: grid_s_zp)",
))


def _check_mse(spec) -> None:
    if spec.opt("mse_norm") <= 0 or spec.opt("mse_grid") < 1 or not 0 < spec.opt("mse_maxshrink") < 1:
        raise ConfigError("mse: mse_norm must be > 0, mse_grid >= 1 and mse_maxshrink in (0, 1)")


register(Component(
    "mse", "init", "quantlib.solvers.grid_init:mse_init", "min-max with MSE clipping", options=(
        SYM,
        # GPTQ's quantizer defaults, as QuaRot's and SpinQuant's `--w_clip` run it.
        Option("mse_norm", 2.4, float, "mnorm", "exponent p of the clipping search's error sum |w_hat - w|^p"),
        Option("mse_grid", 100, int, "mgrid", "the range is shrunk in steps of 1 / mse_grid"),
        Option("mse_maxshrink", 0.8, float, "mshrink", "the largest shrink of the range searched (to 1 - it)"),
    ),
    check=_check_mse,
    help="GPTQ's quantizer with its MSE clipping search (QuaRot's and SpinQuant's weight clipping, --w_clip): per "
         "(row, group) the min-max range shrunk by the factor, of 1, 0.99, ..., 0.21, whose rounding error sum "
         "|w_hat - w|^2.4 is smallest",
))


def clip_beta_default(bits: int, group_size: int) -> float:
    """The clipping factor NeUQI's reference gives MagR's init: 0.8 at 2 bits, 0.9 at 3, none (1) from 4 bits; with
    groups of 128 columns 0.95 and of 64 none, whatever the bits."""
    if group_size == 128:
        return 0.95
    if group_size == 64 or bits >= 4:
        return 1.0
    return 0.8 if bits == 2 else 0.9


def _check_clip(spec) -> None:
    if not 0 < spec.opt("clip_beta") <= 1:
        raise ConfigError(f"clip: clip_beta shrinks the min-max step, a factor in (0, 1], got {spec.opt('clip_beta')}")


register(Component(
    "clip", "init", "quantlib.solvers.grid_init:clip_init", "clipped min-max",
    options=(
        # Defaults as the reference sets them with MagR, by bits and group size (grid_init.clip_beta_default).
        Option("clip_beta", lambda spec: clip_beta_default(spec.bits, spec.group_size), float, "beta",
               "factor of the min-max step: the group's range is clipped at the top to beta of its width"),
    ),
    check=_check_clip,
    help="each group's own range with its step shrunk by beta and the minimum kept on code 0, clipping only the top "
         "(NeUQI's reference init after MagR, clip_wo_shift_zp)",
))


def _check_magr(spec) -> None:
    if spec.opt("magr_alpha") <= 0 or spec.opt("magr_iters") < 1:
        raise ConfigError("magr: magr_alpha must be > 0 and magr_iters >= 1")


register(Component(
    "magr", "preprocess", "quantlib.solvers.preprocess:magr", "MagR", needs=("hessian",),
    options=(
        # The reference's enable_magr_only defaults: 1e-3 per channel, 1e-4 with groups.
        Option("magr_alpha", lambda spec: 1e-3 if spec.group_size == -1 else 1e-4, float, "malpha",
               "weight of MagR's l-infinity penalty per (row, group)"),
        Option("magr_iters", 150, int, "iters", "MagR's proximal gradient iterations"),
    ),
    check=_check_magr,
    help="weight magnitude reduction: proximal gradient on the layer output error plus an l-infinity penalty",
))

_QUANTEASE_CORE = (
    _ACT_ORDER,
    Option("iterations", 30, int, "it", "coordinate-descent sweeps over all columns (the paper's num_iter)"),
    Option("relax", True, bool, "norelax",
           "accelerated schedule (Algorithm 2): every third sweep before the last four is left unrounded"),
)


def _check_quantease(spec) -> None:
    if spec.opt("iterations") < 1:
        raise ConfigError(f"{spec.solver}: iterations must be >= 1, got {spec.opt('iterations')}")


def _check_quantease_outliers(spec) -> None:
    _check_quantease(spec)
    frac = spec.opt("outliers")
    if not 0 <= frac < 1:
        raise ConfigError(f"quantease: outliers is a fraction of the weights in [0, 1), got {frac}")
    if frac == 0:
        for key in ("structured", "outlier_step"):
            if key in dict(spec.options):
                raise ConfigError(f"quantease: '{key}' applies only with outliers (set outliers > 0, e.g. "
                                  f"outliers: 0.01), or drop it")
    elif spec.opt("outlier_step") <= 0:
        raise ConfigError(f"quantease: outlier_step must be > 0, got {spec.opt('outlier_step')}")
    elif spec.opt("guided_groups"):
        raise ConfigError("quantease: the guided objective (gq) and outliers do not combine; drop one of them")


register(Component(
    "quantease", "solver", "quantlib.solvers.quantease:solve", "QuantEase", needs=("hessian",), takes_guided=True,
    format=lambda spec: "uniform_outliers" if spec.opt("outliers") > 0 else "uniform",
    options=_QUANTEASE_CORE + (
        Option("outliers", 0.0, float, "ol",
               "fraction of weights kept in full precision (Algorithm 3): unstructured entries, or whole input "
               "columns with `structured`"),
        Option("structured", False, bool, "cols", "outliers are whole input columns (needs outliers > 0)"),
        Option("outlier_step", 1.0, float, "olstep",
               "step of the outliers' hard-thresholding step, times 1/(2 lambda_max(H)) (the paper's alpha)"),
    ),
    check=_check_quantease_outliers,
    help="cyclic coordinate descent on tr((W - W_hat) H (W - W_hat)^T) over the grid, from W_hat = W",
))

register(Component(
    "gptq_quantease", "solver", "quantlib.solvers.quantease:solve_gptq", "GPTQ+QuantEase", needs=("hessian",),
    takes_guided=True,
    options=_QUANTEASE_CORE, check=_check_quantease,
    help="QuantEase sweeps started from the LDLQ (= GPTQ) solution and grid",
))


def _check_spqr(spec) -> None:
    if spec.opt("stat_group") < 1:
        raise ConfigError(f"spqr: stat_group must be a positive number of rows, got {spec.opt('stat_group')}")
    threshold = spec.opt("outlier_threshold")
    if spec.opt("keep_outliers") and not (0 < threshold < math.inf):
        raise ConfigError(f"spqr: outlier_threshold must be a positive finite number, got {threshold}; for no "
                          "outliers set keep_outliers: false")
    if not spec.opt("keep_outliers"):
        for key in ("outlier_threshold", "loo"):
            if key in dict(spec.options):
                raise ConfigError(f"spqr: '{key}' has no effect without outliers (keep_outliers: false); drop it")
    if spec.group_size != -1 and spec.group_size < 2 and spec.opt("keep_outliers") and spec.opt("loo"):
        raise ConfigError("spqr: the leave-one-out outlier rule needs groups of at least 2 columns")


register(Component(
    "spqr", "solver", "quantlib.solvers.spqr:solve", "SpQR", needs=("hessian",),
    # SpQR's own quantizer (tight range, real zero point) fitted per small group: no parameter init to choose.
    takes_init=False, format="spqr",
    options=(
        _ACT_ORDER,
        Option("stat_bits", 3, int, "qq", "bits of every per-row scale and zero of a group (SpQR's qq_scale_bits = "
               "qq_zero_bits); 16 keeps them unquantized", choices=(2, 3, 4, 5, 6, 7, 8, 16)),
        Option("stat_group", 16, int, "qqg", "rows per second-level group of the statistics (SpQR's qq_groupsize, "
               "beta2)"),
        Option("outlier_threshold", 0.2, float, "ot",
               "SpQR's outlier_relative_threshold: a weight whose rounding error costs more than this times "
               "mean_k var(w_k) D_k is kept in full precision"),
        Option("keep_outliers", True, bool, "noot", "keep unstructured outliers (off: SpQR's threshold = inf)"),
        Option("loo", True, bool, "simpleot",
               "fit each group's statistics without its likely outliers, found by the leave-one-out error reduction "
               "(off: SpQR's simplified_outliers, as the QuantEase code calls SpQR)"),
    ),
    check=_check_spqr,
    help="GPTQ/LDLQ error feedback with small groups, quantized statistics and unstructured full-precision outliers",
))

register(Component(
    "lsq", "solver", "quantlib.solvers.lsq:wrap", "LSQ (block-wise)", needs=("calibration", "fp_targets"),
    mode="block", options=block_training(epochs=2, lr=1e-2),
    help="a log-scale per (row, group) learned by Adam on the block's output error, zero point fixed, "
         "straight-through rounding (LSQ, Esser et al. 2020, trained block by block as in BRECQ)",
))
