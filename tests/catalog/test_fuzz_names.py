"""Property-based fuzzing (hypothesis) of short names and of config `methods:` entries.

The property, for every generated input:
- accepted: a short name is read back only in its canonical form (`QuantSpec.parse(name).short_name() == name`)
  and parsing that name again gives the same spec; a config entry expands to specs that each round-trip through
  their short name the same way;
- refused: with `ConfigError` (the project's error, a `QuantlibError`) and never another exception (KeyError,
  ValueError, IndexError, TypeError, OverflowError, re.error, ...). Its message is non-empty and one line, and
  names what it refuses:
    * a name: the message quotes (in '...') a non-empty part of the name (the whole name, a token or a run of
      tokens, or a token's part such as the format of `pack-{format}`); an empty name is quoted as ''. When the name
      holds a junk token (one with a character no part of the grammar has, so it is never valid), that token
      appears in the message.
    * a config entry: the message names the entry (`methods...`) or one of its keys; when the entry is a valid
      one with exactly one change (a key set to a wrong value or type, an unknown key or option added, an option
      set to an odd value), the message names the changed key (an option may be named by its short-name token
      where a refusal is about a combination of tokens, e.g. `'noseq' has no effect with 'fpin'`).

The default run draws a few hundred cases in all (560: derandomized, so CI sees the same cases every time, and
with no example database written into the repository); the same properties run with thousands of cases under
`-m slow` (6000 names, 2500 config entries). What the fuzzing found has plain regression tests at the end of
tests/catalog/test_spec.py (`test_fuzz_findings_*`).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import quantlib.catalog  # noqa: F401  (registers every catalog entry)
from quantlib.catalog import contract, names, registry
from quantlib.catalog.names import Option, format_number
from quantlib.catalog.pack_formats import PACK_FORMATS
from quantlib.catalog.kd import DistillSpec
from quantlib.catalog.spec import QuantSpec
from quantlib.config.experiment import Experiment
from quantlib.errors import ConfigError, QuantlibError

# ------------------------------------------------------------------------------------------------ settings

_COMMON = dict(derandomize=True, database=None, deadline=None, print_blob=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
# The default run: a few hundred cases in all (names are cheap; a config entry costs a schema validation).
NAMES_DEFAULT = settings(max_examples=250, **_COMMON)
TEXT_DEFAULT = settings(max_examples=100, **_COMMON)
CONFIG_DEFAULT = settings(max_examples=150, **_COMMON)
MODEL_KEYS_DEFAULT = settings(max_examples=60, **_COMMON)
# `-m slow`: thousands.
NAMES_SLOW = settings(max_examples=6000, **_COMMON)
CONFIG_SLOW = settings(max_examples=2500, **_COMMON)

# ------------------------------------------------------------------------------------------------ the catalog's pieces

COMPONENTS = [*registry.SOLVERS.values(), *registry.INITS.values(), *registry.PREPROCESSORS.values()]
# The runner's options (damp, noseq, fpin, gq, sym, ...): every Option the contract module defines.
_RUNNER_OPTIONS = [v for v in vars(contract).values() if isinstance(v, Option)]
# Every option a short name or a config entry can carry (one per token: the same token means the same setting).
OPTIONS: list[Option] = list({o.token: o for comp in COMPONENTS for o in comp.options}.values())
OPTIONS += [o for o in _RUNNER_OPTIONS if o.token not in {p.token for p in OPTIONS}]
DISTILL_OPTIONS = list(contract.DISTILL_OPTIONS)
OPTION_KEYS = sorted({o.key for o in OPTIONS + DISTILL_OPTIONS})
# The catalog's option tokens when the strategies were made (other tests register plugins' options later on).
CATALOG_TOKENS = set(names._TOKENS)


def test_the_fuzzer_knows_every_option_token():
    """Every token of the catalog's registry is drawn from (a new option is fuzzed without editing this file)."""
    drawn = {t for o in OPTIONS + DISTILL_OPTIONS for t in o.tokens()}
    assert drawn == CATALOG_TOKENS


