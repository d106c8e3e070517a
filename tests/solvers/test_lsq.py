"""The block-wise mode end to end through its smallest method, `lsq` (learned scales): training lowers every block's
output error, the result reloads to identical logits, a seed fixes it, streams on disk change nothing, and what a
block-wise solver cannot take is refused when its name is built."""

import json

import pytest
import torch

from conftest import build_tokenizer, calib_tokens, quantize_save_reload, tiny_model
from quantlib.errors import ConfigError
from quantlib.runner.walk import quantize_model
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

CAL = CalibSpec("c4", 16, 32)


def spec(bits=3, gs=32, init="minmax", **options):
    return QuantSpec.build("m", "lsq", bits, gs, init, calib=CAL, options=options)


def _codes(report):
    return {k: (r.codes, r.grid.scale) for k, r in report.reps.items()}


@pytest.mark.parametrize("bits,gs", [(3, 32), (2, 32), (3, -1)])
def test_training_lowers_every_blocks_output_error(bits, gs):
    model = tiny_model("llama")
    report = quantize_model(model, spec(bits, gs), calib_tokens(16, 32), progress=False)
    assert [b["block"] for b in report.blocks] == [0, 1]
    for b in report.blocks:
        assert b["error_after"] < b["error_before"], b
        assert b["steps"] == 2 * 16 and b["loss"][0][0] == 1 and b["loss"][-1][0] == 32
    # the scales moved, and the codes are what the stored grid gives the original weights
    assert all(d["mean_abs_log_scale_change"] > 0 for d in report.layers.values())
    fp = tiny_model("llama")
    for name, rep in report.reps.items():
        W = fp.get_submodule(name).weight.detach()
        assert torch.equal(rep.codes, rep.grid.quantize(W).to(torch.uint8))
        assert torch.equal(rep.dequantize(), model.get_submodule(name).weight)


def test_more_training_fits_the_block_better_than_its_start():
    """Against the init alone (RTN on the same grid), the trained model's logits are closer to the FP model's."""
    x = calib_tokens(4, 32, seed=9)
    fp, trained, rtn = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    quantize_model(trained, spec(2, 32, epochs=8, lr=0.02), calib_tokens(16, 32), progress=False)
    quantize_model(rtn, QuantSpec.build("m", "rtn", 2, 32), None, progress=False)
    with torch.no_grad():
        ref = fp(x).logits
        err = {k: float(((m(x).logits - ref) ** 2).mean()) for k, m in (("lsq", trained), ("rtn", rtn))}
    assert err["lsq"] < 0.8 * err["rtn"], err


def test_seeded_streams_in_memory_or_on_disk_give_the_same_model():
    runs = [quantize_model(tiny_model("llama"), spec(), calib_tokens(16, 32), progress=False, seed=s, streams=w)
            for s, w in ((0, "memory"), (0, "disk"), (1, "memory"))]
    a, b, c = (_codes(r) for r in runs)
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    assert any(not torch.equal(a[k][1], c[k][1]) for k in a)  # another seed: another order and mixing


def test_batches_and_quantized_inputs_only():
    report = quantize_model(tiny_model("llama"), spec(batch=4, qdrop=1.0), calib_tokens(16, 32), progress=False)
    assert all(b["steps"] == 2 * 4 and b["error_after"] < b["error_before"] for b in report.blocks)


def test_neuqi_init_takes_its_hessian_from_the_quantized_stream():
    """A diag(H)-weighted init composes with a block-wise solver: the runner captures each layer's Hessian from the
    quantized stream, and NeUQI's start is already closer to the FP block than min-max's."""
    runs = {init: quantize_model(tiny_model("llama"), spec(init=init, grid=64, grid_coarse=16)
                                 if init == "neuqi" else spec(), calib_tokens(16, 32), progress=False)
            for init in ("neuqi", "minmax")}
    assert all("error" in d for d in runs["neuqi"].layers.values())  # measured under the captured Hessian
    assert all("error" not in d for d in runs["minmax"].layers.values())
    assert runs["neuqi"].blocks[0]["error_before"] < 0.8 * runs["minmax"].blocks[0]["error_before"]


def test_save_and_reload_identical_logits(tmp_path):
    build_tokenizer(tmp_path / "tok")
    _, layers, diag = quantize_save_reload(tiny_model("llama"), spec(), tmp_path / "tok", tmp_path / "q")
    assert all(m["format"] == "uniform" for m in layers.values())
    assert [b["block"] for b in diag["blocks"]] == [0, 1]
    assert json.loads((tmp_path / "q" / "quant_spec.json").read_text())["solver"] == "lsq"


@pytest.mark.parametrize("options,message", [
    ({"damp": 0.1}, "'damp' .* does not apply to lsq"),
    ({"true_sequential": False}, "does not apply to lsq"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"qdrop": 1.5}, r"qdrop is a probability in \[0, 1\]"),
    ({"batch": 32}, "batch .32. is larger than the 16 calibration windows"),
])
def test_bad_settings_are_refused_when_the_name_is_built(options, message):
    with pytest.raises(ConfigError, match=message):
        spec(**options)


def test_no_preprocessor_and_calibration_required():
    with pytest.raises(ConfigError, match="block-wise"):
        QuantSpec.build("m", "lsq", 3, 32, preprocess=["magr"], calib=CAL)
    with pytest.raises(ConfigError, match="needs calibration"):
        QuantSpec.parse("m.lsq.w3g32")
    name = spec(epochs=3, lr=0.05).short_name()
    assert name == "m.c4.n16.L32.lsq.w3g32.ep3.lr0p05" and QuantSpec.parse(name) == spec(epochs=3, lr=0.05)
