"""`python -m quantlib`: a short name checked and explained, or printed from its settings; text generated from a
checkpoint, streamed."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, build_tokenizer, calib_tokens, tiny_model
from quantlib.__main__ import main


def test_name_explains_every_part_and_default(capsys):
    name = "m.c4.n32.L512.magr.ldlq.clip.w2g64.blocks2"
    assert main(["name", name]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == name
    text = "\n".join(out)
    for fragment in ("32 windows of 512 tokens of 'c4'", "magr+ldlq (clip init)", "2 bits, groups of 64 columns",
                     "blocks          2:", "clip_beta       1.0 (default)", "damp            0.01 (default)",
                     "reads           calib: results/calibration/m.c4.n32.L512.pt",
                     f"written to      results/quantized/{name}"):
        assert fragment in text, fragment


def test_name_prints_the_canonical_name_of_settings(capsys):
    assert main(["name", "--model", "llama-2-7b", "--solver", "ldlq", "--bits", "3", "--group", "128", "--init",
                 "neuqi", "--calib", "c4.n128.L2048", "--set", "damp=0.1", "--set", "act_order=true"]) == 0
    assert capsys.readouterr().out.strip() == "llama-2-7b.c4.n128.L2048.ldlq.neuqi.w3g128.damp0p1"


def test_a_bad_name_or_setting_exits_1_naming_it(capsys):
    assert main(["name", "m.rtn.w4g64.foo"]) == 1
    assert "unknown option token 'foo'" in capsys.readouterr().err
    assert main(["name", "--model", "m", "--solver", "rtn", "--bits", "4", "--set", "damp=0.1"]) == 1
    assert "option 'damp'" in capsys.readouterr().err


def test_generate_streams_from_a_checkpoint(tmp_path):
    from quantlib.catalog.spec import QuantSpec
    from quantlib.checkpoint.writer import save_quantized
    from quantlib.runner.walk import quantize_model

    build_tokenizer(tmp_path / "tok")
    model = tiny_model("llama")
    spec = QuantSpec.parse("tiny.rtn.w4g32")
    save_quantized(model, spec, quantize_model(model, spec, calib_tokens(4), progress=False), tmp_path / "q",
                   tmp_path / "tok")
    cmd = [sys.executable, "-m", "quantlib", "generate", str(tmp_path / "q"), "the quick brown fox",
           "--max-new-tokens", "8"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.stdout == first.stdout  # greedy: the same text