# Characters that no part of the grammar uses (tokens are [A-Za-z0-9_-], parts are joined by '.'): a token holding
# one is junk, never valid.
WEIRD = ["!", " ", "/", "'", '"', "{", "}", "*", "$", "é", "ß", "Ж", "中", "İ", "ǅ", "\u200b", "\t", "\n", "\x00",
         "\\", "+", ",", ":", "%", "١", "½", "𝟙", "ﬁ"]
MODELS = ["m", "llama-2-7b", "opt-1.3b", "qwen2.5-0.5b", "smollm2-135m", "m_1"]
ODD_MODELS = ["M", "-m", "_m", "m.", ".m", "m..x", "fp", "kd", "m.kd", "m.fp", "m.rtn", "m.ldlq.x", "ü", "m.n8",
              "m.c4.n8.L32"]
DATASETS = ["c4", "wikitext2", "pile_10k", "red-pajama"]
ODD_DATASETS = ["C4", "c4.x", "-c4", "_", "kd", "fp", "n8", "wikitext2!"]
# Numbers as they appear in tokens: odd ones (zero, negative, exponent, decimal 'p', overflow, far too many digits,
# leading zeros, non-ASCII digits, empty).
ODD_NUMBERS = ["0", "-1", "-0", "00", "01", "007", "1e9", "1e-05", "1e-5", "1e05", "0p5", "1p5", "1p0", "0p10",
               "1e999", "-1e999", "1e-999", "9" * 20, "9" * 400, "9" * 5000, "1e", "p5", "1pp5", "--1", "+1",
               "1_000", "١", "½", "", "1e308", "2p5e-3", "1e+5", "nan", "inf"]


def _numbers(kind=float) -> st.SearchStrategy[str]:
    """Number texts: canonical renderings of real values, and odd ones."""
    ints = st.one_of(st.integers(-3, 40), st.integers(-(2 ** 70), 2 ** 70)).map(str)
    floats = st.floats(allow_nan=False, allow_infinity=False).map(format_number)
    return st.one_of(ints, ints, floats if kind is not int else ints, st.sampled_from(ODD_NUMBERS))


SMALL = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["8", "16", "32", "128", "2048"]),
                  st.sampled_from(ODD_NUMBERS))

junk_tokens = st.builds(lambda a, w, b: a + w + b,
                        st.text(st.characters(exclude_characters="."), max_size=3),
                        st.sampled_from(WEIRD),
                        st.text(st.characters(exclude_characters="."), max_size=3))
# Anything at all between the dots (may well be a valid token).
any_tokens = st.text(st.characters(exclude_characters="."), max_size=6)


@st.composite
def option_token(draw, options=None) -> str:
    o = draw(st.sampled_from(options or OPTIONS))
    if o.kind is bool:
        return draw(st.sampled_from(o.tokens()))
    if not callable(o.default) and draw(st.integers(0, 4)) == 0:
        return o.render(o.default)  # the default written out (not canonical where it is the spec's default)
    return o.token + draw(_numbers(o.kind))


@st.composite
def calib_tokens(draw) -> list[str]:
    """`{dataset}.n{N}.L{L}[.s{seed}]`, often with odd datasets and numbers."""
    dataset = draw(st.sampled_from(DATASETS + (ODD_DATASETS if draw(st.booleans()) else [])))
    out = [dataset, f"n{draw(SMALL)}", f"L{draw(SMALL)}"]
    if draw(st.booleans()):
        out.append(f"s{draw(SMALL)}")
    return out


@st.composite
def setting_token(draw) -> str:
    bits = draw(st.one_of(st.integers(2, 8).map(str), SMALL))
    group = draw(st.one_of(st.none(), st.sampled_from(["16", "32", "64", "128"]), SMALL))
    return f"w{bits}" + ("" if group is None else f"g{group}")


