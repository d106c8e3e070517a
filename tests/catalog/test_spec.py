"""Short names: round trips for every method, canonical form, and errors that say what is wrong."""

import itertools

import pytest

from quantlib.catalog import contract, names, registry
from quantlib.errors import ConfigError
from quantlib.catalog.names import parse_ppl_protocol, ppl_protocol_name
from quantlib.catalog.names import CalibSpec, parse_calib_name
from quantlib.catalog.spec import QuantSpec

CAL = CalibSpec("c4", 128, 2048)


# A valid value away from the default for every option (an option with companions gets them in COMPANIONS).
TEST_VALUES = {"outliers": 0.01, "qdrop": 0.25, "stat_bits": 16, "batch": 2, "grid": 1024, "grid_coarse": 32,
               "clip_beta": 0.5, "trellis_L": 12, "hyb_bits": 8, "act_bits": 4, "kv_bits": 4, "act_clip": 0.8, "kv_clip": 0.8,
               "kv_group": 64, "spin_iters": 10, "spin_lr": 0.5, "spin_batch": 2, "mse_maxshrink": 0.5}
COMPANIONS = {"structured": {"outliers": 0.02}, "outlier_step": {"outliers": 0.02}, "true_sequential": {"fp_inputs": False}}


def _test_value(o, spec):
    if o.key in TEST_VALUES:
        return TEST_VALUES[o.key]
    default = o.default_for(spec)
    if o.kind is bool:
        return not default
    return o.choices[0] if o.choices else default * 2 + 1


def _specs():
    """Every solver with every init it takes and, for layer-wise solvers, with and without each preprocessor; then
    each of the spec's options at a non-default value."""
    cal = CalibSpec("wikitext2", 32, 512, 7)
    for solver in registry.SOLVERS.values():
        inits = list(registry.INITS) if solver.takes_init else ["minmax"]
        # rotations (model-scope) refuse solvers reading statistics of the unrotated FP model, and `fpin`
        rotation_ok = not any(n in registry.STATISTICS for n in solver.needs)
        pres = [()] + ([(p,) for p, c in registry.PREPROCESSORS.items() if c.scope == "layer" or rotation_ok]
                       if solver.mode != "block" else [])
        per_row = solver.format in ("lut", "trellis")  # one table per row, one scale per layer: no group size
        for init, pre in itertools.product(inits, pres):
            for bits, gs in ((2, 128), (3, -1), (4, 64), (8, 32)):
                options = {"code_1mad": True} if solver.name == "qtip" and bits > 4 else {}  # HYB steps 2k <= 8 bits
                yield QuantSpec.build("llama-2-7b", solver.name, bits, -1 if per_row else gs, init, pre, calib=CAL,
                                      options=options)
            gs = -1 if per_row else 128
            base = QuantSpec.build("qwen-2.5-7b", solver.name, 3, gs, init, pre, calib=cal)
            for o in base.option_defs().values():
                if o.key == "fp_inputs" and any(registry.PREPROCESSORS[p].scope == "model" for p in pre):
                    continue
                options = {**COMPANIONS.get(o.key, {}), o.key: _test_value(o, base)}
                yield QuantSpec.build("qwen-2.5-7b", solver.name, 3, gs, init, pre, calib=cal, options=options)


SPECS = list(dict.fromkeys(_specs()))


def test_every_component_and_option_is_covered():
    names = {s.short_name() for s in SPECS}
    for comp in [*registry.SOLVERS, *registry.PREPROCESSORS, *registry.INITS]:
        assert any(f".{comp}." in n for n in names) or comp == "minmax", comp
    keys = {k for s in SPECS for k, _ in s.options}
    assert keys == {o.key for s in SPECS for o in s.option_defs().values()}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short_name())
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
        tok = names.format_number(v)
        assert "." not in tok
        assert names.parse_number(tok, float) == pytest.approx(v)


def test_both_alphas_round_trip_and_do_not_collide():
    """MagR's penalty and QuantEase's outlier step are different settings with different tokens."""
    s = QuantSpec.build("m", "quantease", 3, -1, preprocess=["magr"], calib=CAL,
                        options={"magr_alpha": 0.002, "outliers": 0.01, "outlier_step": 0.5})
    assert s.short_name() == "m.c4.n128.L2048.magr.quantease.w3.malpha0p002.olstep0p5.ol0p01"
    assert QuantSpec.parse(s.short_name()) == s
    assert s.opt("magr_alpha") == 0.002 and s.opt("outlier_step") == 0.5


