"""The statistics of the FP model: artifacts of `rules/stats.smk`, computed once per model and calibration and shared
by every method that reads them. Each entry carries the statistic's whole meaning (its parameters and how they are
chosen, its dependencies, when a spec reads it, what the runner hands the solver from it, its memory), so no other
module names a statistic (docs/adding-a-method.md, "A statistic")."""

from __future__ import annotations

from quantlib.catalog.registry import Statistic, register_statistic
from quantlib.errors import ConfigError

DEFAULT_SALIENCY_GROUPS = 4  # the config's gradients.groups default (GuidedQuant's released runs use 4)
# The gradients' end loss is taken this many logits (tokens x vocabulary) at a time: 16 MB in float32.
LOSS_LOGITS = 1 << 22


def _guided_groups(spec) -> int:
    """The spec's guided objective (`gq`): 0 when it has none or cannot take one."""
    return spec.opt_or("guided_groups", 0)


def _layer_wise_hessians(spec) -> bool:
    """A layer-wise spec that reads each layer's input Hessian (where the runner takes Hessians from)."""
    return spec.needs_hessian and spec.mode == "layer"


def _hessian_bytes(shapes, params) -> int:
    # One float32 Hessian per subgroup of the block.
    return sum(d * d * 4 for d, _ in shapes.subgroups)


def _hessian_sums(shapes, params) -> int:
    # The float64 sums of every subgroup's Hessian while a block is captured.
    return sum(d * d * 8 for d, _ in shapes.subgroups)


register_statistic(Statistic(
    "fp_hessian", "quantlib.stats.fp_hessian:capture_fp_hessians", "quantlib.stats.fp_hessian:FPHessians",
    "input Hessians of the FP model",
    help="H = mean of x x^T over the calibration tokens, for every quantized layer, with the inputs propagated "
         "through the unquantized model",
    read_by=lambda spec: _layer_wise_hessians(spec) and spec.opt("fp_inputs") and not _guided_groups(spec),
    hands=("hessian",), block_by_block=True, read_bytes=_hessian_bytes, compute_bytes=_hessian_sums,
))


def _gradient_params(spec, settings) -> dict:
    if settings is None:  # a quantize job: G is the config's, not the spec's
        return {}
    return {"G": (settings.get("gradients") or {}).get("groups", DEFAULT_SALIENCY_GROUPS)}


def _check_saliency_groups(spec, params, settings) -> None:
    g = _guided_groups(spec) if spec is not None else 0
    if g and "G" in params and params["G"] % g:
        raise ConfigError(f"gq{g} needs the saliency in a multiple of {g} groups; set gradients.groups (now "
                          f"{params['G']}) to one")


register_statistic(Statistic(
    "gradients", "quantlib.stats.gradients:capture_gradients", "quantlib.stats.gradients:Gradients",
    "end-loss gradients of the FP model", params=("G",), choose=_gradient_params, check=_check_saliency_groups,
    help="one forward and backward pass per calibration window (mean cross-entropy, labels = inputs): the diagonal "
         "Fisher of every quantized weight (sum over windows of the squared weight gradient, SqueezeLLM) and "
         "GuidedQuant's output saliency, per token the squared output gradient (x 1e3) averaged over G contiguous "
         "blocks of output channels",
    # The guided objective on the runner's own captures: each token weighted by the saliency.
    read_by=lambda spec: _layer_wise_hessians(spec) and not spec.opt("fp_inputs") and bool(_guided_groups(spec)),
    hands=("layer_stats", "token_weights"),
    block_by_block=True, backward=True,
    read_bytes=lambda shapes, params: shapes.block_params * 4,  # the Fisher: one float per weight
    # Beside the streamed backward's block, gradients and kept activations: the block's Fisher sums.
    compute_bytes=lambda shapes, params: shapes.block_params * 4,
))


def _guided_params(spec, settings) -> dict:
    return {"g": _guided_groups(spec)} if spec is not None else {}


def _check_guided(spec, params, settings) -> None:
    G = _gradient_params(None, settings).get("G") if settings is not None else None
    if G is not None and "g" in params and G % params["g"]:
        raise ConfigError(f"guided_hessian.g{params['g']}: gradients.groups ({G}) is not a multiple of g = "
                          f"{params['g']}; set gradients.groups in the config to a multiple of {params['g']}")


def _guided_sums(shapes, params) -> int:
    # Beside the plain sums, g float64 Hessians per layer of the largest subgroup.
    d = max(d for d, _ in shapes.subgroups)
    return _hessian_sums(shapes, params) + params.get("g", 1) * shapes.max_layers_per_subgroup * d * d * 8


register_statistic(Statistic(
    "guided_hessian", "quantlib.stats.guided_hessian:capture_guided_hessians",
    "quantlib.stats.guided_hessian:GuidedHessians", "saliency-weighted Hessians of the FP model", params=("g",),
    choose=_guided_params, needs=("gradients",), check=_check_guided,
    help="per quantized layer and block k of its output rows, H_k = mean over tokens of s_tk x x^T with the FP "
         "model's inputs x and the saliency s averaged to g blocks (GuidedQuant)",
    read_by=lambda spec: _layer_wise_hessians(spec) and spec.opt("fp_inputs") and bool(_guided_groups(spec)),
    hands=("hessian",), block_by_block=True, read_bytes=_hessian_bytes, compute_bytes=_guided_sums,
))