@st.composite
def grammar_tokens(draw) -> list[str]:
    """The tokens of a name built from the grammar's pieces, in the grammar's order (often canonical)."""
    model = draw(st.sampled_from(MODELS + (ODD_MODELS if draw(st.integers(0, 4)) == 0 else [])))
    tokens = model.split(".")
    if draw(st.integers(0, 9)) == 0:
        return tokens + ["fp"]
    if draw(st.booleans()):
        tokens += draw(calib_tokens())
    tokens += draw(st.lists(st.sampled_from(sorted(registry.PREPROCESSORS)), max_size=2))
    tokens.append(draw(st.sampled_from(sorted(registry.SOLVERS))))
    if draw(st.booleans()):
        tokens.append(draw(st.sampled_from(sorted(registry.INITS))))
    tokens.append(draw(setting_token()))
    opts = draw(st.lists(option_token(), max_size=3))
    tokens += sorted(opts) if draw(st.booleans()) else opts
    if draw(st.integers(0, 3)) == 0:
        tokens += ["kd", *draw(calib_tokens()), *draw(st.lists(option_token(DISTILL_OPTIONS), max_size=2))]
    if draw(st.integers(0, 3)) == 0:
        fmt = draw(st.one_of(st.sampled_from(list(PACK_FORMATS)), any_tokens))
        tokens.append(f"pack-{fmt}")
    return tokens


def _valid_value(o: Option, draw):
    if o.kind is bool:
        return draw(st.booleans())
    if o.choices:
        return draw(st.sampled_from(o.choices))
    if o.kind is int:
        return draw(st.one_of(st.integers(1, 64), st.integers(-3, 2 ** 64)))
    return draw(st.one_of(st.sampled_from([0.0, 0.01, 0.25, 0.5, 1.0, 2.0, 1e-5]),
                          st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)))


@st.composite
def built_tokens(draw) -> list[str]:
    """The tokens of a spec's canonical name, the spec built from drawn catalog settings (more accepted names)."""
    solver = registry.SOLVERS[draw(st.sampled_from(sorted(registry.SOLVERS)))]
    init = draw(st.sampled_from(sorted(registry.INITS))) if solver.takes_init else "minmax"
    pre = draw(st.lists(st.sampled_from(sorted(registry.PREPROCESSORS)), max_size=1, unique=True)) \
        if solver.mode != "block" else []
    group = -1 if solver.format == "lut" else draw(st.sampled_from([-1, 16, 32, 64, 128]))
    calib = names.CalibSpec(draw(st.sampled_from(DATASETS)), draw(st.sampled_from([8, 16, 128])),
                            draw(st.sampled_from([32, 2048])), draw(st.sampled_from([0, 0, 3])))
    try:
        base = QuantSpec.build(draw(st.sampled_from(MODELS)), solver.name, draw(st.integers(2, 8)), group, init,
                               pre, calib)
        defs = list(base.option_defs().values())
        chosen = draw(st.lists(st.sampled_from(defs), max_size=3, unique_by=lambda o: o.key)) if defs else []
        options = {o.key: _valid_value(o, draw) for o in chosen}
        spec = QuantSpec.build(base.model, solver.name, base.bits, group, init, pre, calib, options)
        if draw(st.integers(0, 3)) == 0:
            kd = names.CalibSpec(calib.dataset, draw(st.sampled_from([8, 64])), calib.seqlen, calib.seed)
            spec = QuantSpec.build(spec.model, solver.name, spec.bits, group, init, pre, calib, dict(spec.options),
                                   DistillSpec.build(kd, {}))
        name = spec.short_name()
        if draw(st.integers(0, 3)) == 0:
            name += f".pack-{draw(st.sampled_from(list(PACK_FORMATS)))}"
    except ConfigError:
        return draw(grammar_tokens())
    return name.split(".")


