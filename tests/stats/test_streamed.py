"""The streamed backward (`quantlib.stats.streamed`): the `gradients` statistic computed block by block, from a
model in memory or read lazily from disk, with activations in memory or on disk, equals the whole-model autograd
computation it replaced (kept here as the reference)."""

from __future__ import annotations

import pytest
import torch
from conftest import calib_tokens, tiny_model
from safetensors.torch import load_file

from quantlib.access.adapters import adapter_for
from quantlib.access.blocks import BlockAccess
from quantlib.access.lazy import LazyModel
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec
from quantlib.errors import ConfigError
from quantlib.jobs.memory import AUTO_STREAMS_GROWTH, MB, eval_streams, parse_memory, plan_quantize
from quantlib.jobs.memory_backward import plan_distill, plan_statistic
from quantlib.jobs.requests import request_mb
from quantlib.jobs.steps import statistic
from quantlib.stats import gradients
from quantlib.stats.artifacts import block_file, compute_statistic

CALIB = "m.c4.n5.L16"


def whole_model_gradients(model, tokens: torch.Tensor, G: int) -> dict:
    """The reference: one forward and backward pass of the whole model per window (the code before the streamed
    backward). {block: {f"{layer}.fisher" / f"{layer}.saliency": tensor}}."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    n, L = tokens.shape
    model.requires_grad_(False)
    names = [(i, name, lin) for i, b in enumerate(blocks) for name, lin in adapter.linears(b)]
    out = {i: {} for i in range(len(blocks))}
    for i, name, lin in names:
        out[i][f"{name}.fisher"] = torch.zeros(lin.weight.shape)
        out[i][f"{name}.saliency"] = torch.empty(n, L, G, dtype=torch.bfloat16)
    window, handles = {"n": 0}, []
    for i, name, lin in names:
        lin.weight.requires_grad_(True)

        def fold(p, i=i, name=name):
            out[i][f"{name}.fisher"].add_(p.grad.float().square())
            p.grad = None

        def keep(module, args, z, i=i, name=name):
            def sal(grad):
                s = (grad.float() * 1e3).square().reshape(grad.shape[0], L, G, -1).mean(-1)
                out[i][f"{name}.saliency"][window["n"]] = s[0].to(torch.bfloat16)
            z.register_hook(sal)

        handles += [lin.weight.register_post_accumulate_grad_hook(fold), lin.register_forward_hook(keep)]
    try:
        for w in range(n):
            window["n"] = w
            ids = tokens[w:w + 1]
            model(ids, labels=ids, use_cache=False).loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.requires_grad_(False)
    return out


def _artifact(path, blocks: int) -> dict:
    return {i: load_file(str(path / block_file(i))) for i in range(blocks)}


def _assert_close(got: dict, want: dict) -> None:
    """Fisher to rtol 1e-4 (atol 1e-4 of the layer's largest entry); saliency (bfloat16) within one bfloat16 ulp,
    or 1e-4 of the layer's largest entry for entries that are rounding noise around 0 (the first token's query
    gradient, zero in exact arithmetic). Measured: bit-identical but for such entries when the loss is pieced."""
    for i in want:
        assert got[i].keys() == want[i].keys()
        for key, ref in want[i].items():
            x = got[i][key]
            if key.endswith(".fisher"):
                torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=key)
            else:
                assert x.dtype == torch.bfloat16
                ulp = 2.0 ** (torch.frexp(ref.float()).exponent.float() - 8)
                tol = torch.maximum(ulp, torch.tensor(1e-4 * float(ref.float().abs().max())))
                assert bool(((x.float() - ref.float()).abs() <= tol).all()), f"block {i} {key}"


@pytest.mark.parametrize("family,loss_tokens", [("llama", None), ("opt", None), ("llama", 5 * 300)])
def test_streamed_gradients_equal_whole_model_autograd(family, loss_tokens, tmp_path, monkeypatch):
    """In memory; with `loss_tokens`, the end loss taken 5 tokens at a time (a vocabulary of 300)."""
    if loss_tokens:
        monkeypatch.setattr(gradients, "LOSS_LOGITS", loss_tokens)
    tokens = calib_tokens(5, 16)
    compute_statistic("gradients.G4", tiny_model(family), tokens, tmp_path / "g", CALIB, "m", progress=False)
    want = whole_model_gradients(tiny_model(family), tokens, 4)
    _assert_close(_artifact(tmp_path / "g", len(want)), want)


@pytest.mark.parametrize("streams", ["memory", "disk"])
def test_streamed_gradients_read_lazily_equal_whole_model_autograd(tiny_dir, tmp_path, streams):
    """The job's way: the model read block by block from its checkpoint, activations in memory or on disk."""
    tokens = calib_tokens(5, 16)
    lazy = LazyModel(tiny_dir)
    compute_statistic("gradients.G4", lazy.model, tokens, tmp_path / "g", CALIB, "m", progress=False,
                      access=BlockAccess(lazy.model, lazy=lazy), streams=streams)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())  # every block and the head freed again
    want = whole_model_gradients(tiny_model("llama"), tokens, 4)
    _assert_close(_artifact(tmp_path / "g", len(want)), want)


LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000}


def test_a_budget_too_small_is_refused_before_any_weight_is_read(tiny_dir, tmp_path):
    """The statistics job plans its memory from config.json alone: the windows and weights are never opened."""
    with pytest.raises(ConfigError, match=r"compute.max_memory is 100 MB, but the statistic gradients.G4 needs at "
                                          r"least [0-9,]+ MB even with activations on disk"):
        statistic("gradients.G4", "tiny.c4.n5.L16", tiny_dir, tmp_path / "no-windows.pt", tmp_path / "g",
                  {"device": "cpu", "dtype": "float32", "max_memory": "100MB"})
    assert not (tmp_path / "g").exists()


def test_the_budget_puts_the_kept_activations_on_disk_and_the_rules_ask_for_the_plan():
    calib = CalibSpec("c4", 128, 2048)
    in_memory = {"block_streams": "memory"}
    free = plan_statistic(LLAMA2_7B, "gradients.G4", calib, in_memory)
    # every block's inputs over 128 x 2048 tokens, float32: 32 x 4 GiB
    assert free.streams == "memory" and free.peak > 32 * 4 * 1024 * MB
    tight = plan_statistic(LLAMA2_7B, "gradients.G4", calib, {**in_memory, "max_memory": "24GB"})
    assert tight.streams == "disk" and tight.peak <= parse_memory("24GB")
    with pytest.raises(ConfigError, match="Raise compute.max_memory to at least"):
        plan_statistic(LLAMA2_7B, "gradients.G4", calib, {"max_memory": "2GB"})
    assert request_mb("stats:gradients.G4", LLAMA2_7B, calib, {"compute": in_memory}) == int(1.5 * free.peak / MB)
    assert request_mb("stats:gradients.G4", LLAMA2_7B, calib, {"compute": {"max_memory": "24GB"}}) == 24 * 1024
    spec = QuantSpec.parse("llama-2-7b.rtn.w3g128.kd.c4.n128.L2048")
    d_free = plan_distill(LLAMA2_7B, spec, in_memory)
    d_tight = plan_distill(LLAMA2_7B, spec, {**in_memory, "max_memory": "16GB"})
    assert d_free.streams == "memory" and d_tight.streams == "disk" and d_tight.peak <= parse_memory("16GB")
    assert request_mb("distill", LLAMA2_7B, spec, {"compute": in_memory}) == int(1.5 * d_free.peak / MB)
    # the default (`auto`) puts streams that would hold more than the job's block on disk without a budget
    assert plan_statistic(LLAMA2_7B, "gradients.G4", calib, {}).streams == "disk"
    assert plan_distill(LLAMA2_7B, spec, {}).streams == "disk"
    # the streamed jobs hold about one block, not the model (7B in float32 alone: 27 GB)
    assert tight.peak < 8 * 1024 * MB and d_tight.peak < 12 * 1024 * MB


SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152, "tie_word_embeddings": True}


def test_auto_streams_stay_in_memory_only_where_they_cost_little():
    """`compute.block_streams: auto` on the offline model's shapes: the gradients statistic's kept inputs of every
    block (30 x 32 x 512 tokens, 1.1 GB) would more than double its peak, so they go to disk; a quantize job's two
    streams of one block and a perplexity job's hidden states are small beside the rest and stay in memory; an
    explicit setting is obeyed."""
    calib = CalibSpec("c4", 32, 512)
    grads = {w: plan_statistic(SMOLLM2_135M, "gradients.G4", calib, {"block_streams": w}).peak
             for w in ("memory", "disk")}
    assert grads["memory"] > AUTO_STREAMS_GROWTH * grads["disk"]
    assert plan_statistic(SMOLLM2_135M, "gradients.G4", calib, {}).streams == "disk"
    assert plan_statistic(SMOLLM2_135M, "gradients.G4", calib, {"block_streams": "memory"}).streams == "memory"
    ldlq = QuantSpec.parse("smollm2.c4.n32.L512.ldlq.w3g64")
    assert plan_quantize(SMOLLM2_135M, ldlq, {}).streams == "memory"
    assert plan_quantize(SMOLLM2_135M, ldlq, {"block_streams": "disk"}).streams == "disk"
    assert eval_streams(SMOLLM2_135M, 40, 512, 4, {}) == "memory"
