"""Every token of a short name and every `results/` path template, rendered and parsed here; how the tokens compose
into a whole short name (which one names the solver, the init, a preprocessor, the `.kd` and `.pack-` parts) is
`QuantSpec.short_name` / `QuantSpec.parse` in `quantlib.catalog.spec`, the one place that knows the catalog's
components. Pure Python (no torch): the Snakefile, the config and the specs all read names through these two.

Tokens (dot-separated parts of a short name):
    w{bits}[g{group}]                    a bit width and group size (no `g`: per channel, group size -1)
    {dataset}.n{N}.L{L}[.s{seed}]        calibration windows
    {token}{number}, {token}             an option (`Option`: one token means one setting across the catalog);
                                         numbers use `p` for the decimal point (0.01 -> 0p01)
Protocols (parts of result paths): `{dataset}.L{seqlen}[.nw{n}]` (perplexity), `{task}.{shots}shot[.lim{n}]`
(lm-eval).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from quantlib.errors import ConfigError

# Dot-separated parts, none empty (a short name has no empty token).
MODEL_KEY_RE = r"[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9_-]+)*"
DATASET_KEY_RE = r"[a-z0-9][a-z0-9_-]*"
# lm-eval task and group names as lm-eval spells them (no dots: dots separate the parts of a protocol name).
TASK_KEY_RE = r"[A-Za-z0-9][A-Za-z0-9_-]*"
# A statistic's name: its kind, then its own parameters as tokens (e.g. `hessian`, later `saliency.g4`).
STAT_RE = r"[a-z][a-z0-9_]*(?:\.[A-Za-z]+[0-9]+)*"
# The `quant_method` tag of a quantlib checkpoint's quantization_config, and the report file of a packed one.
QUANT_METHOD = "quantlib"
PACK_REPORT = "pack_report.json"
NUMBER_RE = r"-?[0-9]+(?:p[0-9]+)?(?:e-?[0-9]+)?"
_SETTING_RE = re.compile(r"w([0-9]+)(?:g([0-9]+))?")


# ------------------------------------------------------------------------------------------------ numbers

def format_number(value: float | int) -> str:
    """Render a number for a name token: no dots (names are dot-separated), so 0.01 -> '0p01', 1e-05 -> '1e-05'."""
    if isinstance(value, bool):
        raise TypeError("booleans are flags, not numbers")
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = format(float(value), ".10g")
    return text.replace("e-0", "e-").replace("e+0", "e").replace("e+", "e").replace(".", "p")


def parse_number(text: str, kind: type) -> float | int:
    """The value of a token's number (`0p01` -> 0.01); a ConfigError when it is not one of `kind`."""
    if kind is int and re.fullmatch(r"-?[0-9]+", text):
        return _integer(text, text)  # exactly: through a float, integers above 2**53 would not read back
    value = float(text.replace("p", "."))
    if kind is int:
        if not value.is_integer():
            raise ConfigError(f"'{text}' is not an integer")
        return int(value)
    return value


def _integer(digits: str, token: str) -> int:
    """The integer of a token's digits; a ConfigError naming the token when Python refuses to read that many."""
    try:
        return int(digits)
    except ValueError:
        raise ConfigError(f"'{token}': a number of {len(digits)} digits is out of range") from None


