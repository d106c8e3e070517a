"""The Python API: the README's example runs on a tiny model, and quantize computes the statistics a method needs."""

from __future__ import annotations

import pytest

from conftest import REPO, calib_tokens, tiny_model


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- api-example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return block


def test_readme_example_runs(tiny_dir, text_files, tmp_path, monkeypatch, capsys):
    from quantlib.access.datasets import fetch_dataset

    data = {}
    for split in ("train", "test"):  # the workflow's fetched form of a dataset
        data[split] = tmp_path / f"{split}.parquet"
        fetch_dataset({"path": "json", "data_files": str(text_files[split])}, data[split], split)
    code = readme_example()
    code = code.replace('"resources/models/smollm2-135m-instruct-q4_1"', repr(str(tiny_dir)))
    code = code.replace('"resources/datasets/c4.parquet"', repr(str(data["train"])))
    code = code.replace('"resources/datasets/wikitext2.parquet"', repr(str(data["test"])))
    code = code.replace("nsamples=32, seqlen=512", "nsamples=8, seqlen=32").replace("n32.L512", "n8.L32")
    code = code.replace("seqlen=512", "seqlen=32")
    monkeypatch.chdir(tmp_path)
    pieces = []
    code = code.replace('lambda piece: print(piece, end="", flush=True)', "pieces.append")
    exec(compile(code, "README example", "exec"), {"pieces": pieces})
    ppl, packed_ppl = map(float, capsys.readouterr().out.strip().splitlines()[-2:])
    assert pieces  # the generated text was streamed
    assert 1 < ppl < 1e4
    assert packed_ppl == pytest.approx(ppl, rel=1e-3)  # float16 scales: a little rounding, no loss
    assert (tmp_path / "out/ldlq.w4g64/model.safetensors.index.json").exists()
    assert (tmp_path / "out/ldlq.w4g64.ct/pack_report.json").exists()


def test_quantize_computes_the_statistics_a_method_needs():
    import quantlib

    tokens = calib_tokens(6, 16)
    model = tiny_model("llama")
    report = quantlib.quantize(model, "m.c4.n6.L16.lnq.w2.gq2", tokens, progress=False)
    assert all(d["guided_groups"] == 2 for d in report.layers.values())
    with pytest.raises(Exception, match=r"names 6 windows of 16 tokens; the tokens given are \(4, 16\)"):
        quantlib.quantize(tiny_model("llama"), "m.c4.n6.L16.ldlq.w4g32", calib_tokens(4, 16), progress=False)


def test_importing_quantlib_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, quantlib; print('torch' in sys.modules); quantlib.quantize; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["False", "True"]
