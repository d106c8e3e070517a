"""The statistics of the FP model: artifacts of `rules/stats.smk`, computed once per model and calibration and shared
by every method that reads them. Each entry carries the statistic's whole meaning (docs/adding-a-method.md)."""

from __future__ import annotations

from quantlib.catalog.registry import Statistic, register_statistic

register_statistic(Statistic(
    "fp_hessian", "quantlib.stats.fp_hessian:capture_fp_hessians", "quantlib.stats.fp_hessian:FPHessians", "input Hessians of the FP model",
    help="H = mean of x x^T over the calibration tokens, for every quantized layer, with the inputs propagated "
         "through the unquantized model", block_by_block=True,
))
register_statistic(Statistic(
    "gradients", "quantlib.stats.gradients:capture_gradients", "quantlib.stats.gradients:Gradients",
    "end-loss gradients of the FP model", params=("G",),
    help="one forward and backward pass per calibration window (mean cross-entropy, labels = inputs): the diagonal "
         "Fisher of every quantized weight (sum over windows of the squared weight gradient, SqueezeLLM) and "
         "GuidedQuant's output saliency, per token the squared output gradient (x 1e3) averaged over G contiguous "
         "blocks of output channels",
))
register_statistic(Statistic(
    "guided_hessian", "quantlib.stats.guided_hessian:capture_guided_hessians", "quantlib.stats.guided_hessian:GuidedHessians",
    "saliency-weighted Hessians of the FP model", params=("g",), needs=("gradients",),
    help="per quantized layer and block k of its output rows, H_k = mean over tokens of s_tk x x^T with the FP "
         "model's inputs x and the saliency s averaged to g blocks (GuidedQuant)", block_by_block=True,
))