# ------------------------------------------------------------------------------------------------ options

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
        try:
            return (True, parse_number(m.group(1), self.kind))
        except ConfigError as exc:  # `it1p5`, `it1e999`: the token is this option's, with no value of its kind
            raise ConfigError(f"option token '{tok}' ({self.key}): {exc}") from None

    def coerce(self, value: Any) -> Any:
        """Check a value given in the config and convert it to the option's type."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"option '{self.key}' takes true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"option '{self.key}' takes a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # `nan`, `inf`: no name token writes them
            raise ConfigError(f"option '{self.key}' takes a finite number, got {value!r}")
        if self.kind is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"option '{self.key}' takes an integer, got {value!r}")
        try:
            value = self.kind(value)
        except OverflowError:  # an integer beyond a float's range
            raise ConfigError(f"option '{self.key}' takes a number in a float's range, got an integer of "
                              f"{value.bit_length()} bits") from None
        if self.kind is float:
            # The value its short name carries (10 significant digits), so that the name reads back as this spec
            # (the largest floats round up to infinity).
            rounded = parse_number(format_number(value), float)
            if not math.isfinite(rounded):
                raise ConfigError(f"option '{self.key}' takes a number in a float's range, got {value!r}")
            value = rounded
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"option '{self.key}' must be one of {list(self.choices)}, got {value!r}")
        return value

    def describe(self) -> str:
        return "/".join(self.tokens()) if self.kind is bool else f"{self.token}<number>"


# Every option token in the catalog -> its option: one token means one setting everywhere.
_TOKENS: dict[str, Option] = {}


def register_option(o: Option, owner: str) -> None:
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


def known_option(key: str) -> Option | None:
    """The catalog's option with this key, if any."""
    return next((o for o in _TOKENS.values() if o.key == key), None)


def option_for_token(tok: str) -> Option | None:
    """The catalog's option whose token (with a number, for numeric options) this is."""
    for o in _TOKENS.values():
        if re.fullmatch(f"(?:{o.pattern()})", tok):
            return o
    return None


# ------------------------------------------------------------------------------------------------ settings

def setting_token(bits: int, group_size: int) -> str:
    """`w3g64`, or `w3` per channel (group size -1)."""
    return f"w{bits}" + (f"g{group_size}" if group_size > 0 else "")


def parse_setting(token: str) -> tuple[int, int] | None:
    """(bits, group_size) of a `w{bits}[g{group}]` token; None when the token is not one."""
    m = _SETTING_RE.fullmatch(token)
    if not m:
        return None
    return _integer(m.group(1), token), _integer(m.group(2), token) if m.group(2) else -1


def require_setting(token: str) -> tuple[int, int]:
    parsed = parse_setting(token)
    if parsed is None:
        raise ConfigError(f"'{token}' is not a setting (w{{bits}} or w{{bits}}g{{group}})")
    return parsed


# ------------------------------------------------------------------------------------------------ calibration

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