@st.composite
def mutated_names(draw) -> tuple[str, str | None]:
    """(name, junk): a name from the grammar or a built spec with up to three mutations; `junk` is a junk token the
    name holds (never valid), or None."""
    tokens = draw(st.one_of(built_tokens(), grammar_tokens()))
    junk = None
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "duplicate", "swap", "insert_junk", "replace_junk", "insert_any",
                                   "replace_any", "empty", "option", "number"]))
        i = draw(st.integers(0, max(len(tokens) - 1, 0)))
        if not tokens:
            tokens = [""]
        if op == "drop" and len(tokens) > 1:
            del tokens[i]
        elif op == "duplicate":
            tokens.insert(i, tokens[i])
        elif op == "swap" and i + 1 < len(tokens):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
        elif op in ("insert_junk", "replace_junk"):
            junk = draw(junk_tokens)
            tokens[i:i + (op == "replace_junk")] = [junk]
        elif op in ("insert_any", "replace_any"):
            tokens[i:i + (op == "replace_any")] = [draw(any_tokens)]
        elif op == "empty":
            tokens.insert(i, "")
        elif op == "option":
            tokens.insert(i, draw(option_token()))
        elif op == "number":
            # a number of a token replaced by an odd one (w4g64 -> w4g0p5, n128 -> n-1, ...)
            tokens[i] = re.sub(r"-?[0-9][0-9p]*(e-?[0-9]+)?", draw(st.sampled_from(ODD_NUMBERS)), tokens[i], count=1)
    name = ".".join(tokens)
    if junk is not None and junk not in name.split("."):
        junk = None  # a later mutation removed it
    return name, junk


def _quoted(message: str) -> list[str]:
    """Every text between two single quotes of the message (any two: a quoted name may hold quotes itself)."""
    at = [i for i, c in enumerate(message) if c == "'"][:60]
    return [message[i + 1:j] for k, i in enumerate(at) for j in at[k + 1:]]


def _texts(value) -> list[str]:
    """Every string in a config value, keys included."""
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _texts(k) + _texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return [value] if isinstance(value, str) else []


def check_name(name: str, junk: str | None = None) -> str:
    """The property for one name; returns 'accepted' or 'refused'."""
    try:
        spec = QuantSpec.parse(name)
    except ConfigError as exc:
        message = str(exc)
        assert isinstance(exc, QuantlibError)
        assert message.strip(), f"{name!r}: empty message"
        # One line, but a name that itself holds a line break may be quoted as it is.
        assert "\n" not in message or "\n" in name, f"{name!r}: message of several lines: {message!r}"
        quoted = [q for q in _quoted(message) if q]
        if name:
            assert any(q in name for q in quoted), f"{name!r}: the message quotes no part of the name: {message}"
        else:
            assert "''" in message, f"the empty name is not quoted: {message}"
        if junk is not None:
            # The parser reads the base name before its `.kd` and `.pack-` parts: a problem there is reported
            # first, quoting the base name, which ends before the junk token.
            at = f".{name}.".index(f".{junk}.")
            earlier = any(name.startswith(q) and len(q) < at for q in quoted)
            assert junk in message or earlier, f"{name!r}: the junk token {junk!r} is not named: {message}"
        return "refused"
    assert junk is None, f"{name!r} holds the junk token {junk!r} and was accepted as {spec!r}"
    assert spec.short_name() == name, f"{name!r} accepted but its canonical name is {spec.short_name()!r}"
    again = QuantSpec.parse(spec.short_name())
    assert again == spec, f"{name!r}: parsing the canonical name again gives {again!r}, not {spec!r}"
    return "accepted"


@NAMES_DEFAULT
@given(mutated_names())
def test_short_names_round_trip_or_are_refused_with_a_config_error(case):
    event(check_name(*case))


@pytest.mark.slow
@NAMES_SLOW
@given(mutated_names())
def test_short_names_round_trip_or_are_refused_with_a_config_error_slow(case):
    event(check_name(*case))


@TEXT_DEFAULT
@given(st.text(max_size=40))
def test_any_text_as_a_short_name(name):
    """Free text (any unicode, dots or not) as a name: the same property."""
    event(check_name(name))


