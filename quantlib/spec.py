"""QuantSpec: everything that determines a quantized model, rendered as a short name and parsed back.

Grammar (dot-separated; defaults are left out so names stay short and stable):

    {model}.fp                                                     the unquantized model
    {model}[.{calib}][.{preprocess}...].{solver}[.{init}].w{bits}[g{group}][.{option}...]
    calib = {dataset}.n{nsamples}.L{seqlen}[.s{seed}]

e.g. `llama-2-7b.c4.n128.L2048.ldlq.neuqi.w3g128`, `smollm2-135m.rtn.w4g64` (RTN needs no calibration).
The names are Snakemake wildcards: the file tree under results/ is the experiment table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from . import methods
from .errors import ConfigError

MODEL_KEY_RE = r"[a-z0-9][a-z0-9_.-]*"
DATASET_KEY_RE = r"[a-z0-9][a-z0-9_-]*"
_BITS_RE = re.compile(r"w([0-9]+)(?:g([0-9]+))?")


@dataclass(frozen=True)
class CalibSpec:
    """Calibration data: n windows of L tokens drawn from a dataset with a seed."""

    dataset: str
    nsamples: int
    seqlen: int
    seed: int = 0

    def __post_init__(self):
        if not re.fullmatch(DATASET_KEY_RE, self.dataset):
            raise ConfigError(f"dataset key '{self.dataset}' must match {DATASET_KEY_RE}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ConfigError(f"calibration needs nsamples >= 1 and seqlen >= 2, got n={self.nsamples} L={self.seqlen}")
        if self.seed < 0:
            raise ConfigError(f"calibration seed must be >= 0, got {self.seed}")

    def short_name(self) -> str:
        name = f"{self.dataset}.n{self.nsamples}.L{self.seqlen}"
        return name + (f".s{self.seed}" if self.seed else "")


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

    # ------------------------------------------------------------------ construction and validation
    @classmethod
    def build(cls, model: str, solver: str = "fp", bits: int | None = None, group_size: int = -1,
              init: str = "minmax", preprocess=(), calib: CalibSpec | None = None,
              options: dict[str, Any] | None = None) -> "QuantSpec":
        """Make a canonical spec: calibration dropped when nothing uses it, default options dropped."""
        spec = cls(model=model, solver=solver, bits=bits, group_size=group_size, init=init,
                   preprocess=tuple(preprocess), calib=calib)
        if solver == "fp":
            if options:
                raise ConfigError("the unquantized model ('fp') takes no options")
            return replace(spec, calib=None, bits=None, group_size=-1)
        if not spec.needs_hessian:
            spec = replace(spec, calib=None)
        known = spec.option_defs()
        clean = {}
        for key, value in (options or {}).items():
            if key not in known:
                raise ConfigError(f"unknown option '{key}' for {spec.describe()}; allowed: {', '.join(sorted(known)) or 'none'}")
            value = known[key].coerce(value)
            if value != known[key].default_for(spec):
                clean[key] = value
        spec = replace(spec, options=tuple(sorted(clean.items())))
        spec.validate()
        return spec

    def validate(self) -> None:
        if not re.fullmatch(MODEL_KEY_RE, self.model):
            raise ConfigError(f"model key '{self.model}' must match {MODEL_KEY_RE}")
        if self.solver == "fp":
            return
        solver = methods.component("solver", self.solver)
        methods.component("init", self.init)
        for p in self.preprocess:
            methods.component("preprocess", p)
        if self.bits is None or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size must be -1 (per channel) or a positive integer, got {self.group_size}")
        if not solver.uses_uniform_grid and self.init != "minmax":
            raise ConfigError(f"solver '{self.solver}' does not use a uniform grid, so it takes no init (got '{self.init}')")
        if self.needs_hessian and self.calib is None:
            raise ConfigError(f"{self.describe()} needs calibration data, and the spec has none")

    # ------------------------------------------------------------------ derived facts
    @property
    def is_fp(self) -> bool:
        return self.solver == "fp"

    def components(self) -> list[methods.Component]:
        if self.is_fp:
            return []
        return ([methods.component("preprocess", p) for p in self.preprocess]
                + [methods.component("solver", self.solver), methods.component("init", self.init)])

    @property
    def needs_hessian(self) -> bool:
        return any(c.needs_hessian for c in self.components())

    def option_defs(self) -> dict[str, methods.Option]:
        defs = {o.key: o for o in methods.COMMON_OPTIONS}
        for comp in self.components():
            for o in comp.options:
                defs[o.key] = o
        return defs

    def opt(self, key: str) -> Any:
        """The value of an option, default included."""
        defs = self.option_defs()
        if key not in defs:
            raise KeyError(f"{self.describe()} has no option '{key}'")
        return dict(self.options).get(key, defs[key].default_for(self))

    def describe(self) -> str:
        if self.is_fp:
            return f"unquantized {self.model}"
        return f"{'+'.join(self.preprocess + (self.solver,))} ({self.init} init)"

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
        parts.append(f"w{self.bits}" + (f"g{self.group_size}" if self.group_size > 0 else ""))
        defs = self.option_defs()
        parts.extend(defs[key].render(value) for key, value in self.options)
        return ".".join(parts)

    def calib_name(self) -> str | None:
        """Name of the calibration artifact this spec reads (model + calibration settings)."""
        return None if self.calib is None else f"{self.model}.{self.calib.short_name()}"

    @classmethod
    def parse(cls, name: str) -> "QuantSpec":
        """Read a short name back. Only canonical names are accepted, so one spec has exactly one name."""
        tokens = name.split(".")
        if tokens[-1] == "fp":
            spec = cls.build(model=".".join(tokens[:-1]))
        else:
            spec = _parse_quantized(name, tokens)
        canonical = spec.short_name()
        if canonical != name:
            raise ConfigError(f"'{name}' is not in canonical form; the same settings are named '{canonical}'")
        return spec


def parse_calib_name(name: str) -> tuple[str, CalibSpec]:
    """`{model}.{dataset}.n{n}.L{L}[.s{seed}]` -> (model, CalibSpec)."""
    tokens = name.split(".")
    found = _find_calib(tokens)
    if found is None:
        raise ConfigError(f"'{name}' is not a calibration name ({{model}}.{{dataset}}.n{{n}}.L{{L}}[.s{{seed}}])")
    start, end, calib = found
    if end != len(tokens) or start == 0:
        raise ConfigError(f"'{name}' is not a calibration name ({{model}}.{{dataset}}.n{{n}}.L{{L}}[.s{{seed}}])")
    model = ".".join(tokens[:start])
    if f"{model}.{calib.short_name()}" != name:
        raise ConfigError(f"'{name}' is not in canonical form; expected '{model}.{calib.short_name()}'")
    return model, calib


def _find_calib(tokens: list[str]):
    """Locate `{dataset}.n{n}.L{L}[.s{seed}]`; returns (index of dataset, index after it, CalibSpec)."""
    for i in range(1, len(tokens) - 2):
        n = re.fullmatch(r"n([0-9]+)", tokens[i + 1])
        L = re.fullmatch(r"L([0-9]+)", tokens[i + 2])
        if n and L and re.fullmatch(DATASET_KEY_RE, tokens[i]):
            end, seed = i + 3, 0
            if end < len(tokens) and (s := re.fullmatch(r"s([0-9]+)", tokens[end])):
                end, seed = end + 1, int(s.group(1))
            return i, end, CalibSpec(tokens[i], int(n.group(1)), int(L.group(1)), seed)
    return None


def _parse_quantized(name: str, tokens: list[str]) -> QuantSpec:
    def fail(why: str):
        raise ConfigError(f"cannot read short name '{name}': {why}")

    found = _find_calib(tokens)
    if found is not None:
        start, pos, calib = found
        model_tokens = tokens[:start]
    else:
        calib = None
        # Without calibration the model key ends where the first method name begins.
        pos = next((i for i, t in enumerate(tokens) if i > 0 and (t in methods.SOLVERS or t in methods.PREPROCESSORS)), None)
        if pos is None:
            fail(f"no solver named; known solvers: {', '.join(sorted(methods.SOLVERS))}")
        model_tokens = tokens[:pos]
    if not model_tokens:
        fail("no model key before the method")
    preprocess = []
    while pos < len(tokens) and tokens[pos] in methods.PREPROCESSORS:
        preprocess.append(tokens[pos])
        pos += 1
    if pos >= len(tokens) or tokens[pos] not in methods.SOLVERS:
        got = tokens[pos] if pos < len(tokens) else "nothing"
        fail(f"expected a solver at '{got}'; known solvers: {', '.join(sorted(methods.SOLVERS))}")
    solver = tokens[pos]
    pos += 1
    init = "minmax"
    if pos < len(tokens) and tokens[pos] in methods.INITS:
        init = tokens[pos]
        pos += 1
    if pos >= len(tokens) or not (m := _BITS_RE.fullmatch(tokens[pos])):
        fail("expected bits and group as 'w{bits}' or 'w{bits}g{group}' after the method")
    bits, group = int(m.group(1)), int(m.group(2)) if m.group(2) else -1
    pos += 1
    base = QuantSpec(model=".".join(model_tokens), solver=solver, bits=bits, group_size=group, init=init,
                     preprocess=tuple(preprocess), calib=calib)
    defs = base.option_defs()
    options: dict[str, Any] = {}
    for tok in tokens[pos:]:
        hits = [(o.key, v) for o in defs.values() for ok, v in [o.match(tok, o.default_for(base))] if ok]
        if len(hits) != 1:
            fail(f"unknown option token '{tok}'; this method takes: "
                 + ", ".join(sorted(o.render(o.default_for(base)) if o.kind is bool else o.token + "<number>"
                                    for o in defs.values())))
        key, value = hits[0]
        if key in options:
            fail(f"option '{key}' given twice")
        options[key] = value
    if calib is not None and not base.needs_hessian:
        fail(f"{base.describe()} uses no calibration data; drop '.{calib.short_name()}'")
    return QuantSpec.build(model=base.model, solver=solver, bits=bits, group_size=group, init=init,
                           preprocess=preprocess, calib=calib, options=options)


def ppl_protocol_name(dataset: str, seqlen: int, max_windows: int | None) -> str:
    """Names the perplexity protocol in result paths, e.g. `wikitext2.L512.nw40`."""
    return f"{dataset}.L{seqlen}" + (f".nw{max_windows}" if max_windows else "")


def parse_ppl_protocol(name: str) -> tuple[str, int, int | None]:
    m = re.fullmatch(rf"({DATASET_KEY_RE})\.L([0-9]+)(?:\.nw([0-9]+))?", name)
    if not m:
        raise ConfigError(f"'{name}' is not a perplexity protocol name ({{dataset}}.L{{seqlen}}[.nw{{windows}}])")
    return m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None


# lm-eval task and group names as lm-eval spells them (no dots: dots separate the parts of a protocol name).
TASK_KEY_RE = r"[A-Za-z0-9][A-Za-z0-9_-]*"


def lmeval_protocol_name(task: str, num_fewshot: int, limit: int | None) -> str:
    """Names an lm-eval evaluation in result paths, e.g. `arc_easy.0shot.lim25`, `mmlu.5shot`."""
    return f"{task}.{num_fewshot}shot" + (f".lim{limit}" if limit else "")


def parse_lmeval_protocol(name: str) -> tuple[str, int, int | None]:
    m = re.fullmatch(rf"({TASK_KEY_RE})\.([0-9]+)shot(?:\.lim([0-9]+))?", name)
    if not m:
        raise ConfigError(f"'{name}' is not an lm-eval protocol name ({{task}}.{{shots}}shot[.lim{{limit}}])")
    return m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None
