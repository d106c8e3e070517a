"""Quality checks on the real model in the shared assets (SmolLM2-135M-Instruct-Q4_1). Slow: `pytest -m slow`."""

from __future__ import annotations

import pytest
import torch

from conftest import ASSETS, SMOL_DIR, SMOL_GGUF, requires_assets
from quantlib.access.datasets import calibration_windows, eval_windows, fetch_dataset, read_texts
from quantlib.evaluation.perplexity import perplexity
from quantlib.stats.hessian import HessianAccumulator, layer_error
from quantlib.access.models import fetch_model, load_model, load_tokenizer
from quantlib.solvers.contract import solve_layer
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

pytestmark = [pytest.mark.slow, requires_assets]

C4 = ASSETS / "datasets/c4/found/yxanul--yxanul_0.6B/c4_validation_2k.parquet"
WIKI = ASSETS / "datasets/wikitext-2-raw-v1/test.jsonl"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "model"
    fetch_model(str(SMOL_DIR), out, gguf_file=SMOL_GGUF)
    return out


def test_fp_perplexity_matches_the_manifest(smol, tmp_path):
    """The staged assets' documented figure: WikiText-2 test joined by "\\n\\n", first 40 windows of 512 tokens, float32 -> 29.19."""
    fetch_dataset({"path": "json", "data_files": str(WIKI)}, tmp_path / "wiki.parquet", "wikitext2")
    windows, info = eval_windows(read_texts(tmp_path / "wiki.parquet"), load_tokenizer(smol), {"join": "\n\n"}, 512)
    assert info["text_tokens"] == 304_986  # the manifest's token count for this tokenizer
    res = perplexity(load_model(smol), windows, max_windows=40, progress=False)
    assert res["ppl"] == pytest.approx(29.19, rel=0.01)


def test_ldlq_beats_rtn_on_real_layers(smol, tmp_path):
    """On the real calibration activations of the first blocks, LDLQ's layer objective is below RTN's."""
    fetch_dataset({"path": "parquet", "data_files": str(C4), "rows": [1100, 2000]}, tmp_path / "c4.parquet", "c4")
    tokens, _ = calibration_windows(read_texts(tmp_path / "c4.parquet"), load_tokenizer(smol), {}, 16, 512, 0)
    model = load_model(smol)
    layers = {"q": model.model.layers[1].self_attn.q_proj, "down": model.model.layers[1].mlp.down_proj}
    accs = {k: HessianAccumulator(lin.in_features) for k, lin in layers.items()}
    handles = [lin.register_forward_pre_hook(lambda m, a, k=k: accs[k].add(a[0])) for k, lin in layers.items()]
    with torch.no_grad():
        model.model(tokens[:8])
        model.model(tokens[8:])
    for h in handles:
        h.remove()
    cal = CalibSpec("c4", 16, 512)
    for key, lin in layers.items():
        W, H = lin.weight.detach().float(), accs[key].result()
        for bits, gs in ((3, -1), (3, 64), (4, 64)):
            e_ldlq = layer_error(W, solve_layer(W, H, QuantSpec.build("m", "ldlq", bits, gs, calib=cal), key).weight, H)
            e_rtn = layer_error(W, solve_layer(W, None, QuantSpec.build("m", "rtn", bits, gs), key).weight, H)
            assert e_ldlq < 0.9 * e_rtn, (key, bits, gs, e_ldlq, e_rtn)
