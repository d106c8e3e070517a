"""Rotations of the whole model before quantization (model-scope preprocessors): QuaRot's random Hadamard R1/R2
with the online Hadamards R3/R4 (`quantlib.transforms.rotation`). The quantized forward they run with (activation
and KV-cache bits) is the contract's `FORWARD` options, which apply to every layer-wise or data-free spec."""

from __future__ import annotations

from quantlib.catalog.names import Option
from quantlib.catalog.registry import STATISTICS, Component, register
from quantlib.errors import ConfigError


def _check_rotation(spec) -> None:
    # Statistics of the FP model are computed on the unrotated model: per-weight ones (Fisher) and Hessians (fpin)
    # are in the wrong basis. GuidedQuant's saliency with one block of output rows (gq1) is not: a token's squared
    # output gradient summed over all rows is unchanged by rotating them, and the FP function is unchanged.
    if spec.opt_or("fp_inputs", False):
        raise ConfigError(f"{spec.preprocess[0]}: 'fpin' takes Hessians of the unrotated FP model, which do not match "
                          "the rotated weights; use 'qin' (the default)")
    if spec.opt_or("guided_groups", 0) > 1:
        raise ConfigError(f"{spec.preprocess[0]}: 'gq{spec.opt('guided_groups')}' weighs blocks of output rows by "
                          "the unrotated FP model's saliency, and a rotation mixes the rows of o_proj, down_proj and "
                          "v_proj; use gq1 (the whole output, unchanged by rotations)")
    own = sorted({n for c in spec.components() for n in c.needs if n in STATISTICS})
    if own:
        raise ConfigError(f"{spec.preprocess[0]}: {spec.solver} reads statistics of the unrotated FP model "
                          f"({', '.join(own)}), which do not match the rotated weights")
    if sum(1 for p in spec.preprocess if p in ROTATIONS) > 1:
        raise ConfigError("at most one rotation (quarot, spinquant) per spec")


ROTATIONS = ("quarot", "spinquant")
_SEED = Option("rotation_seed", 0, int, "rseed", "seed of the random Hadamard rotations R1 and R2 (SpinQuant's start)")


def _check_spinquant(spec) -> None:
    _check_rotation(spec)
    if spec.opt("spin_iters") < 1 or spec.opt("spin_lr") <= 0 or spec.opt("spin_batch") < 1:
        raise ConfigError("spinquant: spin_iters and spin_batch must be >= 1 and spin_lr > 0")
    if spec.opt("spin_clip") < 0:
        raise ConfigError(f"spinquant: spin_clip is a gradient norm (0: no clip), got {spec.opt('spin_clip')}")
    if spec.calib is not None and spec.opt("spin_batch") > spec.calib.nsamples:
        raise ConfigError(f"spinquant: spin_batch ({spec.opt('spin_batch')}) is larger than the "
                          f"{spec.calib.nsamples} calibration windows")

register(Component(
    "quarot", "preprocess", "quantlib.transforms.rotation:quarot", "QuaRot", scope="model",
    options=(_SEED,
             Option("o_hadamard", True, bool, "noohad",
                    "QuaRot's online Hadamard on o_proj's input (its weight rotated to match); off: R2 only there, "
                    "as SpinQuant")),
    check=_check_rotation,
    help="QuaRot (Ashkboos et al. 2024): norms folded, the residual stream (R1) and each head's values (R2) rotated "
         "by seeded random Hadamard matrices, online Hadamards on down_proj's input (R4), on o_proj's input and on "
         "queries and keys after RoPE (R3); the model's function is unchanged before quantization",
))

register(Component(
    "spinquant", "preprocess", "quantlib.transforms.spinquant:spinquant", "SpinQuant", scope="model",
    needs=("calibration",),
    options=(_SEED,
             # The reference's settings: 100 steps at learning rate 1.5 on a cosine schedule; it trains on 8 GPUs
             # with one window each (800 windows of 2048 tokens), here one window per step unless spin_batch says
             # more.
             Option("spin_iters", 100, int, "spit", "Cayley SGD steps of SpinQuant's rotation training"),
             Option("spin_lr", 1.5, float, "splr", "Cayley SGD's learning rate (cosine schedule to 0)"),
             Option("spin_batch", 1, int, "spbs", "calibration windows per Cayley SGD step"),
             # the reference's Trainer clips the gradients' global norm to its default max_grad_norm
             Option("spin_clip", 1.0, float, "spclip",
                    "largest global norm of R1's and the R2s' gradients per step (0: no clip)")),
    check=_check_spinquant,
    help="SpinQuant (Liu et al. 2024): QuaRot's rotations with R1 and R2 learned by Cayley SGD on the Stiefel "
         "manifold, the next-token loss of the model with its quantized forward in the loop (and its weights "
         "fake-quantized when the solver is data-free)",
))
