"""Text generation from a loaded model or any checkpoint path: seeded, streamed, greedy decoding equal wherever the
weights are equal (the model in memory, its saved quantized checkpoint reloaded)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tokenizer, calib_tokens, tiny_model
from quantlib.access.models import load_tokenizer
from quantlib.api import generate
from quantlib.catalog.spec import QuantSpec
from quantlib.checkpoint.writer import save_quantized
from quantlib.errors import ConfigError
from quantlib.evaluation.generate import Sampling
from quantlib.runner.walk import quantize_model

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny model quantized in memory (RTN w4g32) and its saved checkpoint."""
    d = tmp_path_factory.mktemp("gen")
    build_tokenizer(d / "tok")
    model = tiny_model("llama")
    spec = QuantSpec.parse("tiny.rtn.w4g32")
    report = quantize_model(model, spec, calib_tokens(4), progress=False)
    save_quantized(model, spec, report, d / "q", d / "tok")
    return model, load_tokenizer(d / "tok"), d / "q"


def test_greedy_from_the_checkpoint_equals_the_model_in_memory(quantized):
    model, tok, path = quantized
    in_memory = generate(model, PROMPT, tokenizer=tok, max_new_tokens=12)
    assert in_memory  # a random tiny model still says something
    assert generate(path, PROMPT, max_new_tokens=12) == in_memory
    # Greedy is the argmax of the model's own logits, step by step.
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tok.decode(ids[0, tok(PROMPT, return_tensors="pt")["input_ids"].shape[1]:].tolist(),
                          skip_special_tokens=True)
    assert in_memory == expected


def test_sampling_is_seeded_and_streams_the_same_text(quantized):
    model, tok, _ = quantized
    kwargs = dict(tokenizer=tok, max_new_tokens=16, sampler="sample", temperature=1.5)
    first, again = generate(model, PROMPT, seed=1, **kwargs), generate(model, PROMPT, seed=1, **kwargs)
    assert first == again
    others = {generate(model, PROMPT, seed=s, **kwargs) for s in range(2, 6)}
    assert others - {first}  # another seed draws other tokens (a random model's distribution is flat)
    pieces = []
    assert generate(model, PROMPT, seed=1, on_text=pieces.append, **kwargs) == first
    assert len(pieces) > 1 and "".join(pieces) == first
    # The caller's global random state is left as it was.
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    generate(model, PROMPT, seed=7, **kwargs)
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize("bad, fragment", [
    (dict(sampler="beam"), "sampler 'beam'"), (dict(temperature=0), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(chat=True), "chat template"),
])
def test_bad_settings_are_refused(quantized, bad, fragment):
    model, tok, _ = quantized
    with pytest.raises(ConfigError, match=fragment):
        generate(model, PROMPT, tokenizer=tok, **bad)


def test_a_loaded_model_needs_its_tokenizer(quantized):
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(quantized[0], PROMPT)
    assert Sampling().generate_kwargs() == {"do_sample": False}
