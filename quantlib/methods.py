"""The catalog: every solver, parameter init, preprocessing stage, statistic and storage format, with what each one
needs and the options a short name can carry. Pure Python (no torch), so the Snakefile validates names cheaply and
every refusal of a combination happens when a name is parsed, before any job. Implementations are imported lazily
from their `impl` paths ("module:attribute").

A method declares (docs/adding-a-method.md walks through each case):
- `needs`: what it reads. `calibration` (token windows), `hessian` (each layer's input Hessian, captured by the
  runner), `fp_targets` (the unquantized block's outputs), or the name of a statistic of the FP model (an artifact
  of `rules/stats.smk`, listed in STATISTICS).
- `mode` (solvers): `data_free`, `layer` (one layer, or layers sharing an input, at a time) or `block` (a whole
  decoder block trained at once).
- `takes_init` (solvers): whether the parameter init (min-max, NeUQI, ...) chooses its grid.
- `format` (solvers): how its result is stored, a key of FORMATS (or a function of the spec).
- `check(spec)`: refusals of combinations of settings, each a ConfigError with a one-line message.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError
from .names import NUMBER_RE, format_number, parse_number  # noqa: F401  (re-exported for older imports)


@dataclass(frozen=True)
class Option:
    """One setting that a short name can carry.

    Booleans write `token` when the value differs from the default; numbers write `token` + the number. A boolean
    whose default differs between methods has two tokens: `token` for true, `false_token` for false.
    `default` may be a callable of the spec when it depends on other settings (e.g. on the group size).
    `removes_needs`: what the spec no longer reads when the option is not at its default.
    """

    key: str
    default: Any
    kind: type
    token: str
    help: str = ""
    choices: tuple | None = None
    false_token: str | None = None
    removes_needs: tuple[str, ...] = ()

    def default_for(self, spec) -> Any:
        return self.default(spec) if callable(self.default) else self.default

    def render(self, value: Any) -> str:
        if self.kind is bool:
            return self.token if value or self.false_token is None else self.false_token
        return f"{self.token}{format_number(value)}"

    def tokens(self) -> tuple[str, ...]:
        return (self.token,) if self.false_token is None else (self.token, self.false_token)

    def pattern(self) -> str:
        if self.kind is bool:
            return "|".join(re.escape(t) for t in self.tokens())
        return re.escape(self.token) + f"(?:{NUMBER_RE})"

    def match(self, tok: str, spec_default: Any) -> tuple[bool, Any]:
        if self.kind is bool:
            if self.false_token is not None:
                return (tok in self.tokens(), tok == self.token)
            return (tok == self.token, not spec_default)
        m = re.fullmatch(re.escape(self.token) + f"({NUMBER_RE})", tok)
        if not m:
            return (False, None)
        return (True, parse_number(m.group(1), self.kind))

    def coerce(self, value: Any) -> Any:
        """Check a value given in the config and convert it to the option's type."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"option '{self.key}' takes true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"option '{self.key}' takes a number, got {value!r}")
        if self.kind is int and not float(value).is_integer():
            raise ConfigError(f"option '{self.key}' takes an integer, got {value!r}")
        value = self.kind(value)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"option '{self.key}' must be one of {list(self.choices)}, got {value!r}")
        return value

    def describe(self) -> str:
        return "/".join(self.tokens()) if self.kind is bool else f"{self.token}<number>"


@dataclass(frozen=True)
class Component:
    """A solver, a parameter init or a preprocessing stage."""

    name: str
    kind: str  # "solver" | "init" | "preprocess"
    impl: str  # "module:attribute", imported on first use
    label: str
    needs: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    help: str = ""
    mode: str = "layer"  # solvers: "data_free" | "layer" | "block"
    takes_init: bool = True  # solvers: the init chooses the grid
    format: str | Callable[[Any], str] = "uniform"  # solvers: a key of FORMATS
    check: Callable[[Any], None] | None = None
    # Solvers: defaults of the runner's options that differ for this method (e.g. {"fp_inputs": True}), whether the
    # guided objective (`gq`) applies, and how a Hessian that is not positive definite is damped ("gptq": at least
    # 1 %, doubled; "lnq": 1e-5, x10, up to 1).
    defaults: tuple[tuple[str, Any], ...] = ()
    takes_guided: bool = False
    damp_ladder: str = "gptq"

    def load(self) -> Callable:
        return load_impl(self.impl)

    def format_for(self, spec) -> str:
        return self.format(spec) if callable(self.format) else self.format