def mixture_counts(parts: dict[str, float], n: int) -> dict[str, int]:
    """Windows per part of a mixture: n split in proportion to the weights, rounded by largest remainder (ties to
    the part listed first), so the counts always sum to n."""
    total = sum(parts.values())
    exact = {k: n * w / total for k, w in parts.items()}
    counts = {k: int(v) for k, v in exact.items()}
    order = sorted(parts, key=lambda k: (counts[k] - exact[k], list(parts).index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def parse_calib_name(name: str) -> tuple[str, CalibSpec]:
    """`{model}.{dataset}.n{n}.L{L}[.s{seed}]` -> (model, CalibSpec)."""
    tokens = name.split(".")
    found = find_calib(tokens)
    if found is None:
        raise ConfigError(f"'{name}' is not a calibration name ({{model}}.{{dataset}}.n{{n}}.L{{L}}[.s{{seed}}])")
    start, end, calib = found
    if end != len(tokens) or start == 0:
        raise ConfigError(f"'{name}' is not a calibration name ({{model}}.{{dataset}}.n{{n}}.L{{L}}[.s{{seed}}])")
    model = ".".join(tokens[:start])
    if f"{model}.{calib.short_name()}" != name:
        raise ConfigError(f"'{name}' is not in canonical form; expected '{model}.{calib.short_name()}'")
    return model, calib


def find_calib(tokens: list[str]):
    """Locate `{dataset}.n{n}.L{L}[.s{seed}]`; returns (index of dataset, index after it, CalibSpec)."""
    for i in range(1, len(tokens) - 2):
        n = re.fullmatch(r"n([0-9]+)", tokens[i + 1])
        L = re.fullmatch(r"L([0-9]+)", tokens[i + 2])
        if n and L and re.fullmatch(DATASET_KEY_RE, tokens[i]):
            end, seed = i + 3, 0
            if end < len(tokens) and (s := re.fullmatch(r"s([0-9]+)", tokens[end])):
                end, seed = end + 1, _integer(s.group(1), tokens[end])
            return i, end, CalibSpec(tokens[i], _integer(n.group(1), tokens[i + 1]),
                                     _integer(L.group(1), tokens[i + 2]), seed)
    return None


# ------------------------------------------------------------------------------------------------ protocols

def ppl_protocol_name(dataset: str, seqlen: int, max_windows: int | None) -> str:
    """Names the perplexity protocol in result paths, e.g. `wikitext2.L512.nw40`."""
    return f"{dataset}.L{seqlen}" + (f".nw{max_windows}" if max_windows else "")


def parse_ppl_protocol(name: str) -> tuple[str, int, int | None]:
    m = re.fullmatch(rf"({DATASET_KEY_RE})\.L([0-9]+)(?:\.nw([0-9]+))?", name)
    if not m:
        raise ConfigError(f"'{name}' is not a perplexity protocol name ({{dataset}}.L{{seqlen}}[.nw{{windows}}])")
    return m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None


def lmeval_protocol_name(task: str, num_fewshot: int, limit: int | None) -> str:
    """Names an lm-eval evaluation in result paths, e.g. `arc_easy.0shot.lim25`, `mmlu.5shot`."""
    return f"{task}.{num_fewshot}shot" + (f".lim{limit}" if limit else "")


def parse_lmeval_protocol(name: str) -> tuple[str, int, int | None]:
    m = re.fullmatch(rf"({TASK_KEY_RE})\.([0-9]+)shot(?:\.lim([0-9]+))?", name)
    if not m:
        raise ConfigError(f"'{name}' is not an lm-eval protocol name ({{task}}.{{shots}}shot[.lim{{limit}}])")
    return m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None


# ------------------------------------------------------------------------------------------------ paths
# Templates with Snakemake wildcards in braces. The rules use them as they are; the helpers below fill them in.

class PATHS:
    models = "{resources}/models/{model}"
    datasets = "{resources}/datasets/{dataset}.parquet"
    calibration = "results/calibration/{calib}.pt"
    calibration_manifest = "results/calibration/{calib}.json"
    evaldata = "results/evaldata/{model}/{dataset}.L{seqlen}.pt"
    stats = "results/stats/{stat}/{calib}"
    quantized = "results/quantized/{name}"
    packed = "results/packed/{format}/{name}"
    ppl = "results/ppl/{protocol}/{anyname}.json"
    lmeval = "results/lmeval/{protocol}/{anyname}.json"
    tables = "results/tables/{table}.{ext}"
    benchmark_summary = "results/benchmarks/summary.{ext}"

    @staticmethod
    def log(rule: str, job: str) -> str:
        return f"results/logs/{rule}/{job}.log"

    @staticmethod
    def benchmark(rule: str, job: str) -> str:
        return f"results/benchmarks/{rule}/{job}.tsv"


def calibration_path(calib_name: str) -> str:
    return PATHS.calibration.format(calib=calib_name)


def calibration_manifest_path(calib_name: str) -> str:
    return PATHS.calibration_manifest.format(calib=calib_name)


def stats_path(stat: str, calib_name: str) -> str:
    return PATHS.stats.format(stat=stat, calib=calib_name)


def quantized_path(name: str) -> str:
    return PATHS.quantized.format(name=name)


def packed_path(fmt: str, name: str) -> str:
    """The packed checkpoint of the quantized model `name` (without its `.pack-` token) in format `fmt`."""
    return PATHS.packed.format(format=fmt, name=name)


def ppl_path(protocol: str, name: str) -> str:
    return PATHS.ppl.format(protocol=protocol, anyname=name)


def lmeval_path(protocol: str, name: str) -> str:
    return PATHS.lmeval.format(protocol=protocol, anyname=name)


def evaldata_path(model: str, dataset: str, seqlen: int) -> str:
    return PATHS.evaldata.format(model=model, dataset=dataset, seqlen=seqlen)


def model_path(resources: str, model: str) -> str:
    return PATHS.models.format(resources=resources, model=model)


def dataset_path(resources: str, dataset: str) -> str:
    return PATHS.datasets.format(resources=resources, dataset=dataset)


def table_path(table: str, ext: str) -> str:
    return PATHS.tables.format(table=table, ext=ext)
