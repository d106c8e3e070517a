"""Families with several kinds of decoder layer (Gemma 3: sliding-window and global attention, each with its own mask
and rotary table): a walk block by block hands each block the arguments of its kind (quantlib.access.blocks.
LayerKwargs), so perplexity and every block's inputs are those of the model's own forward."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, calib_tokens, tiny_model

from quantlib.access.blocks import BlockAccess
from quantlib.access.lazy import LazyModel
from quantlib.artifacts.integrity import seal_dir
from quantlib.evaluation.perplexity import perplexity, perplexity_by_block
from quantlib.stats import capture
from quantlib.stats.artifacts import fp_blocks
from quantlib.stats.hessian import HessianAccumulator


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gemma3")
    build_tokenizer(d)
    tiny_model("gemma3_text").save_pretrained(d)
    seal_dir(d)
    return d


def test_the_tiny_model_has_two_kinds_whose_arguments_differ():
    model = tiny_model("gemma3_text")
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    kinds = BlockAccess(model).layer_kwargs
    assert not kinds.differs(0) and kinds.differs(1)
    own = kinds.of("full_attention", torch.zeros(2, 32, 64))
    # sdpa's global layers take no mask (causal), the sliding ones a windowed mask; the rotary tables differ
    assert set(own) == {"attention_mask", "position_embeddings"} and own["attention_mask"] is None


@pytest.mark.parametrize("streams", ["memory", "disk"])
def test_perplexity_block_by_block_equals_the_whole_model(gemma_dir, streams):
    windows = calib_tokens(5, 32, seed=3)  # 32 tokens against a window of 8: the sliding mask matters
    ref = perplexity(LazyModel(gemma_dir).load_all(), windows, batch_size=2, progress=False)
    lazy = LazyModel(gemma_dir)
    by_block = perplexity_by_block(lazy.model, windows, batch_size=2, access=BlockAccess(lazy.model, lazy=lazy),
                                   progress=False, streams=streams)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    assert by_block["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    model = tiny_model("gemma3_text")
    in_memory = perplexity_by_block(model, windows, batch_size=2, progress=False)
    assert in_memory["ppl"] == pytest.approx(perplexity(model, windows, batch_size=2, progress=False)["ppl"], rel=1e-6)


def test_without_the_arguments_of_its_kind_a_global_block_computes_something_else(monkeypatch):
    """What the hook is for: block 0's (sliding) arguments given to every block change the figure."""
    model, windows = tiny_model("gemma3_text"), calib_tokens(5, 32, seed=3)
    ref = perplexity(model, windows, batch_size=2, progress=False)["ppl"]
    from quantlib.access.blocks import LayerKwargs

    monkeypatch.setattr(LayerKwargs, "differs", lambda self, i: False)
    wrong = perplexity_by_block(model, windows, batch_size=2, progress=False)["ppl"]
    assert abs(wrong - ref) / ref > 1e-4


def test_block_inputs_of_the_walk_are_those_of_the_models_own_forward(gemma_dir):
    """The FP walk's Hessians (statistics, and the runner's from the same capture) against hooks on one forward of
    the whole model, block by block."""
    tokens = calib_tokens(6, 32, seed=5)
    model = LazyModel(gemma_dir).load_all()
    adapter_groups = [("self_attn.q_proj",), ("self_attn.o_proj",), ("mlp.gate_proj",), ("mlp.down_proj",)]
    refs, handles = {}, []
    for i, block in enumerate(model.model.layers):
        for (name,) in adapter_groups:
            lin = block.get_submodule(name)
            refs[i, name] = acc = HessianAccumulator(lin.in_features)
            handles.append(lin.register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0])))
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    lazy = LazyModel(gemma_dir)
    for i, block, states, _ in fp_blocks(lazy.model, tokens, "cpu", 64, False, "test",
                                         BlockAccess(lazy.model, lazy=lazy)):
        for (name,), H in zip(adapter_groups, capture.hessians(block, adapter_groups, states, "cpu", stop=False)):
            torch.testing.assert_close(H, refs[i, name].result(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_gemma_1_and_2_block_by_block_equal_the_whole_model(family):
    """The other Gemma entries of ADAPTERS; Gemma 2 (sliding and global layers too) loads with eager attention only."""
    import transformers as T

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    config = T.GemmaConfig(**common) if family == "gemma" else T.Gemma2Config(sliding_window=8, **common)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager" if family == "gemma2" else "sdpa")
    model.config.use_cache = False
    model.eval()
    windows = calib_tokens(5, 32, seed=3)
    assert BlockAccess(model).layer_kwargs.differs(1) == (family == "gemma2")
    by_block = perplexity_by_block(model, windows, batch_size=2, progress=False)["ppl"]
    assert by_block == pytest.approx(perplexity(model, windows, batch_size=2, progress=False)["ppl"], rel=1e-6)