@dataclass(frozen=True)
class Statistic:
    """A statistic of the unquantized model, computed once per model and calibration by `rules/stats.smk` and shared
    by every method that needs it. `impl` computes it (`compute(model, tokens, out_dir, meta, params, inputs, ...)`),
    `reader` opens a saved artifact for the runner. `params`: integer parameters written into the artifact's name
    as `.{param}{value}` tokens (`guided_hessian.g4`); `needs`: other statistics it is computed from."""

    name: str
    impl: str
    reader: str
    label: str
    help: str = ""
    params: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    block_by_block: bool = False  # computed one decoder block at a time: the job reads the model lazily


@dataclass(frozen=True)
class Format:
    """A stored representation of a quantized layer: `impl` names its class (`from_tensors`, `to_tensors`, `meta`,
    `dequantize`, `bits_per_weight`)."""

    name: str
    impl: str
    label: str
    help: str = ""

    def load(self):
        return load_impl(self.impl)


def load_impl(impl: str):
    """The object an `impl` path ("module:attribute") names, imported on first use."""
    module, _, attr = impl.partition(":")
    return getattr(importlib.import_module(module), attr)


SOLVERS: dict[str, Component] = {}
INITS: dict[str, Component] = {}
PREPROCESSORS: dict[str, Component] = {}
STATISTICS: dict[str, Statistic] = {}
FORMATS: dict[str, Format] = {}
_REGISTRIES = {"solver": SOLVERS, "init": INITS, "preprocess": PREPROCESSORS}

# What a component can need besides statistics.
NEEDS = {
    "calibration": "calibration token windows",
    "hessian": "each layer's input Hessian, captured by the runner from the calibration windows",
    "fp_targets": "the unquantized block's outputs on the calibration windows (block-wise reconstruction)",
}
MODES = ("data_free", "layer", "block")

# Names that cannot be methods because they mean something else in a short name.
RESERVED = {"fp", "kd"}

# Every option token in the catalog -> its option: one token means one setting everywhere.
_TOKENS: dict[str, Option] = {}


def _register_option(o: Option, owner: str) -> None:
    for tok in o.tokens():
        known = _TOKENS.get(tok)
        if known is not None and (known.key, known.kind, known.tokens()) != (o.key, o.kind, o.tokens()):
            raise ValueError(f"{owner}: option token '{tok}' already means '{known.key}'")
    for other in _TOKENS.values():
        if other.key == o.key and other.tokens() != o.tokens():
            raise ValueError(f"{owner}: option '{o.key}' already has the token '{other.token}'")
        # A rendered value of one option must never read as another option (e.g. a token that is another's prefix
        # followed by a number).
        if other.key != o.key and (any(re.fullmatch(other.pattern(), t) for t in _samples(o))
                                   or any(re.fullmatch(o.pattern(), t) for t in _samples(other))):
            raise ValueError(f"{owner}: option tokens '{o.token}' and '{other.token}' can be confused")
    for tok in o.tokens():
        _TOKENS[tok] = o


def _samples(o: Option) -> list[str]:
    return list(o.tokens()) if o.kind is bool else [o.render(o.kind(1))]


def register(component: Component) -> Component:
    registry = _REGISTRIES[component.kind]
    if component.name in RESERVED or any(component.name in r for r in _REGISTRIES.values()):
        raise ValueError(f"method name '{component.name}' is already taken")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", component.name):
        raise ValueError(f"method name '{component.name}' must be lower case letters, digits and '_'")
    if component.mode not in MODES:
        raise ValueError(f"{component.name}: mode must be one of {MODES}")
    for need in component.needs + tuple(n for o in component.options for n in o.removes_needs):
        if need not in NEEDS and need not in STATISTICS:
            raise ValueError(f"{component.name}: unknown need '{need}' (known: {', '.join([*NEEDS, *STATISTICS])})")
    for o in component.options:
        _register_option(o, component.name)
    registry[component.name] = component
    return component


def register_statistic(stat: Statistic) -> Statistic:
    if stat.name in STATISTICS or stat.name in NEEDS or not re.fullmatch(r"[a-z][a-z0-9_]*", stat.name):
        raise ValueError(f"statistic name '{stat.name}' is taken or not lower case letters, digits and '_'")
    STATISTICS[stat.name] = stat
    return stat


def stat_name(stat: str, **params: int) -> str:
    """The name of a statistics artifact: the statistic, then its parameters (`guided_hessian.g4`)."""
    entry = STATISTICS[stat]
    if set(params) != set(entry.params):
        raise ValueError(f"statistic '{stat}' takes the parameters {entry.params}, got {sorted(params)}")
    return ".".join([stat, *(f"{p}{params[p]}" for p in entry.params)])