# ------------------------------------------------------------------------------------------------ config entries

BASE_CFG = {
    "models": {"m": {"source": "/nowhere"}},
    "datasets": {"c4": {"path": "json", "data_files": "/nowhere.jsonl"}},
    "run_models": ["m"],
    "calibration": {"dataset": "c4", "nsamples": 8, "seqlen": 32},
}

METHOD_KEYS = ["id", "label", "solver", "init", "preprocess", "bits", "group_size", "settings", "options",
               "calibration", "seeds", "distill"]


def _experiment(entries: list[dict], model: str = "m") -> Experiment:
    cfg = copy.deepcopy(BASE_CFG)
    if model != "m":
        cfg["models"] = {model: {"source": "/nowhere"}}
        cfg["run_models"] = [model]
    cfg["methods"] = entries
    return Experiment(cfg)


def _valid_entries() -> list[dict]:
    """One valid entry per solver x init it takes x (layer-wise) with and without each preprocessor."""
    out = []
    for solver in sorted(registry.SOLVERS.values(), key=lambda c: c.name):
        inits = sorted(registry.INITS) if solver.takes_init else [None]
        pres = [[]] + ([[p] for p in sorted(registry.PREPROCESSORS)] if solver.mode != "block" else [])
        for init in inits:
            for pre in pres:
                entry = {"id": "a", "solver": solver.name, "bits": [3],
                         "group_size": [-1] if solver.format == "lut" else [32, -1]}
                if init is not None:
                    entry["init"] = init
                if pre:
                    entry["preprocess"] = pre
                try:
                    _experiment([entry])
                except ConfigError:  # a combination the catalog refuses: no base for one change
                    continue
                out.append(entry)
    return out


VALID_ENTRIES = _valid_entries()
assert len(VALID_ENTRIES) >= len(registry.SOLVERS), "the fuzzer's valid config entries miss solvers"


def _applicable(entry: dict) -> list[Option]:
    """The options a valid entry's specs take (the keys its `options:` may hold)."""
    spec = QuantSpec.build("m", entry["solver"], 3, entry["group_size"][0], entry.get("init", "minmax"),
                           entry.get("preprocess", []), names.CalibSpec("c4", 8, 32))
    return sorted(spec.option_defs().values(), key=lambda o: o.key)


APPLICABLE = [_applicable(e) for e in VALID_ENTRIES]

