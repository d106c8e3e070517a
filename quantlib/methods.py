"""The catalog of methods: every solver, parameter init and preprocessing stage, with the options that can
appear in a short name. Pure Python (no torch) so the Snakefile can validate names cheaply; the implementation
of each entry is imported lazily from its `impl` path.

A new method is one entry here plus one module under `quantlib/solvers/` (or `init.py`, `preprocess`).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError

_NUM_RE = r"-?[0-9]+(?:p[0-9]+)?(?:e-?[0-9]+)?"


def format_number(value: float | int) -> str:
    """Render a number for a name token: no dots (names are dot-separated), so 0.01 -> '0p01', 1e-05 -> '1e-05'."""
    if isinstance(value, bool):
        raise TypeError("booleans are flags, not numbers")
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = format(float(value), ".10g")
    return text.replace("e-0", "e-").replace("e+0", "e").replace("e+", "e").replace(".", "p")


def parse_number(text: str, kind: type) -> float | int:
    value = float(text.replace("p", "."))
    if kind is int:
        if not value.is_integer():
            raise ValueError(text)
        return int(value)
    return value


@dataclass(frozen=True)
class Option:
    """One setting that a short name can carry.

    Booleans write `token` when the value differs from the default; numbers write `token` + the number.
    `default` may be a callable of the spec when it depends on other settings (e.g. on the group size).
    """

    key: str
    default: Any
    kind: type
    token: str
    help: str = ""
    choices: tuple | None = None

    def default_for(self, spec) -> Any:
        return self.default(spec) if callable(self.default) else self.default

    def render(self, value: Any) -> str:
        if self.kind is bool:
            return self.token
        return f"{self.token}{format_number(value)}"

    def match(self, tok: str, spec_default: Any) -> tuple[bool, Any]:
        if self.kind is bool:
            return (tok == self.token, not spec_default)
        m = re.fullmatch(re.escape(self.token) + f"({_NUM_RE})", tok)
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


@dataclass(frozen=True)
class Component:
    """A solver, a parameter init or a preprocessing stage."""

    name: str
    kind: str  # "solver" | "init" | "preprocess"
    impl: str  # "module:function", imported on first use
    label: str
    needs_hessian: bool
    options: tuple[Option, ...] = ()
    help: str = ""
    # Solvers that do not use a uniform grid (codebooks, binary codes) do not take a parameter init.
    uses_uniform_grid: bool = True

    def load(self) -> Callable:
        module, _, attr = self.impl.partition(":")
        return getattr(importlib.import_module(module), attr)


# Options shared by every quantized spec.
COMMON_OPTIONS: tuple[Option, ...] = (
    Option("sym", False, bool, "sym", "symmetric grid (zero point fixed at the middle of the range)"),
    Option("damp", 0.01, float, "damp", "Hessian damping, as a fraction of the mean of diag(H)"),
    Option("true_sequential", True, bool, "noseq",
           "take each subgroup's Hessian after quantizing the earlier subgroups of its block (off: all layers of a "
           "block from one pass of the unquantized block, as GPTQ's OPT/BLOOM scripts do)"),
)

SOLVERS: dict[str, Component] = {}
INITS: dict[str, Component] = {}
PREPROCESSORS: dict[str, Component] = {}
_REGISTRIES = {"solver": SOLVERS, "init": INITS, "preprocess": PREPROCESSORS}

# Names that cannot be solvers, inits or preprocessors because they mean something else in a short name.
RESERVED = {"fp"}


def register(component: Component) -> Component:
    registry = _REGISTRIES[component.kind]
    if component.name in RESERVED or any(component.name in r for r in _REGISTRIES.values()):
        raise ValueError(f"method name '{component.name}' is already taken")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", component.name):
        raise ValueError(f"method name '{component.name}' must be lower case letters, digits and '_'")
    registry[component.name] = component
    return component


def component(kind: str, name: str) -> Component:
    registry = _REGISTRIES[kind]
    if name not in registry:
        raise ConfigError(f"unknown {kind} '{name}'; known: {', '.join(sorted(registry))}")
    return registry[name]


# ---------------------------------------------------------------------------------------------- the catalog

register(Component(
    "minmax", "init", "quantlib.init:minmax_init", "min-max", needs_hessian=False,
    help="scale and integer zero point from the range of each group, 0 always inside the range (GPTQ's quantizer)",
))

register(Component(
    "rtn", "solver", "quantlib.solvers.rtn:solve", "RTN", needs_hessian=False,
    help="round to nearest on the initialised grid",
))

_ACT_ORDER = Option("act_order", True, bool, "noreorder",
                    "process columns by decreasing diag(H) (GPTQ's act order, NeUQI's H reorder); groups stay static")

register(Component(
    "ldlq", "solver", "quantlib.solvers.ldlq:solve", "LDLQ", needs_hessian=True,
    options=(_ACT_ORDER,),
    help="GPTQ-equivalent error feedback through the LDL factorisation of H",
))

# NeUQI's inits (algorithms.md 2.3). Both weight each group's error by diag(H) unless told not to, so they need the
# Hessian even under RTN. Defaults are the reference's (grid_mid_tot_steps 64, grid_tot_steps 2048).
_HDIAG_WEIGHT = Option("hdiag_weight", True, bool, "unweighted",
                       "weight each column's error by diag(H), normalised per group (the reference's "
                       "--enable_H_diag_weight); off: uniform weights")
_GRID = Option("grid", 2048, int, "grid", "number of fine scale steps T: candidate scales are multiples of s0/T")

register(Component(
    "neuqi", "init", "quantlib.init:neuqi_init", "NeUQI", needs_hessian=True,
    options=(_HDIAG_WEIGHT, _GRID,
             Option("grid_coarse", 64, int, "coarse", "coarse scale steps Tm of the coarse-to-fine search")),
    help="coarse-to-fine scale search with the optimal real zero point per scale (reference: grid2_s_best_zp)",
))

register(Component(
    "neuqi_int", "init", "quantlib.init:neuqi_int_init", "NeUQI_int", needs_hessian=True,
    options=(_HDIAG_WEIGHT, _GRID),
    help="scale search on T steps with the best integer zero point in 0..Qmax per scale (reference: grid_s_zp)",
))

register(Component(
    "magr", "preprocess", "quantlib.preprocess:magr", "MagR", needs_hessian=True,
    options=(
        # The reference's enable_magr_only defaults: 1e-3 per channel, 1e-4 with groups.
        Option("magr_alpha", lambda spec: 1e-3 if spec.group_size == -1 else 1e-4, float, "alpha",
               "weight of the l-infinity penalty per (row, group)"),
        Option("magr_iters", 150, int, "iters", "proximal gradient iterations"),
    ),
    help="weight magnitude reduction: proximal gradient on the layer output error plus an l-infinity penalty",
))

_QUANTEASE_CORE = (
    _ACT_ORDER,
    Option("iterations", 30, int, "it", "coordinate-descent sweeps over all columns (the paper's num_iter)"),
    Option("relax", True, bool, "norelax",
           "accelerated schedule (Algorithm 2): every third sweep before the last four is left unrounded"),
)

register(Component(
    "quantease", "solver", "quantlib.solvers.quantease:solve", "QuantEase", needs_hessian=True,
    options=_QUANTEASE_CORE + (
        Option("outliers", 0.0, float, "ol",
               "fraction of weights kept in full precision (Algorithm 3): unstructured entries, or whole input "
               "columns with `structured`"),
        Option("structured", False, bool, "cols", "outliers are whole input columns (needs outliers > 0)"),
        Option("alpha", 1.0, float, "alpha", "step of the outliers' hard-thresholding step, times 1/(2 lambda_max(H))"),
    ),
    help="cyclic coordinate descent on tr((W - W_hat) H (W - W_hat)^T) over the grid, from W_hat = W",
))

register(Component(
    "gptq_quantease", "solver", "quantlib.solvers.quantease:solve_gptq", "GPTQ+QuantEase", needs_hessian=True,
    options=_QUANTEASE_CORE,
    help="QuantEase sweeps started from the LDLQ (= GPTQ) solution and grid",
))

register(Component(
    "spqr", "solver", "quantlib.solvers.spqr:solve", "SpQR", needs_hessian=True,
    # SpQR's own quantizer (tight range, real zero point) fitted per small group: no parameter init to choose.
    uses_uniform_grid=False,
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
    help="GPTQ/LDLQ error feedback with small groups, quantized statistics and unstructured full-precision outliers",
))
