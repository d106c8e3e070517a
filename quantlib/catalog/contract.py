"""Options of the contract: settings that follow from what a spec needs rather than from one method (the runner's
Hessian damping, true-sequential capture, FP inputs, the guided objective, symmetric grids), the training options
every block-wise solver takes, and the `.kd` distillation stage's options. The runner and the trainers apply them;
each exists only on specs it affects, so no two names build the same model."""

from __future__ import annotations

from quantlib.catalog import registry
from quantlib.catalog.names import Option, register_option
from quantlib.errors import ConfigError

# Options that follow from what a spec needs rather than from one method: the runner applies them, and they exist
# only on specs they affect (so no two names build the same model).

DAMP = Option("damp", 0.01, float, "damp", "Hessian damping, as a fraction of the mean of diag(H)")
TRUE_SEQUENTIAL = Option(
    "true_sequential", True, bool, "noseq",
    "take each subgroup's Hessian after quantizing the earlier subgroups of its block (off: all layers of a block "
    "from one pass of the unquantized block, as GPTQ's OPT/BLOOM scripts do)")
FP_INPUTS = Option(
    "fp_inputs", False, bool, "fpin",
    "take every layer's Hessian from the unquantized model's own inputs (GuidedQuant's convention: `fpin`), a "
    "statistic computed once per model and calibration and shared by all methods, or from the already quantized "
    "prefix (`qin`)", false_token="qin")
GUIDED = Option(
    "guided_groups", 0, int, "gq",
    "GuidedQuant's objective: the layer's output rows cut into g contiguous blocks, each solved with its own "
    "Hessian weighted per token by the end loss's squared output gradients (0: the plain objective)")
SYM = Option("sym", False, bool, "sym", "symmetric grid (zero point fixed at the middle of the range)")
BLOCKS = Option(
    "blocks", 0, int, "blocks",
    "quantize only the first n decoder blocks and leave the rest unquantized (0: all), for debugging a method on a "
    "large model quickly; the setting is part of the short name, so such a model never passes for a full one")
for _o in (DAMP, TRUE_SEQUENTIAL, FP_INPUTS, GUIDED, SYM, BLOCKS):
    register_option(_o, "the runner")

# The quantized model's forward beyond its weights (`quantlib.transforms.activations`): activations at every decoder
# linear's input, per token, and the key/value cache, per token and head. 16 bits: not quantized. The clipping
# ratios are QuaRot's (0.9 for activations, 0.95 for the KV cache).
ACT_BITS = Option("act_bits", 16, int, "a", "bits of every decoder linear's input activations, per token (16: not "
                  "quantized)")
ACT_SYM = Option("act_sym", False, bool, "actsym", "symmetric activation grid (default asymmetric, per token)")
ACT_CLIP = Option("act_clip", 0.9, float, "aclip", "activation clipping ratio: each token's range shrunk by this factor")
KV_BITS = Option("kv_bits", 16, int, "kv", "bits of the key and value cache, per token and head (16: not quantized)")
KV_SYM = Option("kv_sym", False, bool, "kvsym", "symmetric KV-cache grid (default asymmetric)")
KV_CLIP = Option("kv_clip", 0.95, float, "kvclip", "KV-cache clipping ratio")
KV_GROUP = Option("kv_group", 0, int, "kvg", "KV-cache group size along each head (0: the whole head)")
FORWARD = (ACT_BITS, ACT_SYM, ACT_CLIP, KV_BITS, KV_SYM, KV_CLIP, KV_GROUP)
for _o in FORWARD:
    register_option(_o, "the quantized forward")


def forward_settings(spec) -> dict | None:
    """The quantized forward a spec's model runs (`quantlib.transforms.activations.ForwardQuant`'s fields), or None
    when it is the plain one: no quantized activations or cache and no rotation needing online Hadamards."""
    rotated = any(registry.component("preprocess", p).scope == "model" for p in spec.preprocess)
    out = {o.key: spec.opt_or(o.key, o.default) for o in FORWARD}
    out["rotated"] = rotated
    out["o_rotated"] = rotated and spec.opt_or("o_hadamard", False)
    if not rotated and out["act_bits"] >= 16 and out["kv_bits"] >= 16:
        return None
    return out


