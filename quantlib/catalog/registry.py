"""The catalog's machinery: what an entry is (`Component`, `Option`, `Statistic`, `Format`), the registries, and
the lookups every other module uses. The entries themselves live beside it, one module per family
(`quantlib.catalog.uniform`, `lookup_table`, `binary_coding`), with the statistics (`statistics`), the layer
formats (`formats`) and the pack formats (`pack_formats`); `quantlib.catalog` imports them all, so importing any
catalog module registers every entry. Pure Python (no torch), so the Snakefile validates names cheaply and every
refusal of a combination happens when a name is parsed, before any job. Implementations are imported lazily from
their `impl` paths ("module:attribute").

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
import re
from dataclasses import dataclass
from typing import Any, Callable

from quantlib.catalog.names import Option, register_option, stats_path
from quantlib.errors import ConfigError


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
    # Preprocessors: "layer" (`preprocess(W, task) -> W'`, per subgroup) or "model" (`apply(model, spec, tokens)`,
    # the whole model transformed in memory before the walk, e.g. QuaRot's rotations).
    scope: str = "layer"

    def load(self) -> Callable:
        return load_impl(self.impl)

    def format_for(self, spec) -> str:
        return self.format(spec) if callable(self.format) else self.format


HANDS = ("hessian", "layer_stats", "token_weights")


def _no_params(spec, settings) -> dict:
    return {}


@dataclass(frozen=True)
class Statistic:
    """A statistic of the unquantized model, computed once per model and calibration by `rules/stats.smk` and shared
    by every method that reads it. The entry carries the statistic's whole meaning; no other module names it.

    - `impl` computes it: `compute(model, tokens, out_dir, meta, params, inputs, device, chunk_tokens, progress,
      access)`, and `streams` for a `backward` statistic; `reader` opens a saved artifact (a `quantlib.stats.artifacts.StatisticReader`).
    - `params`: integer parameters written into the artifact's name as `.{param}{value}` tokens (e.g. `.g4`);
      `choose(spec, settings)` picks them for a spec, or for none (`spec` None: the statistic is another's
      dependency) from `settings`, the config's settings of the statistics ({statistic: {key: value}}; None when they
      are not known, as in a quantize job, where only what the spec decides is returned and checked).
    - `needs`: other statistics it is computed from. `check(spec, params, settings)` refuses combinations with a
      ConfigError (spec None for a dependency).
    - `read_by(spec)`: whether a spec reads it although no component names it in its `needs` (what the runner's
      contract options imply, e.g. the FP model's Hessians under `fpin`).
    - `hands`: what the runner gives the solver from it, through the reader: `hessian` (a layer's Hessian, in place
      of the runner's own capture), `layer_stats` (per-weight tensors merged into the layer task's `stats`),
      `token_weights` (per-token weights of the runner's own Hessian capture).
    - `block_by_block`: computed one decoder block at a time (the job reads the model lazily); else the job holds the
      whole model. Memory model: `read_bytes(shapes, params)` is what a quantize job holds of it per block,
      `compute_bytes(shapes, params)` what its own job holds beyond a calibration pass of one block (block by block)
      or beyond the whole model and one window's forward pass (whole model); `shapes` is a `quantlib.jobs.memory.Shapes`.
    - `backward`: computed with the streamed backward (`quantlib.stats.streamed`): every block's inputs are kept over
      all windows, in memory or on disk (`streams`), and the memory model counts them (`backward_phases`) besides
      `compute_bytes` per block.
    """

    name: str
    impl: str
    reader: str
    label: str
    help: str = ""
    params: tuple[str, ...] = ()
    choose: Callable[[Any, dict | None], dict] = _no_params
    needs: tuple[str, ...] = ()
    check: Callable[[Any, dict, dict | None], None] | None = None
    read_by: Callable[[Any], bool] | None = None
    hands: tuple[str, ...] = ()
    block_by_block: bool = False
    backward: bool = False
    read_bytes: Callable[[Any, dict], int] = lambda shapes, params: 0
    compute_bytes: Callable[[Any, dict], int] = lambda shapes, params: 0


@dataclass(frozen=True)
class Format:
    """A stored representation of a quantized layer: `impl` names its class (`from_tensors`, `to_tensors`, `meta`,
    `dequantize`, `bits_per_weight`)."""

    name: str
    impl: str
    label: str
    help: str = ""
    # What a table's Group column says of a layer in this format, from its spec; None: the setting's group size.
    grouping: Callable[[Any], str] | None = None

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

def register(component: Component) -> Component:
    registry = _REGISTRIES[component.kind]
    if component.name in RESERVED or any(component.name in r for r in _REGISTRIES.values()):
        raise ValueError(f"method name '{component.name}' is already taken")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", component.name):
        raise ValueError(f"method name '{component.name}' must be lower case letters, digits and '_'")
    if component.mode not in MODES:
        raise ValueError(f"{component.name}: mode must be one of {MODES}")
    if component.scope not in ("layer", "model"):
        raise ValueError(f"{component.name}: scope must be 'layer' or 'model'")
    for need in component.needs + tuple(n for o in component.options for n in o.removes_needs):
        if need not in NEEDS and need not in STATISTICS:
            raise ValueError(f"{component.name}: unknown need '{need}' (known: {', '.join([*NEEDS, *STATISTICS])})")
    for o in component.options:
        register_option(o, component.name)
    registry[component.name] = component
    return component


def register_statistic(stat: Statistic) -> Statistic:
    if stat.name in STATISTICS or stat.name in NEEDS or not re.fullmatch(r"[a-z][a-z0-9_]*", stat.name):
        raise ValueError(f"statistic name '{stat.name}' is taken or not lower case letters, digits and '_'")
    unknown = [n for n in stat.needs if n not in STATISTICS] + [h for h in stat.hands if h not in HANDS]
    if unknown:
        raise ValueError(f"statistic '{stat.name}': unknown {unknown} (needs: statistics registered before it; "
                         f"hands: {', '.join(HANDS)})")
    STATISTICS[stat.name] = stat
    return stat


def stat_name(stat: str, **params: int) -> str:
    """The name of a statistics artifact: the statistic, then its parameters (`{stat}.g4` for a parameter g of 4)."""
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


def statistic_params(stat: str, spec, settings: dict | None) -> dict[str, int]:
    """The parameters of statistic `stat` for `spec` (None: as a dependency) under `settings`, checked."""
    entry = STATISTICS[stat]
    params = entry.choose(spec, settings)
    if settings is not None and set(params) != set(entry.params):
        raise ValueError(f"statistic '{stat}' chose the parameters {sorted(params)}, not {list(entry.params)}")
    if entry.check is not None:
        entry.check(spec, params, settings)
    return params


def stat_dependencies(name: str, calib_name: str, settings: dict) -> dict[str, str]:
    """{statistic: artifact path} of the statistics that artifact `name` is computed from, each checked against it."""
    stat, params = parse_stat_name(name)
    entry = STATISTICS[stat]
    if entry.check is not None:
        entry.check(None, params, settings)
    return {need: stats_path(stat_name(need, **statistic_params(need, None, settings)), calib_name)
            for need in entry.needs}


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
