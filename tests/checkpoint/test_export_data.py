"""Saving and loading quantized checkpoints; datasets, samplers and evaluation windows."""

import json

import pytest
import torch

from conftest import build_tokenizer, calib_tokens, corpus, quantize_save_reload, tiny_model
from quantlib.access.datasets import calibration_windows, eval_windows, fetch_dataset, read_texts, sample_documents
from quantlib.errors import DataError, NumericalError
from quantlib.evaluation.perplexity import perplexity
from quantlib.checkpoint.reader import is_quantized_dir
from quantlib.checkpoint.writer import save_quantized
from quantlib.runner.walk import quantize_model
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("opt", True), ("gpt_neox", False)])
def test_saved_model_gives_the_same_logits(tmp_path, tok, family, tied):
    model = tiny_model(family)
    model.config.tie_word_embeddings = tied
    if tied:
        model.tie_weights()
    tok.save_pretrained(tmp_path / "src")
    spec = QuantSpec.build("m", "ldlq", 3, 32, calib=CalibSpec("c4", 8, 32))
    report, _, diag = quantize_save_reload(model, spec, tmp_path / "src", tmp_path / "q", extra={"note": 1})
    assert is_quantized_dir(tmp_path / "q")
    assert diag["short_name"] == spec.short_name() and len(diag["layers"]) == len(report.layers)
    assert json.loads((tmp_path / "q" / "quant_spec.json").read_text())["solver"] == "ldlq"
    assert (tmp_path / "q" / "tokenizer.json").exists()


def test_nan_is_refused_and_nothing_is_written(tmp_path):
    model = tiny_model("llama")
    spec = QuantSpec.build("m", "rtn", 4, -1)
    report = quantize_model(model, spec, None, progress=False)
    model.model.norm.weight.data[0] = float("nan")
    with pytest.raises(NumericalError, match="model.norm.weight"):
        save_quantized(model, spec, report, tmp_path / "q", tmp_path)
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []


def test_document_sampler_is_seeded_and_fails_loudly(tok):
    texts = corpus(200, seed=4)
    a, man = sample_documents(texts, tok, 8, 24, seed=0)
    b, _ = sample_documents(texts, tok, 8, 24, seed=0)
    c, _ = sample_documents(texts, tok, 8, 24, seed=1)
    assert a.shape == (8, 24) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(DataError, match="too short for 500 windows of 300 tokens"):
        sample_documents(texts, tok, 500, 300, seed=0)
    # a document of exactly seqlen tokens is a valid window starting at 0
    one = [texts[0]]
    L = len(tok(texts[0]).input_ids)
    w, _ = sample_documents(one, tok, 1, L, seed=0)
    assert w[0].tolist() == tok(texts[0]).input_ids
    with pytest.raises(DataError):
        sample_documents(one, tok, 1, L, seed=0, accept=">")


def test_concat_sampler_and_contiguous_windows(tok):
    texts = corpus(50, seed=5)
    w, man = calibration_windows(texts, tok, {"calibration_sampler": "concat", "join": "\n\n"}, 6, 40, seed=3)
    assert w.shape == (6, 40) and man["sampler"] == "concat"
    windows, info = eval_windows(texts, tok, {"join": "\n\n"}, 50)
    total = len(tok("\n\n".join(texts)).input_ids)
    assert windows.shape == (total // 50, 50) and info["text_tokens"] == total
    capped, _ = eval_windows(texts, tok, {"join": "\n\n", "max_tokens": 120}, 50)
    assert capped.shape == (2, 50)
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(texts[:1], tok, {}, 10_000)


def test_fetch_dataset_rows_and_errors(tmp_path, text_files):
    n = fetch_dataset({"path": "json", "data_files": str(text_files["test"]), "rows": [10, 30]},
                      tmp_path / "d.parquet", "toy")
    assert n == 20 and len(read_texts(tmp_path / "d.parquet")) == 20
    with pytest.raises(DataError, match="dataset 'toy' could not be loaded"):
        fetch_dataset({"path": "json", "data_files": str(tmp_path / "missing.jsonl")}, tmp_path / "e.parquet", "toy")
    with pytest.raises(DataError, match="no column 'body'"):
        fetch_dataset({"path": "json", "data_files": str(text_files["test"]), "text_column": "body"},
                      tmp_path / "f.parquet", "toy")
    assert not (tmp_path / "e.parquet").exists()


def test_perplexity_formula():
    """exp of the mean next-token NLL over all scored positions, windows scored independently."""
    model = tiny_model("llama")
    windows = calib_tokens(3, 20, seed=9)
    res = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert res["ppl"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    assert res["windows"] == 3 and res["tokens_scored"] == 3 * 19
    assert perplexity(model, windows, max_windows=1, progress=False)["windows"] == 1


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_artifacts_get_the_users_umask(tmp_path, umask):
    """Written through a temporary and renamed, an artifact still gets the mode a plain file would (not mkstemp's
    owner-only 600), so colleagues on a shared filesystem can read results."""
    import os

    from quantlib.artifacts.atomic import atomic_dir, write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "d" / "x").stat().st_mode & 0o777 == 0o666 & ~umask
