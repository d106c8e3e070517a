"""The core's contracts: every registered format loads in a fresh process, statistics of the FP model are shared
artifacts checked against the spec that reads them, and one prepared Hessian serves a preprocessor and the solver."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, build_tokenizer, calib_tokens, tiny_model
from quantlib.catalog import registry
from quantlib.errors import DataError
from quantlib.checkpoint.writer import save_quantized
from quantlib.runner.walk import quantize_model
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec
from quantlib.stats.artifacts import open_statistic
from quantlib.stats.fp_hessian import capture_fp_hessians

CAL = CalibSpec("c4", 8, 32)
# A spec stored in each registered format: a new format adds its example here.
FORMAT_EXAMPLES = {
    "uniform": "m.c4.n8.L32.ldlq.w4g32",
    "uniform_outliers": "m.c4.n8.L32.quantease.w3g32.it4.ol0p05",
    "spqr": "m.c4.n8.L32.spqr.w3g16",
    "lut": "m.c4.n8.L32.lnq.w3.qin.hdinit",
    "bcq": "m.alternating.w3",
    "trellis": "m.c4.n8.L32.qtip.w2.hybq6.tl8",
}


def test_every_format_has_an_example():
    assert set(FORMAT_EXAMPLES) == set(registry.FORMATS)
    assert {QuantSpec.parse(n).format for n in FORMAT_EXAMPLES.values()} == set(FORMAT_EXAMPLES)


@pytest.mark.parametrize("fmt", sorted(FORMAT_EXAMPLES))
def test_every_format_loads_in_a_fresh_process(fmt, tmp_path):
    """The loader finds each format through the catalog: nothing but quantlib.checkpoint.reader is imported first,
    and that imports no layer format but the uniform one (whose code packing the pack layouts share)."""
    build_tokenizer(tmp_path / "tok")
    spec = QuantSpec.parse(FORMAT_EXAMPLES[fmt])
    model = tiny_model("llama")
    report = quantize_model(model, spec, calib_tokens(8), progress=False)
    save_quantized(model, spec, report, tmp_path / "q", tmp_path / "tok")
    x = calib_tokens(2, 16, seed=5)
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x).logits}, tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from quantlib.checkpoint.reader import load_quantized\n"
        "assert not [m for m in sys.modules if m.startswith('quantlib.formats.') and m != 'quantlib.formats.uniform']\n"
        f"ref = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        f"model = load_quantized({str(tmp_path / 'q')!r})\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(model(ref['x']).logits, ref['logits'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('quantlib.formats.')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"'{registry.FORMATS[fmt].impl.partition(':')[0]}'" in proc.stdout


def _fp_hessians(tmp_path, tokens):
    model = tiny_model("llama")
    capture_fp_hessians(model, tokens, tmp_path / "stats", {"model": "m", "calib": "m.c4.n8.L32"}, progress=False)
    return tmp_path / "stats"


def test_fp_inputs_take_every_hessian_from_the_unquantized_model(tmp_path):
    """With `fpin`, block 0 equals the not-true-sequential run (both see the FP block's own inputs); from block 1 on
    they differ, because `noseq` propagates the quantized block's outputs and `fpin` the FP block's."""
    tokens = calib_tokens(8)
    stats = _fp_hessians(tmp_path, tokens)
    fpin = QuantSpec.build("m", "ldlq", 3, 32, calib=CAL, options={"fp_inputs": True})
    runs = {}
    for key, spec, statistics in (("fpin", fpin, {"fp_hessian": open_statistic("fp_hessian", stats, fpin)}),
                                  ("noseq", QuantSpec.build("m", "ldlq", 3, 32, calib=CAL,
                                                            options={"true_sequential": False}), None)):
        model = tiny_model("llama")
        quantize_model(model, spec, None if key == "fpin" else tokens, statistics=statistics, progress=False)
        runs[key] = {n: p.detach().clone() for n, p in model.named_parameters() if "proj" in n}
    block0 = [n for n in runs["fpin"] if ".layers.0." in n]
    block1 = [n for n in runs["fpin"] if ".layers.1." in n]
    assert all(torch.equal(runs["fpin"][n], runs["noseq"][n]) for n in block0)
    assert any(not torch.equal(runs["fpin"][n], runs["noseq"][n]) for n in block1)


def test_a_statistic_of_another_calibration_is_refused(tmp_path):
    stats = _fp_hessians(tmp_path, calib_tokens(8))
    other = QuantSpec.build("m", "ldlq", 3, 32, calib=CalibSpec("c4", 16, 32), options={"fp_inputs": True})
    # the remedy names the artifact folder to delete, with the command
    with pytest.raises(DataError, match=r"made for calib 'm.c4.n8.L32', not 'm.c4.n16.L32'; delete \S+/stats and "
                                        r"rebuild it: `rm -rf \S+/stats`, then rerun"):
        open_statistic("fp_hessian", stats, other)
    with pytest.raises(ValueError, match="needs the statistics"):
        quantize_model(tiny_model("llama"), other, None, progress=False)


def test_a_preprocessor_and_the_solver_share_one_factorisation(monkeypatch):
    """MagR settles the damping with the LDL factorisation; LDLQ then reuses it instead of factorising again."""
    from quantlib.stats import hessian

    calls = []
    real = hessian.damp_until_pd

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(hessian, "damp_until_pd", counting)
    spec = QuantSpec.build("m", "ldlq", 3, 32, preprocess=["magr"], calib=CAL, options={"magr_iters": 3})
    quantize_model(tiny_model("llama"), spec, calib_tokens(8), progress=False)
    assert len(calls) == len(set(calls)) == 2 * 4  # once per subgroup of each of the 2 blocks


def test_a_declared_format_is_what_the_solver_returns(monkeypatch):
    """The runner refuses a solver whose representation is not the format its catalog entry declares."""
    import dataclasses

    entry = registry.SOLVERS["rtn"]
    monkeypatch.setitem(registry.SOLVERS, "rtn", dataclasses.replace(entry, format="spqr"))
    with pytest.raises(RuntimeError, match="returned format 'uniform', its catalog entry declares 'spqr'"):
        quantize_model(tiny_model("llama"), QuantSpec.build("m", "rtn", 4, 32), None, progress=False)
