"""Lightweight distillation after quantization on a tiny model: zero steps change nothing, a step changes only
scales, zeros and norm gains (codes bit-identical), the loss falls, the result reloads to identical logits, names
round-trip and bad settings are refused."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import calib_tokens, tiny_model
from quantlib.errors import ConfigError
from quantlib.checkpoint.reader import load_quantized
from quantlib.checkpoint.writer import save_quantized
from quantlib.access.lazy import WeightSource
from quantlib.artifacts.integrity import seal_file
from quantlib.jobs.steps import distill
from quantlib.runner.walk import quantize_model
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_dir):
    """An RTN w3g32 checkpoint of the tiny Llama (whose FP weights are in tiny_dir) and 8 windows to distil on."""
    root = tmp_path_factory.mktemp("kd")
    spec = QuantSpec.parse("tiny.rtn.w3g32")
    model = tiny_model("llama")
    report = quantize_model(model, spec, None, progress=False)
    save_quantized(model, spec, report, root / "base", tiny_dir)
    torch.save(calib_tokens(8, 32, seed=4), root / "windows.pt")
    seal_file(root / "windows.pt", root / "windows.pt")  # an artifact as the calibration job writes it
    return root


def _run(base, tiny_dir, out, kd="kd.c4.n8.L32", **kw):
    name = f"tiny.rtn.w3g32.{kd}"
    distill(name, tiny_dir, {"base": base / "base", "calib": base / "windows.pt"}, out,
            {"device": "cpu", "dtype": "float32", "seed": 0}, **kw)
    return WeightSource(out).state(), json.loads((out / "diagnostics.json").read_text())


def test_zero_steps_change_nothing(base, tiny_dir, tmp_path):
    after, diag = _run(base, tiny_dir, tmp_path / "out", max_steps=0)
    before = WeightSource(base / "base").state()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert diag["distill"]["steps"] == 0


def test_a_step_changes_only_scales_zeros_and_norm_gains(base, tiny_dir, tmp_path):
    after, diag = _run(base, tiny_dir, tmp_path / "out", max_steps=1)
    before = WeightSource(base / "base").state()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith((".scales", ".zeros")) or "norm" in k for k in changed), changed
    assert any(k.endswith(".scales") for k in changed) and any(k.endswith(".zeros") for k in changed)
    assert any("norm" in k for k in changed)
    assert all(torch.equal(after[k], before[k]) for k in before if k.endswith(".qweight"))  # codes bit-identical
    assert diag["distill"]["base"] == "tiny.rtn.w3g32" and diag["short_name"] == "tiny.rtn.w3g32.kd.c4.n8.L32"
    # without zero points and norms only the scales move
    after2, _ = _run(base, tiny_dir, tmp_path / "out2", kd="kd.c4.n8.L32.nonorm.nozero", max_steps=1)
    changed2 = {k for k in before if not torch.equal(after2[k], before[k])}
    assert changed2 and all(k.endswith(".scales") for k in changed2)


def test_loss_falls_and_the_result_reloads_identically(base, tiny_dir, tmp_path):
    _, diag = _run(base, tiny_dir, tmp_path / "out", kd="kd.c4.n8.L32.ep4.lr0p0001")
    loss = diag["distill"]["loss"]
    assert len(loss) == 4 * 8 and sum(loss[-8:]) < sum(loss[:8])
    lr = diag["distill"]["lr"]
    assert lr[0] < lr[3] and lr[-1] < 0.1 * max(lr)  # warm-up, then cosine towards 0
    x = calib_tokens(2, 16, seed=7)
    student, _ = load_quantized(tmp_path / "out", with_representations=True)
    teacher = tiny_model("llama")
    with torch.no_grad():
        again = load_quantized(tmp_path / "out")
        assert torch.equal(again(x).logits, student(x).logits)
        # closer to the FP model's final hidden states than the base was
        target = teacher.base_model(x).last_hidden_state
        base_model = load_quantized(base / "base")
        before = float(((base_model.base_model(x).last_hidden_state - target) ** 2).mean())
        after = float(((student.base_model(x).last_hidden_state - target) ** 2).mean())
    assert after < before


def test_names_and_refusals():
    name = "m.c4.n32.L512.ldlq.neuqi.w3g64.kd.c4.n64.L512.ep2.nozero"
    spec = QuantSpec.parse(name)
    assert spec.short_name() == name and spec.distill.calib == CalibSpec("c4", 64, 512)
    assert spec.base().short_name() == "m.c4.n32.L512.ldlq.neuqi.w3g64"
    for bad, message in [("m.fp.kd.c4.n8.L32", "the unquantized model has none"),
                         ("m.rtn.w3.kd.c4.n8.L32.kd.c4.n8.L32", "given twice"),
                         ("m.c4.n8.L32.spqr.w3g16.kd.c4.n8.L32", "stores 'spqr'"),
                         ("m.c4.n8.L32.lnq.w3.kd.c4.n8.L32", "stores 'lut'"),
                         ("m.rtn.w3.kd.c4.n8.L32.bs9", "batch .9. is larger than its 8 windows"),
                         ("m.rtn.w3.kd.c4.n8.L32.ep0", "epochs >= 1"),
                         ("m.rtn.w3.kd.c4.n8.L1", "seqlen >= 2"),
                         ("m.rtn.w3.kd.c4.n8.L32.foo", "unknown distillation option token 'foo'")]:
        with pytest.raises(ConfigError, match=message):
            QuantSpec.parse(bad)


def test_bf16_is_part_of_the_name_and_refused_where_the_device_has_no_bfloat16(base, tiny_dir, tmp_path):
    spec = QuantSpec.parse("tiny.rtn.w3g32.kd.c4.n8.L32.bf16")
    assert spec.distill.opt("bf16") and spec.short_name().endswith(".bf16")
    with pytest.raises(ConfigError, match="bf16 needs a CUDA GPU with bfloat16 support.*drop `bf16`"):
        _run(base, tiny_dir, tmp_path / "out", kd="kd.c4.n8.L32.bf16", max_steps=1)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(),
                    reason="needs a CUDA GPU with bfloat16 (bf16 distillation is refused on the CPU)")
def test_bf16_distillation_trains_on_a_gpu(base, tiny_dir, tmp_path):
    name = "tiny.rtn.w3g32.kd.c4.n8.L32.ep4.lr0p0001.bf16"
    distill(name, tiny_dir, {"base": base / "base", "calib": base / "windows.pt"}, tmp_path / "out",
            {"device": "cuda", "dtype": "float32", "seed": 0})
    diag = json.loads((tmp_path / "out" / "diagnostics.json").read_text())["distill"]
    assert diag["dtype"] == "bfloat16 autocast" and sum(diag["loss"][-8:]) < sum(diag["loss"][:8])
