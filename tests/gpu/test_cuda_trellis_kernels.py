"""The compiled Triton kernels of the `trellis` format (QTIP) on a CUDA device against the plain-torch reference on the
same device, for every (L, k, V, code) of tests/checkpoint/test_trellis_kernels.py (which runs the same comparisons
in Triton's interpreter on a CPU), at a QTIP-sized shape, and a QTIP-quantized tiny model decoding through the GEMV.

Bounds: the transformed-domain weight W_t is equal bit for bit (integer arithmetic, float16 bit patterns, an IEEE
division `div_rn` and one float32 product, as the reference computes them), hence so is the dequantized weight
(the same float64 transform of the same W_t on the same device); against the CPU's TrellisQuantized.dequantize,
within 1e-6 (a float64 Hadamard transform on another device). GEMV and matmul within 1e-5 (float32) of x @ w.T.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO, build_tokenizer, calib_tokens, tiny_model
from cuda_support import GPU, strict_float32

sys.path.insert(0, str(REPO / "tests" / "checkpoint"))
from test_trellis_kernels import COMBOS, TILE, args_of, make_rep

from quantlib import kernels
from quantlib.kernels import triton_ops

pytestmark = GPU
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _compiled():
    if triton_ops.triton is None:
        pytest.skip("the triton package is not installed: the Triton kernels cannot run")
    if triton_ops.LIBRARY_INTERPRETED or triton_ops.interpret_requested():
        pytest.skip("Triton's interpreter is on (TRITON_INTERPRET=1): these tests are for the compiled kernels")
    assert kernels.resolve_backend("auto", CUDA) == "triton"
    with strict_float32():
        yield


def _cuda(rep):
    pos, kw = args_of(rep)
    pos = tuple(a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in pos)
    return pos, {k: None if v is None else v.to(CUDA) for k, v in kw.items()}


def _check(rep, d_in):
    pos, kw = _cuda(rep)
    wt = kernels.dequant_trellis(*pos, d_in, **kw, backend="triton", transformed=True)
    assert torch.equal(wt, kernels.dequant_trellis(*pos, d_in, **kw, backend="torch", transformed=True))
    w = kernels.dequant_trellis(*pos, d_in, **kw, backend="triton")
    assert torch.equal(w, kernels.dequant_trellis(*pos, d_in, **kw, backend="torch"))
    torch.testing.assert_close(w.cpu(), rep.dequantize(), rtol=1e-6, atol=1e-6)
    gen = torch.Generator().manual_seed(2)
    for n in (1, 2, 5, 8):
        x = torch.randn(n, d_in, generator=gen).to(CUDA)
        torch.testing.assert_close(kernels.gemv_trellis(x, *pos, **kw, backend="triton"), x @ w.T,
                                   rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 7, d_in, generator=gen).to(CUDA)  # 21 rows: dequantize, then matmul
    torch.testing.assert_close(kernels.matmul_trellis(x, *pos, **kw, backend="triton"), x @ w.T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("L,k,code", COMBOS)
def test_compiled_trellis_kernels_equal_the_reference(L, k, code):
    _check(make_rep(L, k, code), 16)


@pytest.mark.parametrize("L,k,code", [(16, 2, "1mad"), (16, 2, "3inst"), (16, 2, "hyb")])
def test_compiled_trellis_kernels_at_qtips_shape(L, k, code):
    """QTIP's 16 x 16 tiles, L = 16, a 2-segment 1024 x 2048 layer: many programs and d_in iterations."""
    _check(make_rep(L, k, code, segments=(512, 512), d_in=2048, tile=(16, 16)), 2048)


def test_compiled_trellis_small_tile():
    _check(make_rep(12, 3, "1mad", tile=TILE), 16)


def test_a_qtip_model_decodes_through_the_gemv(tmp_path):
    """A QTIP-quantized tiny model loaded with trellis_backend="triton" on the GPU: the logits of a full forward
    (dequantize, then matmul) and of a decoding loop (one row per linear: the GEMV) equal the dequantized model's."""
    from quantlib.catalog.spec import QuantSpec
    from quantlib.checkpoint.reader import load_quantized
    from quantlib.checkpoint.writer import save_quantized
    from quantlib.runner.walk import quantize_model

    build_tokenizer(tmp_path / "tok")
    spec = QuantSpec.parse("m.c4.n8.L32.qtip.w2.1mad.tl8")
    model = tiny_model("llama")
    report = quantize_model(model, spec, calib_tokens(8), progress=False)
    save_quantized(model, spec, report, tmp_path / "q", tmp_path / "tok")
    ref = load_quantized(tmp_path / "q").to(CUDA)
    fast = load_quantized(tmp_path / "q", trellis_backend="triton").to(CUDA)
    x = calib_tokens(2, 16, seed=5).to(CUDA)
    with torch.no_grad():
        expected = ref(x).logits
        torch.testing.assert_close(fast(x).logits, expected, rtol=1e-4, atol=1e-4)
        past, steps = None, []
        for t in range(x.shape[1]):
            step = fast(x[:1, t:t + 1], past_key_values=past, use_cache=True)
            past = step.past_key_values
            steps.append(step.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), expected[:1], rtol=1e-4, atol=1e-4)