# Values of every type a YAML file can hold, odd numbers included.
odd_values = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, -1, 1, 2, 3, 8, 9, 16, 10 ** 9, 2 ** 63, 10 ** 30, 10 ** 400, -(10 ** 400)]),
    st.integers(),
    st.sampled_from([0.0, -0.0, 0.5, 1.5, 1e9, 1e-300, 1e308, math.inf, -math.inf, math.nan, 0.1 + 0.2,
                     0.12345678901234, 123456789012.5]),
    st.floats(),
    st.text(max_size=6), st.sampled_from(["", "4", "w4", "ldlq", "minmax", "true", "x" * 50]),
    st.lists(st.integers(-2, 200), max_size=3), st.lists(st.text(max_size=4), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _option_value(o: Option) -> st.SearchStrategy:
    return st.one_of(_valid_like(o), odd_values)


def _valid_like(o: Option) -> st.SearchStrategy:
    if o.kind is bool:
        return st.booleans()
    if o.choices:
        return st.sampled_from(list(o.choices))
    if o.kind is int:
        return st.one_of(st.integers(1, 64), st.integers(1, 64), st.integers(-2, 0), st.integers(),
                         st.sampled_from([2 ** 53 + 1, 10 ** 17 + 1, 10 ** 30]))
    # floats with many digits too (a name writes 10 significant ones)
    return st.one_of(st.sampled_from([0.0, 0.01, 0.2, 0.5, 1.0, 4.0, 1e-4, 0.1 + 0.2, 1 / 3]),
                     st.floats(0, 1, exclude_min=True), st.floats(allow_nan=False))


junk_option_keys = st.one_of(st.sampled_from(["iters", "Damp", "", "gq", "noseq", "x y", "damp ", "lr\n"]),
                             st.text(max_size=8)).filter(lambda k: k not in OPTION_KEYS)
option_keys = st.one_of(st.sampled_from(OPTION_KEYS), st.sampled_from(["iters", "Damp", "", "gq", "noseq", "x y"]),
                        st.text(max_size=8))
OPTION_BY_KEY = {o.key: o for o in OPTIONS + DISTILL_OPTIONS}


@st.composite
def options_dicts(draw) -> dict:
    keys = draw(st.lists(option_keys, max_size=4, unique=True))
    return {k: draw(_option_value(OPTION_BY_KEY[k]) if k in OPTION_BY_KEY else odd_values) for k in keys}


def _key_values(key: str) -> st.SearchStrategy:
    """Values for a method entry's key: sensible ones of its type, and anything at all."""
    sensible = {
        "id": st.sampled_from(["a", "b-1", "x_y", "fp", "A", "", "1a", "a.b"]),
        "label": st.text(max_size=5),
        "solver": st.sampled_from(sorted(registry.SOLVERS) + ["fp", "awq", "LDLQ", ""]),
        "init": st.sampled_from(sorted(registry.INITS) + ["fp", "neuqi_", ""]),
        "preprocess": st.lists(st.sampled_from(sorted(registry.PREPROCESSORS) + ["rtn", "x"]), max_size=3),
        "bits": st.lists(st.one_of(st.integers(2, 8), st.sampled_from([0, 1, 9, -1, 10 ** 9])), max_size=3),
        "group_size": st.lists(st.sampled_from([-1, 0, 1, 16, 32, 100, -2, 10 ** 6]), max_size=3),
        "settings": st.lists(st.one_of(setting_token(), any_tokens), max_size=3),
        "options": options_dicts(),
        "calibration": st.fixed_dictionaries(
            {"dataset": st.sampled_from(["c4", "pile", "C4"]), "nsamples": st.sampled_from([1, 8, 0, -1, 10 ** 9]),
             "seqlen": st.sampled_from([2, 32, 1, 0])}, optional={"seed": st.sampled_from([0, 3, -1])}),
        "seeds": st.lists(st.sampled_from([0, 1, 2, -1]), max_size=3),
        "distill": st.dictionaries(st.sampled_from(["dataset", "nsamples", "seqlen", "seed", "lr", "epochs", "batch",
                                                    "train_zero", "train_norm", "tau"]),
                                   st.one_of(st.sampled_from(["c4", 1, 2, 8, 64, 3e-4, True, False]), odd_values),
                                   max_size=3),
    }[key]
    return st.one_of(sensible, sensible, odd_values)


@st.composite
def free_entries(draw) -> dict:
    """An entry with any of the keys (the required ones mostly present), each with any value."""
    keys = draw(st.lists(st.sampled_from(METHOD_KEYS), max_size=7, unique=True))
    keys = list(dict.fromkeys(["id", "solver", *keys])) if draw(st.integers(0, 5)) else keys
    entry = {k: draw(_key_values(k)) for k in keys}
    if draw(st.integers(0, 5)) == 0:
        entry[draw(st.text(max_size=6))] = draw(odd_values)
    return entry


@st.composite
def one_change(draw) -> tuple[dict, str]:
    """(entry, changed key): a valid entry with exactly one change."""
    entry = copy.deepcopy(draw(st.sampled_from(VALID_ENTRIES)))
    kind = draw(st.sampled_from(["key", "junk_key", "option", "junk_option"]))
    if kind == "key":
        key = draw(st.sampled_from(METHOD_KEYS))
        if key == "settings":
            entry.pop("bits"), entry.pop("group_size")
        entry[key] = draw(_key_values(key))
        return entry, key
    if kind == "junk_key":
        key = draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in METHOD_KEYS))
        entry[key] = draw(odd_values)
        return entry, key
    if kind == "option":
        key = draw(st.sampled_from(OPTION_KEYS))
        entry["options"] = {key: draw(_option_value(OPTION_BY_KEY[key]))}
        return entry, key
    key = draw(junk_option_keys)
    entry["options"] = {key: draw(odd_values)}
    return entry, key


