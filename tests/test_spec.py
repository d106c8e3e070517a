"""Short names: round trips for every method, canonical form, and errors that say what is wrong."""

import itertools

import pytest

from quantlib import methods
from quantlib.errors import ConfigError
from quantlib.spec import CalibSpec, QuantSpec, parse_calib_name, parse_ppl_protocol, ppl_protocol_name

CAL = CalibSpec("c4", 128, 2048)


def _specs():
    for solver, init in itertools.product(methods.SOLVERS.values(), methods.INITS):
        if not solver.uses_uniform_grid and init != "minmax":
            continue
        for bits, gs in ((2, 128), (3, -1), (4, 64), (8, 32)):
            yield QuantSpec.build("llama-2-7b", solver.name, bits, gs, init, calib=CAL)
        # every option of the method at a non-default value
        base = QuantSpec.build("qwen-2.5-7b", solver.name, 3, 128, init, calib=CalibSpec("wikitext2", 32, 512, 7))
        opts = {}
        for o in base.option_defs().values():
            default = o.default_for(base)
            opts[o.key] = (not default) if o.kind is bool else (o.choices[-1] if o.choices else default * 2 + 1)
        yield QuantSpec.build("qwen-2.5-7b", solver.name, 3, 128, init, calib=CalibSpec("wikitext2", 32, 512, 7),
                              options=opts)


@pytest.mark.parametrize("spec", list(_specs()), ids=lambda s: s.short_name())
def test_round_trip_every_method(spec):
    name = spec.short_name()
    assert QuantSpec.parse(name) == spec
    assert QuantSpec.parse(name).short_name() == name


def test_examples_and_defaults_left_out():
    spec = QuantSpec.build("llama-2-7b", "ldlq", 3, 128, calib=CAL)
    assert spec.short_name() == "llama-2-7b.c4.n128.L2048.ldlq.w3g128"
    assert spec.opt("act_order") is True and spec.opt("damp") == 0.01
    # RTN with min-max needs no data: the calibration is dropped from the spec and the name
    assert QuantSpec.build("m", "rtn", 4, 64, calib=CAL).short_name() == "m.rtn.w4g64"
    assert QuantSpec.build("m", "ldlq", 4, -1, calib=CAL, options={"act_order": False, "damp": 0.1}
                           ).short_name() == "m.c4.n128.L2048.ldlq.w4.noreorder.damp0p1"
    assert QuantSpec.build("m").short_name() == "m.fp"
    assert QuantSpec.parse("opt-1.3b.fp") == QuantSpec.build("opt-1.3b")


def test_non_canonical_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="canonical"):
        QuantSpec.parse("m.c4.n8.L32.ldlq.w4.damp0p1.noreorder")  # options out of order
    with pytest.raises(ConfigError, match="canonical"):
        QuantSpec.parse("m.c4.n8.L32.ldlq.w4.damp0p01")  # default written out
    with pytest.raises(ConfigError, match="unknown option token 'foo'"):
        QuantSpec.parse("m.c4.n8.L32.ldlq.w4.foo")
    with pytest.raises(ConfigError, match="known solvers"):
        QuantSpec.parse("m.c4.n8.L32.gptx.w4")
    with pytest.raises(ConfigError, match="uses no calibration"):
        QuantSpec.parse("m.c4.n8.L32.rtn.w4")
    with pytest.raises(ConfigError, match="bits must be between 2 and 8"):
        QuantSpec.parse("m.rtn.w1")
    with pytest.raises(ConfigError, match="needs calibration"):
        QuantSpec.parse("m.ldlq.w4")


def test_bad_settings_rejected_at_build():
    with pytest.raises(ConfigError, match="bits must be between 2 and 8"):
        QuantSpec.build("m", "rtn", 1, 64)
    with pytest.raises(ConfigError, match="group_size"):
        QuantSpec.build("m", "rtn", 4, 0)
    with pytest.raises(ConfigError, match="unknown solver 'magic'"):
        QuantSpec.build("m", "magic", 4, 64)
    with pytest.raises(ConfigError, match="unknown option 'iters'"):
        QuantSpec.build("m", "ldlq", 4, 64, calib=CAL, options={"iters": 3})
    with pytest.raises(ConfigError, match="takes true or false"):
        QuantSpec.build("m", "ldlq", 4, 64, calib=CAL, options={"act_order": 1})


def test_calibration_and_protocol_names():
    assert parse_calib_name("llama-2-7b.c4.n128.L2048") == ("llama-2-7b", CAL)
    assert parse_calib_name("a.b.wikitext2.n8.L64.s3") == ("a.b", CalibSpec("wikitext2", 8, 64, 3))
    with pytest.raises(ConfigError):
        parse_calib_name("llama.c4.n128")
    assert parse_ppl_protocol(ppl_protocol_name("wikitext2", 512, 40)) == ("wikitext2", 512, 40)
    assert parse_ppl_protocol(ppl_protocol_name("c4-val", 2048, None)) == ("c4-val", 2048, None)


def test_number_tokens_have_no_dots():
    for v in (0.01, 1e-5, 2.5e-7, 0.125, 3.0, 1234):
        tok = methods.format_number(v)
        assert "." not in tok
        assert methods.parse_number(tok, float) == pytest.approx(v)
