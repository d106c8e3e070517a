"""GuidedQuant's lookup-table family: SqueezeLLM and LNQ (format `lut`)."""

from __future__ import annotations

from quantlib.catalog.names import Option
from quantlib.catalog.registry import Component, register
from quantlib.errors import ConfigError

# GuidedQuant's family (Kim et al. 2025, "GuidedQuant: Large Language Model Quantization via Exploiting End Loss
# Guidance"): per-row lookup tables. SqueezeLLM (Kim et al. 2024) clusters each row's weights by Fisher-weighted
# 1-D k-means; LNQ then alternates the closed-form tables and coordinate descent on the codes.
_KMEANS = (
    Option("kmeans_iters", 50, int, "kmit", "Lloyd iterations of the weighted 1-D k-means"),
    Option("kmeans_seed", 0, int, "kmseed", "seed of the k-means++ initialisation"),
)


def _check_lut(spec) -> None:
    if spec.group_size != -1:
        raise ConfigError(f"{spec.solver}: one lookup table per row; give no group size (w{spec.bits}, not "
                          f"w{spec.bits}g{spec.group_size})")
    if spec.opt("kmeans_iters") < 1:
        raise ConfigError(f"{spec.solver}: kmeans_iters must be >= 1")


def _check_lnq(spec) -> None:
    _check_lut(spec)
    if spec.opt("alternations") < 0:
        raise ConfigError(f"lnq: alternations must be >= 0, got {spec.opt('alternations')}")
    if spec.opt("gptq_assign"):
        if "cd_cycles" in dict(spec.options):
            raise ConfigError("lnq: 'cd_cycles' has no effect with the LDLQ assignment (gptqassign); drop it")
    elif spec.opt("cd_cycles") < 1 and spec.opt("alternations") >= 1:
        raise ConfigError("lnq: cd_cycles must be >= 1 when there are alternations (it >= 1)")


register(Component(
    "sqllm", "solver", "quantlib.solvers.lnq:solve_squeezellm", "SqueezeLLM", needs=("gradients",),
    takes_init=False, format="lut", options=_KMEANS, check=_check_lut,
    help="per output row, 1-D k-means of the row's weights into 2^b values weighted by the diagonal Fisher "
         "(SqueezeLLM, dense part only)",
))

register(Component(
    "lnq", "solver", "quantlib.solvers.lnq:solve_lnq", "LNQ", needs=("hessian", "gradients"),
    takes_init=False, format="lut", takes_guided=True, damp_ladder="lnq",
    defaults=(("damp", 0.0), ("fp_inputs", True)),
    options=_KMEANS + (
        Option("alternations", 2, int, "alt", "alternations of code and table updates after the first table update"),
        Option("cd_cycles", 4, int, "cd", "coordinate-descent sweeps over the codes per alternation"),
        Option("hd_init", False, bool, "hdinit",
               "start from k-means weighted by diag(H) instead of SqueezeLLM's Fisher-weighted one (no gradients)",
               removes_needs=("gradients",)),
        Option("gptq_assign", False, bool, "gptqassign",
               "assign codes by LDLQ's error feedback instead of coordinate descent (GuidedQuant's Table 14)"),
    ),
    check=_check_lnq,
    help="layer-wise non-uniform quantization: from SqueezeLLM's tables, alternate the closed-form per-row table "
         "and coordinate descent on the codes, keeping the best layer objective",
))