def check_forward(spec) -> None:
    """Refusals of the forward options."""
    for key in ("act_bits", "kv_bits"):
        if not 2 <= spec.opt(key) <= 16:
            raise ConfigError(f"{key} must be between 2 and 16 (16: not quantized), got {spec.opt(key)}")
    for key in ("act_clip", "kv_clip"):
        if not 0 < spec.opt(key) <= 1:
            raise ConfigError(f"{key} is a fraction of each token's range in (0, 1], got {spec.opt(key)}")
    if spec.opt("kv_group") < 0:
        raise ConfigError(f"kv_group must be >= 0 (0: the whole head), got {spec.opt('kv_group')}")


def block_training(epochs: int, lr: float, batch: int = 1, qdrop: float = 0.5) -> tuple[Option, ...]:
    """The training options of a block-wise solver (read by `quantlib.runner.blockwise`), with the method's defaults."""
    return (
        Option("epochs", epochs, int, "ep", "passes over the calibration windows per block"),
        Option("lr", lr, float, "lr", "Adam's learning rate, decayed to 0 by a cosine schedule"),
        Option("batch", batch, int, "bs", "calibration windows per training step"),
        Option("qdrop", qdrop, float, "qdrop",
               "probability that an input element comes from the quantized model's stream rather than the FP "
               "model's (QDrop); 1: quantized inputs only"),
    )


def check_block_training(spec) -> None:
    """Refusals common to every block-wise solver."""
    if spec.opt("epochs") < 1:
        raise ConfigError(f"{spec.solver}: epochs must be >= 1, got {spec.opt('epochs')}")
    if spec.opt("lr") <= 0:
        raise ConfigError(f"{spec.solver}: lr must be > 0, got {spec.opt('lr')}")
    if not 0 <= spec.opt("qdrop") <= 1:
        raise ConfigError(f"{spec.solver}: qdrop is a probability in [0, 1], got {spec.opt('qdrop')}")
    if spec.opt("batch") < 1:
        raise ConfigError(f"{spec.solver}: batch must be >= 1, got {spec.opt('batch')}")
    if spec.calib is not None and spec.opt("batch") > spec.calib.nsamples:
        raise ConfigError(f"{spec.solver}: batch ({spec.opt('batch')}) is larger than the {spec.calib.nsamples} "
                          "calibration windows")


# Lightweight distillation after quantization (NeUQI, Lin et al. 2025): the `.kd` part of a short name.
DISTILL_OPTIONS = (
    Option("lr", 3e-4, float, "lr", "AdamW's learning rate (betas 0.9/0.95, 10 % linear warm-up, cosine to 0)"),
    Option("epochs", 1, int, "ep", "passes over the distillation windows"),
    Option("batch", 1, int, "bs", "distillation windows per step"),
    Option("train_zero", True, bool, "nozero", "train the zero points too (off: the reference's disable_train_zero)"),
    Option("train_norm", True, bool, "nonorm", "train the norms' gains too"),
    Option("bf16", False, bool, "bf16",
           "train in bfloat16 mixed precision (autocast; the trained scales, zeros, gains and AdamW's state stay "
           "float32), as the reference trains; needs a GPU with bfloat16 support"),
)
for _o in DISTILL_OPTIONS:
    register_option(_o, "distillation")
# Formats whose scales and zeros can be trained with the codes fixed (outliers stay as they are).
DISTILL_FORMATS = ("uniform", "uniform_outliers")


def check_distill(spec) -> None:
    """Refusals of a `.kd` part (spec.distill)."""
    if spec.is_fp:
        raise ConfigError("distillation (kd) trains a quantized model's scales; the unquantized model has none")
    d = spec.distill
    opt = dict(d.options)
    get = lambda key: opt.get(key, next(o.default for o in DISTILL_OPTIONS if o.key == key))  # noqa: E731
    if spec.format not in DISTILL_FORMATS:
        raise ConfigError(f"distillation trains scales and zero points with the codes fixed; {spec.describe()} "
                          f"stores '{spec.format}', which has none that stay on its grid (formats that can: "
                          f"{', '.join(DISTILL_FORMATS)})")
    if get("epochs") < 1 or get("batch") < 1 or get("lr") <= 0:
        raise ConfigError("distillation needs epochs >= 1, batch >= 1 and lr > 0")
    if get("batch") > d.calib.nsamples:
        raise ConfigError(f"distillation batch ({get('batch')}) is larger than its {d.calib.nsamples} windows")