def parse_stat_name(name: str) -> tuple[str, dict[str, int]]:
    """(statistic, parameters) of an artifact name; ConfigError when it names no statistic of the catalog."""
    stat, *tokens = name.split(".")
    if stat not in STATISTICS:
        raise ConfigError(f"'{stat}' is not a statistic; known: {', '.join(sorted(STATISTICS))}")
    entry = STATISTICS[stat]
    params = {}
    for p, tok in zip(entry.params, tokens):
        m = re.fullmatch(re.escape(p) + r"([0-9]+)", tok)
        if m:
            params[p] = int(m.group(1))
    if len(tokens) != len(entry.params) or len(params) != len(entry.params):
        raise ConfigError(f"'{name}' is not a name of statistic '{stat}' (expected "
                          f"{'.'.join([stat, *(p + '<n>' for p in entry.params)])})")
    return stat, params


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format '{fmt.name}' is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def component(kind: str, name: str) -> Component:
    registry = _REGISTRIES[kind]
    if name not in registry:
        raise ConfigError(f"unknown {kind} '{name}'; known: {', '.join(sorted(registry))}")
    return registry[name]


def format_entry(name: str) -> Format:
    if name not in FORMATS:
        raise ConfigError(f"unknown storage format '{name}'; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def known_option(key: str) -> Option | None:
    """The catalog's option with this key, if any."""
    return next((o for o in _TOKENS.values() if o.key == key), None)


def option_for_token(tok: str) -> Option | None:
    """The catalog's option whose token (with a number, for numeric options) this is."""
    for o in _TOKENS.values():
        if re.fullmatch(f"(?:{o.pattern()})", tok):
            return o
    return None


# ------------------------------------------------------------------------------------ options of the contract
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
for _o in (DAMP, TRUE_SEQUENTIAL, FP_INPUTS, GUIDED, SYM):
    _register_option(_o, "the runner")




def block_training(epochs: int, lr: float, batch: int = 1, qdrop: float = 0.5) -> tuple[Option, ...]:
    """The training options of a block-wise solver (read by `quantlib.blockwise`), with the method's defaults."""
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
)
for _o in DISTILL_OPTIONS:
    _register_option(_o, "distillation")
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


# ---------------------------------------------------------------------------------------------- statistics

register_statistic(Statistic(
    "fp_hessian", "quantlib.stats:capture_fp_hessians", "quantlib.stats:FPHessians", "input Hessians of the FP model",
    help="H = mean of x x^T over the calibration tokens, for every quantized layer, with the inputs propagated "
         "through the unquantized model", block_by_block=True,
))
register_statistic(Statistic(
    "gradients", "quantlib.gradients:capture_gradients", "quantlib.gradients:Gradients",
    "end-loss gradients of the FP model", params=("G",),
    help="one forward and backward pass per calibration window (mean cross-entropy, labels = inputs): the diagonal "
         "Fisher of every quantized weight (sum over windows of the squared weight gradient, SqueezeLLM) and "
         "GuidedQuant's output saliency, per token the squared output gradient (x 1e3) averaged over G contiguous "
         "blocks of output channels",
))
register_statistic(Statistic(
    "guided_hessian", "quantlib.gradients:capture_guided_hessians", "quantlib.gradients:GuidedHessians",
    "saliency-weighted Hessians of the FP model", params=("g",), needs=("gradients",),
    help="per quantized layer and block k of its output rows, H_k = mean over tokens of s_tk x x^T with the FP "
         "model's inputs x and the saliency s averaged to g blocks (GuidedQuant)", block_by_block=True,
))


# ------------------------------------------------------------------------------------------------- formats

register_format(Format("uniform", "quantlib.formats.uniform:UniformQuantized", "uniform grid",
                       help="b-bit codes packed LSB-first in int32 words per row, a scale and zero per (row, group)"))
register_format(Format("uniform_outliers", "quantlib.formats.outliers:OutlierQuantized", "uniform + outliers",
                       help="uniform codes plus full-precision float16 outliers (CSR entries or whole columns)"))
register_format(Format("lut", "quantlib.formats.lut:LutQuantized", "lookup table",
                       help="b-bit codes (packed as the uniform format's) into a per-row table of 2^b float16 values"))
register_format(Format("spqr", "quantlib.formats.spqr:SpqrQuantized", "SpQR",
                       help="uniform codes in small groups whose scales and zeros are themselves quantized (SpQR's "
                            "second level), plus float16 outliers"))


# ---------------------------------------------------------------------------------------------- the catalog

