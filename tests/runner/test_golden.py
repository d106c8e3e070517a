"""Results kept from before the core's refactoring (tests/golden/README.md says how they were recorded): the stored
codes and grids of every method must stay identical, on the tiny model through the whole runner and on one real
layer of the offline model (slow)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, SMOL_DIR, SMOL_GGUF, calib_tokens, requires_assets, tiny_model
from quantlib.formats import load_representation
from quantlib.runner.walk import quantize_model
from quantlib.catalog.spec import QuantSpec

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _parts(rep) -> dict[str, torch.Tensor]:
    """What must not change: codes, the grid the codes are decoded with, outliers and the dequantized weight."""
    base = getattr(rep, "base", rep)
    out = {"weight": rep.dequantize(), "codes": base.codes, "scale": base.grid.scale, "zero": base.grid.zero}
    outliers = getattr(rep, "outliers", None)
    if outliers is not None:
        out["outliers"] = outliers.dense()
    return out


def _golden_tiny():
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / "tiny.safetensors")), json.loads((GOLDEN / "tiny.json").read_text())


TENSORS, META = _golden_tiny()


@pytest.mark.parametrize("name", list(META))
def test_tiny_model_results_are_unchanged(name):
    spec = QuantSpec.parse(name)
    model = tiny_model("llama")
    report = quantize_model(model, spec, calib_tokens(16, 32), progress=False)
    assert set(report.reps) == set(META[name])
    for layer, recorded in META[name].items():
        prefix = f"{name}/{layer}/"
        stored = {k[len(prefix):]: v for k, v in TENSORS.items() if k.startswith(prefix)}
        old, new = _parts(load_representation(recorded["meta"], stored)), _parts(report.reps[layer])
        assert old.keys() == new.keys(), layer
        for key in old:
            differ = (old[key] != new[key]).float().mean().item()
            assert differ == 0, f"{layer} {key}: {differ:.2%} of the entries differ"
        if recorded["cd_objective"] is not None:  # QuantEase's per-sweep objectives, to float round-off
            assert report.layers[layer]["cd_objective"] == pytest.approx(recorded["cd_objective"], rel=1e-6)
        if recorded["error"] is not None:
            assert report.layers[layer]["error"] == pytest.approx(recorded["error"], rel=1e-6)


def test_chunked_path_is_unchanged():
    """The one-pass-per-subgroup path over several chunks (its own recording: chunking changes summation order)."""
    recorded = json.loads((GOLDEN / "tiny_chunked_sha256.json").read_text())
    for name in ("m.c4.n16.L32.ldlq.w3g32", "m.c4.n16.L32.ldlq.w3g32.noseq", "m.c4.n16.L32.quantease.w3g32.it6"):
        report = quantize_model(tiny_model("llama"), QuantSpec.parse(name), calib_tokens(16, 32), chunk_tokens=64,
                                progress=False)
        for layer, rep in report.reps.items():
            for key, value in rep.to_tensors().items():
                digest = hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()[:16]
                assert digest == recorded[f"{name}/{layer}/{key}"], (name, layer, key)


@pytest.mark.slow
@requires_assets
def test_real_layer_results_are_unchanged(tmp_path):
    """Block 3's o_proj of the offline model, its Hessian from 16 x 512 C4 windows through the FP model: every method's
    stored tensors hash as recorded, and every layer error is the same."""
    from quantlib.access.datasets import calibration_windows, fetch_dataset, read_texts
    from quantlib.stats.hessian import HessianAccumulator, layer_error
    from quantlib.access.models import fetch_model, load_model, load_tokenizer
    from quantlib.solvers.contract import solve_layer

    recorded = json.loads((GOLDEN / "real_o_proj.json").read_text())
    smol = tmp_path / "smol"
    fetch_model(str(SMOL_DIR), smol, gguf_file=SMOL_GGUF)
    c4 = ASSETS / "datasets/c4/found/yxanul--yxanul_0.6B/c4_validation_2k.parquet"
    fetch_dataset({"path": "parquet", "data_files": str(c4), "rows": [1100, 2000]}, tmp_path / "c4.parquet", "c4")
    tokens, _ = calibration_windows(read_texts(tmp_path / "c4.parquet"), load_tokenizer(smol), {}, 16, 512, 0)
    model = load_model(smol)
    lin = model.model.layers[3].self_attn.o_proj
    acc = HessianAccumulator(lin.in_features)
    handle = lin.register_forward_pre_hook(lambda m, a: acc.add(a[0]))
    with torch.no_grad():
        model.model(tokens[:8])
        model.model(tokens[8:])
    handle.remove()
    W, H = lin.weight.detach().float().clone(), acc.result()

    def sha(t):
        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]

    assert (sha(W), sha(H)) == (recorded["W"], recorded["H"]), "the layer or its Hessian changed, not a method"
    for name, want in recorded["methods"].items():
        spec = QuantSpec.parse(name)
        result = solve_layer(W, H if spec.needs_hessian else None, spec, "o")
        got = {k: sha(v) for k, v in result.rep.to_tensors().items()}
        if spec.format == "spqr":  # recorded when SpQR's statistics were stored decoded, in the uniform layout
            got = {k: v for k, v in got.items() if not k.endswith(("_codes", "_params"))}
            got.update(scales=sha(result.rep.grid.scale), zeros=sha(result.rep.grid.zero))
        assert got == {k: v for k, v in want.items() if k not in ("error", "cd_objective")}, name
        assert layer_error(W, result.weight, H) == want["error"], name
        if "cd_objective" in want:
            assert result.stats["cd_objective"] == pytest.approx(want["cd_objective"], rel=1e-6), name
