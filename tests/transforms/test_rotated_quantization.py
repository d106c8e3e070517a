"""Weight-and-activation quantization end to end on a tiny Llama: the quantize job rotates the model, installs the
quantized forward, captures Hessians from it, stores the forward's settings; loading (in a fresh process) rebuilds
the same forward."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, build_tokenizer, calib_tokens, sealed_windows, tiny_model

from quantlib.artifacts.integrity import seal_dir
from quantlib.catalog.spec import QuantSpec
from quantlib.checkpoint.reader import load_quantized
from quantlib.jobs.steps import quantize
from quantlib.transforms import activations as A

NAME = "tiny.toy.n8.L32.quarot.ldlq.w4.a4.kv4.sym"
COMPUTE = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A tiny Llama with a tied head and random norm gains, saved with its tokenizer."""
    d = tmp_path_factory.mktemp("tiny-tied")
    build_tokenizer(d)
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 0.5 + torch.rand(p.shape, generator=g)
    model.save_pretrained(d)
    seal_dir(d)
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return sealed_windows(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="module")
def quantized(tied_dir, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "model"
    quantize(NAME, tied_dir, {"calib": calib}, out, COMPUTE)
    return out


def test_checkpoint_records_the_forward(quantized):
    cfg = json.loads((quantized / "config.json").read_text())
    assert cfg[A.CONFIG_KEY] == {"act_bits": 4, "act_sym": False, "act_clip": 0.9, "kv_bits": 4, "kv_sym": False,
                                 "kv_clip": 0.95, "kv_group": 0, "rotated": True, "o_rotated": True}
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["spec"] == NAME
    # the head is stored on its own; the norms hold no gain (folded into the quantized linears)
    index = json.loads((quantized / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" in index
    model = load_quantized(quantized)
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "norm" in n)
    assert model.config._attn_implementation == "quantlib_sdpa"


def test_fresh_process_load_gives_identical_logits(quantized, tmp_path):
    x = calib_tokens(2, 16, seed=5)
    model = load_quantized(quantized)
    with torch.no_grad():
        here = model(x).logits
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from quantlib.checkpoint.reader import load_quantized; "
            "m = load_quantized(sys.argv[1]); x = torch.load(sys.argv[2]); "
            "torch.save(m(x).logits.detach(), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(quantized), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=REPO)
    assert torch.equal(torch.load(tmp_path / "y.pt"), here)
    # the stored forward is what runs: without it (no online Hadamards, no quantized activations) logits differ
    A.uninstall(model)
    with torch.no_grad():
        assert (model(x).logits - here).abs().max() > 1e-3


def test_hessians_come_from_the_rotated_activation_quantized_model(tied_dir, monkeypatch):
    """Block 0's q/k/v Hessian equals the one computed independently from the rotated embeddings, normalised and
    fake-quantized to 4 bits per token (the norm's gain is folded: it is 1)."""
    from quantlib.access.lazy import LazyModel
    from quantlib.runner import group
    from quantlib.runner.walk import quantize_model
    from quantlib.transforms.rotation import quarot_rotations

    seen = {}
    original = group.GroupQuantizer.__call__

    def record(self, block_idx, adapter, block, grp, H, device):
        seen.setdefault((block_idx, grp), H.clone())
        return original(self, block_idx, adapter, block, grp, H, device)

    monkeypatch.setattr(group.GroupQuantizer, "__call__", record)
    model = LazyModel(tied_dir).load_all()
    emb = model.model.embed_tokens.weight.detach().double().clone()
    tokens = calib_tokens(8, 32)
    quantize_model(model, QuantSpec.parse(NAME), tokens, progress=False)
    Q1, _ = quarot_rotations(model, 0)
    x = (emb @ Q1)[tokens].float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    xq = A.fake_quant(x, 4, clip=0.9).reshape(-1, x.shape[-1]).double()
    ref = xq.T @ xq
    H = seen[(0, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))].double()
    assert torch.allclose(H / H.trace(), ref / ref.trace(), atol=1e-6)
    # and not the unquantized one
    xf = x.reshape(-1, x.shape[-1]).double()
    assert not torch.allclose(H / H.trace(), xf.T @ xf / (xf.T @ xf).trace(), atol=1e-4)


def test_no_rotation_activation_quantized_rtn_round_trips(tiny_dir, tmp_path):
    # RTN weights with 4-bit activations and cache, no rotation: data-free, read block by block, stored and reloaded
    name = "tiny.rtn.w4.a4.kv4"
    quantize(name, tiny_dir, {}, tmp_path / "q", COMPUTE)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg[A.CONFIG_KEY]["rotated"] is False and cfg[A.CONFIG_KEY]["act_bits"] == 4
    model = load_quantized(tmp_path / "q")
    x = calib_tokens(2, 16, seed=5)
    with torch.no_grad():
        q = model(x).logits
        A.uninstall(model)
        assert (model(x).logits - q).abs().max() > 1e-4


def test_refusals():
    from quantlib.errors import ConfigError
    with pytest.raises(ConfigError, match="fpin"):
        QuantSpec.parse("tiny.toy.n8.L32.quarot.ldlq.w4.fpin")
    with pytest.raises(ConfigError, match="gq1"):
        QuantSpec.parse("tiny.toy.n8.L32.quarot.ldlq.w4.gq4")
    assert QuantSpec.parse("tiny.toy.n8.L32.quarot.ldlq.w4.a4.gq1.kv4.sym").statistic_kinds() == ["gradients"]
    with pytest.raises(ConfigError, match="between 2 and 16"):
        QuantSpec.parse("tiny.rtn.w4.a1")
    with pytest.raises(ConfigError):  # block-wise solvers take no preprocessor, nor the forward options
        QuantSpec.parse("tiny.toy.n8.L32.quarot.lsq.w4")


def test_lm_eval_runs_the_stored_forward(quantized, task_files, tmp_path):
    # lm-eval sees the model as stored (rotated weights, online Hadamards, quantized activations and KV cache),
    # loaded whole or with its blocks offloaded to disk; the same weights without that forward score otherwise
    from quantlib.access.lazy import LazyModel, offloaded
    from quantlib.checkpoint.reader import load_any
    from quantlib.evaluation.lmeval import TaskSet, evaluate_tasks

    splits = {"piqa": "validation", "lambada_openai": "test"}
    sources = {t: {"num_fewshot": 0, "limit": 6, "source": {"data_files": str(task_files[t]), "split": s}}
               for t, s in splits.items()}

    def run(model, where):
        ts = TaskSet(sources, tmp_path / where)
        ts.check_data()
        return evaluate_tasks(model, quantized, ts, "cpu", batch_size=4, bootstrap_iters=0)

    whole = run(load_any(quantized), "whole")
    lazy = LazyModel(quantized, torch.float32, "sdpa")
    on_disk = run(offloaded(lazy, tmp_path / "offload"), "offload")
    plain = load_any(quantized)
    A.uninstall(plain)
    bare = run(plain, "bare")
    ppl = {k: r["lambada_openai"]["metrics"]["perplexity"] for k, r in
           (("whole", whole), ("on_disk", on_disk), ("bare", bare))}
    assert ppl["whole"] == pytest.approx(ppl["on_disk"], rel=1e-5)
    assert abs(ppl["whole"] - ppl["bare"]) > 1e-3 * ppl["whole"]