@pytest.mark.parametrize("name,message", [
    ("m.rtn.w4g64.damp0p1", "'damp0p1' .Hessian damping. does not apply to rtn"),
    ("m.rtn.w4g64.noseq", "'noseq' .* does not apply to rtn"),
    ("m.c4.n8.L32.spqr.w3g16.sym", "'sym' .symmetric grid. does not apply to spqr"),
    ("m.c4.n8.L32.ldlq.neuqi.w3.sym", "'sym' .* does not apply to ldlq .neuqi init."),
    ("m.c4.n8.L32.ldlq.neuqii.w4g64", "'neuqii' is not an init"),
    ("m.c4.n8.L32.quantease.w3.cols", "'structured' applies only with outliers"),
    ("m.c4.n8.L32.quantease.w3.olstep2", "'outlier_step' applies only with outliers"),
    ("m.c4.n8.L32.ldlq.neuqi.w3.grid100", "grid .100. must be a multiple of grid_coarse .64."),
    ("m.c4.n8.L32.ldlq.w4.fpin.noseq", "'noseq' has no effect with 'fpin'"),
    ("m.c4.n8.L32.spqr.w3g16.noot.ot0p1", "'outlier_threshold' has no effect without outliers"),
    ("m.c4.n8.L32.spqr.neuqi.w3g16", "takes no init"),
])
def test_refused_combinations_name_the_problem_in_one_line(name, message):
    with pytest.raises(ConfigError, match=message) as info:
        QuantSpec.parse(name)
    assert "\n" not in str(info.value)


def test_options_exist_only_where_they_have_an_effect():
    rtn = QuantSpec.build("m", "rtn", 4, 64)
    # blocks: every quantized spec can stop after n blocks; the quantized forward (a4, kv4, ...) applies to every
    # layer-wise or data-free spec
    assert set(rtn.option_defs()) == {"sym", "blocks"} | {o.key for o in contract.FORWARD}
    assert not {o.key for o in contract.FORWARD} & set(QuantSpec.build("m", "lsq", 4, 64, calib=CAL).option_defs())
    for key in ("damp", "true_sequential"):
        with pytest.raises(ConfigError, match="does not apply to rtn"):
            QuantSpec.build("m", "rtn", 4, 64, options={key: 0.1 if key == "damp" else False})
    # RTN with a diag(H)-weighted init reads a Hessian, so damping and its source matter there
    assert {"damp", "true_sequential", "fp_inputs"} <= set(QuantSpec.build("m", "rtn", 4, 64, "neuqi", calib=CAL)
                                                           .option_defs())
    assert "sym" not in QuantSpec.build("m", "spqr", 3, 16, calib=CAL).option_defs()


def test_option_tokens_are_unique_across_the_catalog():
    tokens = {}
    for comp in [*registry.SOLVERS.values(), *registry.INITS.values(), *registry.PREPROCESSORS.values()]:
        for o in comp.options:
            assert tokens.setdefault(o.token, o.key) == o.key, o.token
    with pytest.raises(ValueError, match="already means"):
        names.register_option(names.Option("other", 1, int, "it"), "a test")
    with pytest.raises(ValueError, match="already has the token"):
        names.register_option(names.Option("iterations", 1, int, "sweeps"), "a test")


def test_inputs_follow_the_catalog():
    assert QuantSpec.build("m", "rtn", 4, 64).inputs() == {}
    assert QuantSpec.build("m", "ldlq", 4, 64, calib=CAL).inputs() == {
        "calib_json": "results/calibration/m.c4.n128.L2048.json", "calib": "results/calibration/m.c4.n128.L2048.pt"}
    fpin = QuantSpec.build("m", "ldlq", 4, 64, calib=CAL, options={"fp_inputs": True})
    assert fpin.inputs() == {"calib_json": "results/calibration/m.c4.n128.L2048.json",
                             "fp_hessian": "results/stats/fp_hessian/m.c4.n128.L2048"}


def test_options_are_answered_in_the_words_of_the_input():
    """A config entry's `options:` are answered with config keys, a short name's tokens with tokens (issue 33)."""
    with pytest.raises(ConfigError) as err:
        QuantSpec.build("m", "uniquanf", 3, -1, calib=CAL, options={"alpha_lrr": 0.1})
    assert "unknown option 'alpha_lrr' for uniquanf; it takes the options: alpha_lr, " in str(err.value)
    assert "<number>" not in str(err.value)
    with pytest.raises(ConfigError, match="option 'damp' .Hessian damping. does not apply to rtn .minmax init.; it "
                                          "takes the options: .*sym"):
        QuantSpec.build("m", "rtn", 4, 64, options={"damp": 0.1})
    with pytest.raises(ConfigError, match=r"option token 'damp0p1' .* it takes: .*sym") as err:
        QuantSpec.parse("m.rtn.w4g64.damp0p1")
    assert "the options" not in str(err.value)