register(Component(
    "minmax", "init", "quantlib.init:minmax_init", "min-max", options=(SYM,),
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
    "neuqi", "init", "quantlib.init:neuqi_init", "NeUQI", needs=("hessian",),
    options=(_HDIAG_WEIGHT, _GRID,
             Option("grid_coarse", 64, int, "coarse", "coarse scale steps Tm of the coarse-to-fine search")),
    check=_check_neuqi,
    help="coarse-to-fine scale search with the optimal real zero point per scale (reference: grid2_s_best_zp)",
))

register(Component(
    "neuqi_int", "init", "quantlib.init:neuqi_int_init", "NeUQI_int", needs=("hessian",),
    options=(_HDIAG_WEIGHT, _GRID), check=_check_neuqi_int,
    help="scale search on T steps with the best integer zero point in 0..Qmax per scale (reference: grid_s_zp)",
))


def _check_magr(spec) -> None:
    if spec.opt("magr_alpha") <= 0 or spec.opt("magr_iters") < 1:
        raise ConfigError("magr: magr_alpha must be > 0 and magr_iters >= 1")


register(Component(
    "magr", "preprocess", "quantlib.preprocess:magr", "MagR", needs=("hessian",),
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
    "sqllm", "solver", "quantlib.solvers.lut:solve_squeezellm", "SqueezeLLM", needs=("gradients",),
    takes_init=False, format="lut", options=_KMEANS, check=_check_lut,
    help="per output row, 1-D k-means of the row's weights into 2^b values weighted by the diagonal Fisher "
         "(SqueezeLLM, dense part only)",
))

register(Component(
    "lnq", "solver", "quantlib.solvers.lut:solve_lnq", "LNQ", needs=("hessian", "gradients"),
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


# UniQuanF's family (Park et al., ACL 2025): block-wise training with the authors' run-script defaults (Adam, lr 5e-3
# for the scales, 5e-4 for the binary-coding scales, cosine to 0, 20 epochs at batch 1, QDrop 0.5) and the data-free
# binary-coding baseline.
register_format(Format("bcq", "quantlib.formats.bcq:BcqQuantized", "binary coding",
                       help="b sign planes (1 bit per weight each) with b float16 scales and a float16 offset per "
                            "(row, group)"))

_ALTERNATIONS = Option("alternations", 15, int, "alt", "least-squares rounds of ALTERNATING")


def _check_bcq(spec) -> None:
    if spec.opt("alternations") < 1:
        raise ConfigError(f"{spec.solver}: alternations must be >= 1, got {spec.opt('alternations')}")


def _check_uniquanf(spec) -> None:
    _check_bcq(spec)
    for key in ("remap_period", "clip_grid"):
        if spec.opt(key) < 1:
            raise ConfigError(f"uniquanf: {key} must be >= 1, got {spec.opt(key)}")
    if spec.opt("alpha_lr") <= 0:
        raise ConfigError(f"uniquanf: alpha_lr must be > 0, got {spec.opt('alpha_lr')}")


register(Component(
    "flexround", "solver", "quantlib.solvers.flexround:wrap", "FlexRound", needs=("calibration", "fp_targets"),
    mode="block", options=block_training(epochs=20, lr=5e-3),
    help="learnable element-wise division before rounding (log-scale per (row, group), per weight and per row) on "
         "the init's grid, trained on each block's output error",
))

register(Component(
    "alternating", "solver", "quantlib.solvers.alternating:solve", "ALTERNATING", mode="data_free",
    takes_init=False, format="bcq", check=_check_bcq,
    options=(_ALTERNATIONS, Option("offset", True, bool, "nooffset", "fit an offset per (row, group) too")),
    help="binary coding per (row, group): greedy signs and scales, then alternating least-squares scales and "
         "nearest levels",
))

register(Component(
    "uniquanf", "solver", "quantlib.solvers.uniquanf:wrap", "UniQuanF", needs=("calibration", "fp_targets"),
    mode="block", takes_init=False, format="bcq", check=_check_uniquanf,
    options=block_training(epochs=20, lr=5e-3) + (
        Option("alpha_lr", 5e-4, float, "blr", "Adam's learning rate of the binary-coding scales"),
        Option("remap_period", 2, int, "p", "steps between remappings of each weight to its best index neighbour"),
        _ALTERNATIONS,
        Option("clip_grid", 1, int, "clip", "scales tried at initialisation: s * i / G, i = 1..G"),
    ),
    help="unified uniform and binary-coding quantizer: learnable division, then binary-coding levels with learnable "
         "scales and local remapping, trained on each block's output error",
))