@st.composite
def with_options(draw) -> tuple[dict, None]:
    """A valid entry with options it takes, at values of their type (accepted often: their names must read back
    as the same specs, e.g. floats with more digits than a name writes, integers beyond 2**53)."""
    i = draw(st.integers(0, len(VALID_ENTRIES) - 1))
    entry = copy.deepcopy(VALID_ENTRIES[i])
    chosen = draw(st.lists(st.sampled_from(APPLICABLE[i]), min_size=1, max_size=3, unique_by=lambda o: o.key))
    entry["options"] = {o.key: draw(st.one_of(_valid_like(o), _valid_like(o), odd_values)) for o in chosen}
    return entry, None


entries = st.one_of(free_entries().map(lambda e: (e, None)), one_change(), with_options(), with_options())


def _names_key(message: str, key: str, value) -> bool:
    """Whether the message names a key: as it is spelt, in words (`group size`), by its short-name token, or by its
    new value where that is a word (`solver: lnq` -> "lnq: one lookup table per row; give no group size")."""
    if key in message or key.replace("_", " ") in message:
        return True
    if any((t and t in message) or f"'{t}'" in message for t in _texts(value)):
        return True
    o = OPTION_BY_KEY.get(key)
    return o is not None and any(re.search(rf"(?<![A-Za-z_]){re.escape(t)}(?![A-Za-z_])", message)
                                 for t in o.tokens())


def check_entry(entry: dict, changed: str | None = None, model: str = "m") -> str:
    try:
        exp = _experiment([entry], model)
    except ConfigError as exc:
        message = str(exc)
        assert message.strip(), f"{entry!r}: empty message"
        # One line, but a key or value that itself holds a line break may be quoted as it is.
        assert "\n" not in message or any("\n" in t for t in _texts(entry)), f"{entry!r}: message {message!r}"
        if model != "m":
            assert f"'{model}'" in message, f"model key {model!r} refused without naming it: {message}"
        elif changed is not None:
            options = entry.get("options") if isinstance(entry.get("options"), dict) else {}
            value = options[changed] if changed in options else entry.get(changed)
            assert _names_key(message, changed, value), \
                f"{entry!r}: the changed key {changed!r} is not named: {message}"
        else:
            named = ["methods", *map(str, entry), *map(str, entry.get("options") or {})] \
                if isinstance(entry.get("options", {}), dict) else ["methods", *map(str, entry)]
            assert any(k and k in message for k in named), f"{entry!r}: no key of the entry named: {message}"
        return "refused"
    for spec in exp.all_specs():
        name = spec.short_name()
        again = QuantSpec.parse(name)
        assert again == spec, f"{entry!r}: {name!r} reads back as {again!r}, not {spec!r}"
        assert again.short_name() == name
    return "accepted"


@CONFIG_DEFAULT
@given(entries)
def test_method_entries_expand_to_names_that_round_trip_or_are_refused(case):
    event(check_entry(*case))


@pytest.mark.slow
@CONFIG_SLOW
@given(entries)
def test_method_entries_expand_to_names_that_round_trip_or_are_refused_slow(case):
    event(check_entry(*case))


@MODEL_KEYS_DEFAULT
@given(st.sampled_from(VALID_ENTRIES), st.sampled_from(MODELS + ODD_MODELS))
def test_model_keys_of_the_config_give_names_that_round_trip(entry, model):
    """A model key the config accepts names its specs in names that read back (a refused key is named)."""
    event(check_entry(copy.deepcopy(entry), None, model))