def test_pack_names_that_name_nothing_to_pack():
    from quantlib.catalog.pack_formats import PACK_FORMATS, check_format, packable

    with pytest.raises(ConfigError, match=f"unknown pack format 'zip'; known: {', '.join(PACK_FORMATS)}"):
        check_format("zip")
    assert packable(QuantSpec.parse("m.fp"), "ct").startswith("an FP model has nothing to pack")
    with pytest.raises(ConfigError, match="cannot pack 'm.fp' as ct: an FP model has nothing to pack"):
        QuantSpec.parse("m.fp.pack-ct")


# Findings of the fuzz test (tests/catalog/test_fuzz_names.py): each name was accepted although invalid, or raised
# another exception than ConfigError (ValueError), or was refused without naming the input.
@pytest.mark.parametrize("name,message", [
    ("!.m.fp", r"model key '!\.m' must match"),  # accepted: an fp name skipped the model key's check
    ("fp", "cannot read short name 'fp': model key ''"),
    ("m.c4.n8.L32.quantease.w4.it1p5", r"option token 'it1p5' \(iterations\): '1p5' is not an integer"),  # ValueError
    ("m.c4.n8.L32.quantease.w4.it1e999", "option token 'it1e999'"),  # ValueError (inf)
    ("m.c4.n1.L2.magr.alternating.w2.iters1e-05", "option token 'iters1e-05'"),  # ValueError
    ("m.c4.n8.L32.ldlq.w4.kd.c4.n8.L32.bs0p5", "cannot read short name .*option token 'bs0p5'"),  # ValueError
    ("m.alternating.w" + "9" * 5000, "a number of 5000 digits is out of range"),  # ValueError (int max str digits)
    ("m.c4.n" + "9" * 5000 + ".L32.ldlq.w4", "a number of 5000 digits is out of range"),  # ValueError
    ("m.c4.n8.L32.quantease.w4.it" + "9" * 5000, "a number of 5000 digits is out of range"),  # ValueError
    ("m.c4.n0.L32.ldlq.w4", r"cannot read short name 'm\.c4\.n0\.L32\.ldlq\.w4': calibration needs nsamples >= 1"),
    ("m.c4.n8.L32.ldlq.w4.kd.c4.n0.L32", "cannot read short name .*calibration needs nsamples >= 1"),
    ("m.c4.n1.L2.magr.alternating.w2.kd.c4.n1.L2", "cannot read short name .*distillation trains scales"),
    ("m..rtn.w4", "cannot read short name 'm..rtn.w4': it has an empty part"),  # accepted (model key 'm.')
    (".kd.fp", "it has an empty part"),  # refused as "cannot read short name ''"
    ("", "cannot read short name '': it is empty"),
    ("m.kd.rtn.w4", "cannot read short name"),
    ("m.rtn.fp", "model key 'm.rtn' holds 'rtn'"),  # accepted, though the config refuses the model key
    ("m.alternating.w2.pack-", r"cannot read short name 'm\.alternating\.w2\.pack-': unknown pack format ''"),
])
def test_fuzz_findings_are_config_errors_that_name_the_input(name, message):
    with pytest.raises(ConfigError, match=message) as info:
        QuantSpec.parse(name)
    assert "\n" not in str(info.value)


def test_fuzz_findings_config_values_give_names_that_read_back():
    # A float with more digits than a name writes (0.30000000000000004 -> damp0p3 read back as 0.3), an integer
    # above 2**53 (read back through a float) and one beyond a float's range (OverflowError) now round-trip.
    for solver, options in [("ldlq", {"damp": 0.1 + 0.2}), ("ldlq", {"damp": 1 / 3}),
                            ("quantease", {"iterations": 2 ** 53 + 1}), ("quantease", {"iterations": 10 ** 300})]:
        spec = QuantSpec.build("m", solver, 4, -1, calib=CAL, options=options)
        assert QuantSpec.parse(spec.short_name()) == spec
    # Non-finite values had names no parser reads (`dampinf`, `dampnan`); the largest float rounds up to inf.
    for value, message in [(float("inf"), "finite"), (float("nan"), "finite"), (1.7976931348623157e308, "range"),
                           (10 ** 400, "range")]:
        with pytest.raises(ConfigError, match=f"option 'damp' takes a .*{message}"):
            QuantSpec.build("m", "ldlq", 4, -1, calib=CAL, options={"damp": value})
    # A model key holding `kd` (or a method name) gave names that do not read back; one with an empty part too.
    with pytest.raises(ConfigError, match="model key 'm.kd' holds 'kd'"):
        QuantSpec.build("m.kd", "rtn", 4, 64)
    with pytest.raises(ConfigError, match="model key 'm.' must match"):
        QuantSpec.build("m.", "rtn", 4, 64)
