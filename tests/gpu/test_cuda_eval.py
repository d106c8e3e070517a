"""Evaluation on a CUDA device: perplexity against the CPU's (whole model and block by block), and flash attention
where it is installed (transformers' flash_attention_2) or built into torch (SDPA's flash kernel) against SDPA's
reference.

Bounds: perplexity in float32 on the GPU within 1e-4 relative of the CPU's (summation order only); block-by-block
within 1e-5 of the whole-model figure on the same GPU. Flash attention in float16: logits within 1e-2 of the largest
logit (relative L-infinity) and perplexity within 1e-3 of float16 SDPA's math kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calib_tokens, tiny_model
from cuda_support import GPU, relative_difference, strict_float32

from quantlib.access.models import resolve_attn
from quantlib.evaluation.perplexity import perplexity, perplexity_by_block

pytestmark = GPU

WINDOWS = calib_tokens(8, 64, seed=3)


@pytest.fixture(autouse=True)
def _float32():
    with strict_float32():
        yield


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_perplexity_on_cuda_equals_the_cpus(family):
    model = tiny_model(family)
    cpu = perplexity(copy.deepcopy(model), WINDOWS, batch_size=3, progress=False)
    gpu = perplexity(copy.deepcopy(model), WINDOWS, batch_size=3, device="cuda", progress=False)
    assert gpu["tokens_scored"] == cpu["tokens_scored"]
    assert relative_difference(gpu["ppl"], cpu["ppl"]) <= 1e-4, (gpu, cpu)
    by_block = perplexity_by_block(copy.deepcopy(model), WINDOWS, batch_size=3, device="cuda", progress=False)
    assert relative_difference(by_block["ppl"], gpu["ppl"]) <= 1e-5, (by_block, gpu)


def _half_model(attn: str):
    from transformers import AutoModelForCausalLM

    ref = tiny_model("llama")
    model = AutoModelForCausalLM.from_config(ref.config, attn_implementation=attn, dtype=torch.float16)
    model.load_state_dict(ref.state_dict())
    model.config.use_cache = False
    return model.eval().to("cuda")


def _compare_with_sdpa_math(model):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ref = _half_model("sdpa")
    x = WINDOWS.to("cuda")
    with torch.no_grad():
        got = model(x).logits.float()
        with sdpa_kernel(SDPBackend.MATH):
            expected = ref(x).logits.float()
            ppl_ref = perplexity(ref, WINDOWS, device="cuda", progress=False)["ppl"]
    assert torch.isfinite(got).all()
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-2
    return ppl_ref


def test_flash_attention_2_where_installed():
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        pytest.skip("flash-attn is not installed (pip install flash-attn --no-build-isolation, the `gpu` extra)")
    assert resolve_attn("auto", "cuda") == "flash_attention_2"
    model = _half_model("flash_attention_2")
    ppl_ref = _compare_with_sdpa_math(model)
    ppl = perplexity(model, WINDOWS, device="cuda", progress=False)["ppl"]
    assert relative_difference(ppl, ppl_ref) <= 1e-3


def test_sdpa_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _half_model("sdpa")
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            model(WINDOWS[:1].to("cuda"))
    except RuntimeError as exc:  # "No available kernel": an old GPU, or a mask the flash kernel does not take
        pytest.skip(f"SDPA's flash kernel does not run here: {exc}")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ppl_ref = _compare_with_sdpa_math(model)
        ppl = perplexity(model, WINDOWS, device="cuda", progress=False)["ppl"]
    assert relative_difference(ppl, ppl_ref) <= 1e-3
