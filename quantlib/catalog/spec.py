"""QuantSpec: everything that determines a quantized model, rendered as a short name and parsed back.

Grammar (dot-separated; defaults are left out so names stay short and stable):

    {model}.fp                                                     the unquantized model
    {model}[.{calib}][.{preprocess}...].{solver}[.{init}].w{bits}[g{group}][.{option}...]
    calib = {dataset}.n{nsamples}.L{seqlen}[.s{seed}]

e.g. `llama-2-7b.c4.n128.L2048.ldlq.neuqi.w3g128`, `smollm2-135m.rtn.w4g64` (RTN needs no calibration).
The names are Snakemake wildcards: the file tree under results/ is the experiment table. This module composes a
whole name from its tokens and reads it back (`QuantSpec.short_name`, `QuantSpec.parse`); each token is rendered and
parsed by `quantlib.catalog.names`; what each method needs and which options it takes come from its catalog entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from quantlib.catalog import contract, names, registry
from quantlib.catalog.kd import DistillSpec, parse_distill
from quantlib.catalog.names import MODEL_KEY_RE, CalibSpec, find_calib
from quantlib.catalog.pack_formats import packable
from quantlib.errors import ConfigError

# What makes a spec read calibration windows (the data of the name's calibration part).
_DATA_NEEDS = {"calibration", "hessian", "fp_targets"}


PACK_TOKEN = "pack-"


@dataclass(frozen=True)
class QuantSpec:
    model: str
    solver: str = "fp"
    bits: int | None = None
    group_size: int = -1
    init: str = "minmax"
    preprocess: tuple[str, ...] = ()
    calib: CalibSpec | None = None
    # Non-default options only, sorted by key: equal specs have equal names.
    options: tuple[tuple[str, Any], ...] = ()
    distill: DistillSpec | None = None  # a `.kd` stage after quantization
    pack: str | None = None  # a final `.pack-{format}`: the checkpoint in an external layout (quantlib.checkpoint.pack)

    # ------------------------------------------------------------------ construction and validation
    @classmethod
    def build(cls, model: str, solver: str = "fp", bits: int | None = None, group_size: int = -1,
              init: str = "minmax", preprocess=(), calib: CalibSpec | None = None,
              options: dict[str, Any] | None = None, distill: DistillSpec | None = None) -> "QuantSpec":
        """Make a canonical spec: calibration dropped when nothing uses it, default options dropped."""
        if distill is not None:
            base = cls.build(model, solver, bits, group_size, init, preprocess, calib, options)
            if base.is_fp:
                raise ConfigError("distillation (kd) trains a quantized model's scales; the unquantized model has none")
            spec = replace(base, distill=distill)
            contract.check_distill(spec)
            return spec
        spec = cls(model=model, solver=solver, bits=bits, group_size=group_size, init=init,
                   preprocess=tuple(preprocess), calib=calib)
        if solver == "fp":
            if options:
                raise ConfigError("the unquantized model ('fp') takes no options")
            spec = replace(spec, calib=None, bits=None, group_size=-1)
            spec.validate()  # the model key (`QuantSpec.parse("!.fp")` accepted it)
            return spec
        spec._check_components()
        if not spec.uses_calibration:
            spec = replace(spec, calib=None)
        known = spec.option_defs()
        clean = {}
        for key, value in (options or {}).items():
            if key not in known:
                raise ConfigError(spec._not_applicable(names.known_option(key), f"option '{key}'", as_keys=True))
            value = known[key].coerce(value)
            if value != known[key].default_for(spec):
                clean[key] = value
        spec = replace(spec, options=tuple(sorted(clean.items())))
        spec.validate()
        return spec

    def _check_components(self) -> None:
        registry.component("solver", self.solver)
        registry.component("init", self.init)
        for p in self.preprocess:
            registry.component("preprocess", p)

    def validate(self) -> None:
        """Every refusal of a setting or a combination, with a one-line message (before any job runs)."""
        if not re.fullmatch(MODEL_KEY_RE, self.model):
            raise ConfigError(f"model key '{self.model}' must match {MODEL_KEY_RE}")
        # A short name's model key ends where the first method name begins, and `kd` starts its distillation part.
        clash = [t for t in self.model.split(".") if t == "kd" or t in registry.SOLVERS or t in registry.PREPROCESSORS]
        if clash:
            raise ConfigError(f"model key '{self.model}' holds '{clash[0]}', which a short name reads as a method "
                              "name (or the start of its kd part); rename the model")
        if self.solver == "fp":
            return
        self._check_components()
        solver = registry.component("solver", self.solver)
        if self.bits is None or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size must be -1 (per channel) or a positive integer, got {self.group_size}")
        if not solver.takes_init and self.init != "minmax":
            raise ConfigError(f"solver '{self.solver}' chooses its own grid, so it takes no init (got '{self.init}')")
        if self.preprocess and self.mode == "block":
            raise ConfigError(f"preprocessors ({', '.join(self.preprocess)}) run before a layer-wise solver; "
                              f"'{self.solver}' is block-wise")
        if self.distill is not None:
            contract.check_distill(self)
        if self.uses_calibration and self.calib is None:
            raise ConfigError(f"{self.describe()} needs calibration data, and the spec has none")
        if "fp_inputs" in self.option_defs() and self.opt("fp_inputs") and not self.opt("true_sequential"):
            raise ConfigError("'noseq' has no effect with 'fpin' (every Hessian comes from the unquantized model); "
                              "drop one of them")
        if self.opt("blocks") < 0:
            raise ConfigError(f"blocks is a number of decoder blocks to quantize (0: all), got {self.opt('blocks')}")
        if self.mode == "block":
            contract.check_block_training(self)
        else:
            contract.check_forward(self)
        for comp in self.components():
            if comp.check:
                comp.check(self)

    # ------------------------------------------------------------------ derived facts
    @property
    def is_fp(self) -> bool:
        return self.solver == "fp"

    def components(self) -> list[registry.Component]:
        """Preprocessors, the solver and (when the solver takes one) the init."""
        if self.is_fp:
            return []
        solver = registry.component("solver", self.solver)
        out = [registry.component("preprocess", p) for p in self.preprocess] + [solver]
        if solver.takes_init:
            out.append(registry.component("init", self.init))
        return out

    def _component_needs(self) -> set[str]:
        out = {n for c in self.components() for n in c.needs}
        defs = self._own_option_defs()
        for key, _ in self.options:
            if key in defs:
                out -= set(defs[key].removes_needs)
        return out

    @property
    def needs(self) -> frozenset[str]:
        """Everything the spec reads (statistics by their catalog name): its components' needs, and the statistics
        whose catalog entry says the spec reads them (`read_by`: where the runner takes Hessians from, say)."""
        out = self._component_needs()
        out |= {name for name, entry in registry.STATISTICS.items() if entry.read_by and entry.read_by(self)}
        return frozenset(out)

    @property
    def needs_hessian(self) -> bool:
        return "hessian" in self._component_needs()

    @property
    def mode(self) -> str:
        """How the runner walks the model: `block` (block-wise solver), `layer` (Hessian-based) or `data_free`."""
        if self.is_fp:
            return "data_free"
        if registry.component("solver", self.solver).mode == "block":
            return "block"
        return "layer" if self.needs_hessian else "data_free"

    @property
    def uses_calibration(self) -> bool:
        """Whether the spec depends on calibration data (then its name carries the calibration)."""
        needs = self._component_needs()
        return bool(needs & _DATA_NEEDS) or any(n in registry.STATISTICS for n in needs)

    def statistic_kinds(self) -> list[str]:
        """The catalog keys of the statistics of the FP model that the spec reads, in catalog order."""
        return [s for s in registry.STATISTICS if s in self.needs]

    def statistics(self, settings: dict | None = None) -> list[str]:
        """Names of the statistics artifacts of the FP model that the spec reads, in catalog order (a statistic after
        the ones it is computed from), their parameters chosen by each catalog entry from the spec and `settings`
        (the config's settings of the statistics, {statistic: {key: value}}; None: their defaults)."""
        return [registry.stat_name(stat, **registry.statistic_params(stat, self, settings or {}))
                for stat in self.statistic_kinds()]

    @property
    def needs_tokens(self) -> bool:
        """Whether the quantize job reads the calibration windows themselves (not only statistics made from them)."""
        if self.mode == "block" or "calibration" in self.needs:
            return True
        return self.needs_hessian and not self.opt("fp_inputs")

    @property
    def format(self) -> str:
        return registry.component("solver", self.solver).format_for(self)

    def inputs(self, settings: dict | None = None) -> dict[str, str]:
        """The artifacts the quantize job reads, {kind: path} (statistics under their catalog name, `settings` as in
        `statistics`); the model itself comes from the config."""
        if self.calib is None:
            return {}
        calib = self.calib_name()
        out = {"calib_json": names.calibration_manifest_path(calib)}
        if self.needs_tokens:
            out["calib"] = names.calibration_path(calib)
        for stat in self.statistics(settings):
            out[stat.split(".")[0]] = names.stats_path(stat, calib)
        return out

    def _own_option_defs(self) -> dict[str, names.Option]:
        return {o.key: o for comp in self.components() for o in comp.options}

    def option_defs(self) -> dict[str, names.Option]:
        """The options this spec takes: its components' own, plus the runner's where they have an effect (with the
        solver's own defaults where it declares them)."""
        defs = self._own_option_defs()
        solver = registry.component("solver", self.solver) if not self.is_fp else None
        own_defaults = dict(solver.defaults) if solver else {}
        applied = [] if self.is_fp else [contract.BLOCKS]
        if not self.is_fp and solver.mode != "block":
            applied += list(contract.FORWARD)
        if self.needs_hessian:
            applied.append(contract.DAMP)
            if self.mode == "layer":
                applied += [contract.TRUE_SEQUENTIAL, contract.FP_INPUTS]
                if solver.takes_guided:
                    applied.append(contract.GUIDED)
        for o in applied:
            defs[o.key] = replace(o, default=own_defaults[o.key]) if o.key in own_defaults else o
        return defs

    def opt(self, key: str) -> Any:
        """The value of an option, default included."""
        defs = self.option_defs()
        if key not in defs:
            raise KeyError(f"{self.describe()} has no option '{key}'")
        return dict(self.options).get(key, defs[key].default_for(self))

    def opt_or(self, key: str, default: Any) -> Any:
        """The value of an option, or `default` when the spec does not take it."""
        return self.opt(key) if key in self.option_defs() else default

    def describe(self) -> str:
        if self.is_fp:
            return f"unquantized {self.model}"
        solver = registry.component("solver", self.solver)
        init = f" ({self.init} init)" if solver.takes_init else ""
        return f"{'+'.join(self.preprocess + (self.solver,))}{init}"

    def _not_applicable(self, known: names.Option | None, what: str, as_keys: bool = False) -> str:
        # What the spec takes, in the words of the input: config `options:` keys (as_keys) or short-name tokens.
        listed = sorted(o.key if as_keys else o.describe() for o in self.option_defs().values())
        takes = ("it takes the options: " if as_keys else "it takes: ") + (", ".join(listed) or "none")
        if known is None:
            return f"unknown {what} for {self.describe()}; {takes}"
        short = re.split(r", | \(|: ", known.help)[0]
        return f"{what} ({short}) does not apply to {self.describe()}; {takes}"

    # ------------------------------------------------------------------ names
    def short_name(self) -> str:
        if self.is_fp:
            return f"{self.model}.fp"
        parts = [self.model]
        if self.calib is not None:
            parts.append(self.calib.short_name())
        parts.extend(self.preprocess)
        parts.append(self.solver)
        if self.init != "minmax":
            parts.append(self.init)
        parts.append(names.setting_token(self.bits, self.group_size))
        defs = self.option_defs()
        parts.extend(defs[key].render(value) for key, value in self.options)
        if self.distill is not None:
            parts.append(self.distill.short_name())
        if self.pack is not None:
            parts.append(f"{PACK_TOKEN}{self.pack}")
        return ".".join(parts)

    def unpacked(self) -> "QuantSpec":
        """The quantlib checkpoint a packed spec is written from (itself when it has no `.pack-` part)."""
        return replace(self, pack=None)

    def base(self) -> "QuantSpec":
        """The quantized model a distilled spec starts from (itself when it has no `.kd` part)."""
        return replace(self, distill=None)

    def distill_inputs(self) -> dict[str, str]:
        """What the distill job reads: the base checkpoint and the distillation windows (the FP model, the teacher,
        comes from the config)."""
        windows = f"{self.model}.{self.distill.calib.short_name()}"
        return {"base": names.quantized_path(self.base().short_name()),
                "calib": names.calibration_path(windows), "calib_json": names.calibration_manifest_path(windows)}

    def calib_name(self) -> str | None:
        """Name of the calibration artifact this spec reads (model + calibration settings)."""
        return None if self.calib is None else f"{self.model}.{self.calib.short_name()}"

    @classmethod
    def parse(cls, name: str) -> "QuantSpec":
        """Read a short name back. Only canonical names are accepted, so one spec has exactly one name."""
        tokens = name.split(".")
        if "" in tokens:  # no part of a name is empty (a model key neither)
            raise ConfigError(f"cannot read short name '{name}': " + (
                "it is empty" if not name else "it has an empty part (a '.' at an end, or two in a row)"))
        if len(tokens) > 1 and tokens[-1].startswith(PACK_TOKEN):
            base = cls.parse(".".join(tokens[:-1]))
            fmt = tokens[-1][len(PACK_TOKEN):]
            try:
                reason = packable(base, fmt)
            except ConfigError as exc:  # an unknown format (`pack-`, `pack-zip`): say which name
                raise ConfigError(f"cannot read short name '{name}': {exc}") from None
            if reason is not None:
                raise ConfigError(f"cannot pack '{base.short_name()}' as {fmt}: {reason}")
            spec = replace(base, pack=fmt)
        elif "kd" in tokens[1:]:
            at = tokens.index("kd", 1)
            if "kd" in tokens[at + 1:]:
                raise ConfigError(f"cannot read short name '{name}': distillation (kd) is given twice")
            base = cls.parse(".".join(tokens[:at]))
            spec = replace(base, distill=parse_distill(name, tokens[at + 1:]))
            try:
                contract.check_distill(spec)
            except ConfigError as exc:  # its messages name no token: say which name is refused
                raise ConfigError(f"cannot read short name '{name}': {exc}") from None
        elif tokens[-1] == "fp":
            try:
                spec = cls.build(model=".".join(tokens[:-1]))
            except ConfigError as exc:  # a bad model key (`fp`, `M.fp`): say which name
                raise ConfigError(f"cannot read short name '{name}': {exc}") from None
        else:
            spec = _parse_quantized(name, tokens)
        canonical = spec.short_name()
        if canonical != name:
            raise ConfigError(f"'{name}' is not in canonical form; the same settings are named '{canonical}'")
        return spec


def _parse_quantized(name: str, tokens: list[str]) -> QuantSpec:
    def fail(why: str):
        raise ConfigError(f"cannot read short name '{name}': {why}")

    known_solvers = ", ".join(sorted(registry.SOLVERS))
    try:
        found = find_calib(tokens)
    except ConfigError as exc:  # a calibration part with odd numbers (n0, L1): say which name
        fail(str(exc))
    if found is not None:
        start, pos, calib = found
        model_tokens = tokens[:start]
    else:
        calib = None
        # Without calibration the model key ends where the first method name begins.
        pos = next((i for i, t in enumerate(tokens) if i > 0 and (t in registry.SOLVERS or t in registry.PREPROCESSORS)), None)
        if pos is None:
            fail(f"no solver named; known solvers: {known_solvers}")
        model_tokens = tokens[:pos]
    if not model_tokens:
        fail("no model key before the method")
    preprocess = []
    while pos < len(tokens) and tokens[pos] in registry.PREPROCESSORS:
        preprocess.append(tokens[pos])
        pos += 1
    if pos >= len(tokens) or tokens[pos] not in registry.SOLVERS:
        got = tokens[pos] if pos < len(tokens) else "nothing"
        fail(f"expected a solver at '{got}'; known solvers: {known_solvers}")
    solver = tokens[pos]
    pos += 1
    init = "minmax"
    if pos < len(tokens) and tokens[pos] in registry.INITS:
        init = tokens[pos]
        pos += 1
    try:
        setting = names.parse_setting(tokens[pos]) if pos < len(tokens) else None
    except ConfigError as exc:  # a number too long to read (w99999...)
        fail(str(exc))
    if setting is None:
        got = tokens[pos] if pos < len(tokens) else "nothing"
        # A word in the init's place is most likely a misspelt init.
        if pos < len(tokens) and re.fullmatch(r"[a-z][a-z_]*", got):
            fail(f"'{got}' is not an init (known: {', '.join(sorted(registry.INITS))}) nor a setting "
                 "'w{bits}' or 'w{bits}g{group}'")
        fail(f"expected bits and group as 'w{{bits}}' or 'w{{bits}}g{{group}}' after the method, got '{got}'")
    bits, group = setting
    pos += 1
    base = QuantSpec(model=".".join(model_tokens), solver=solver, bits=bits, group_size=group, init=init,
                     preprocess=tuple(preprocess), calib=calib)
    try:
        base._check_components()
    except ConfigError as exc:
        fail(str(exc))
    defs = base.option_defs()
    options: dict[str, Any] = {}
    for tok in tokens[pos:]:
        try:
            hits = [(o.key, v) for o in defs.values() for ok, v in [o.match(tok, o.default_for(base))] if ok]
        except ConfigError as exc:  # an option's token without a value of its kind (it1p5)
            fail(str(exc))
        if len(hits) != 1:
            fail(base._not_applicable(names.option_for_token(tok), f"option token '{tok}'"))
        key, value = hits[0]
        if key in options:
            fail(f"option '{key}' given twice")
        options[key] = value
    if calib is not None and not base.uses_calibration:
        fail(f"{base.describe()} uses no calibration data; drop '.{calib.short_name()}'")
    try:
        return QuantSpec.build(model=base.model, solver=solver, bits=bits, group_size=group, init=init,
                               preprocess=preprocess, calib=calib, options=options)
    except ConfigError as exc:
        fail(str(exc))
