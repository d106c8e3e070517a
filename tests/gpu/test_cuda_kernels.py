"""The compiled Triton kernels on a CUDA device (not Triton's interpreter) against the plain-torch reference, for
every kernel format and for every pack format (quantlib.catalog.pack_formats), and packed tiny models on the GPU
against their unpacked forward.

The kernel cases (formats, bit widths, group sizes, odd d_in) and their builders are tests/checkpoint/test_kernels.py's,
which runs the same comparisons under the interpreter on a CPU. Bounds: dequantization is exact for uniform in
float32 (the same two roundings) and for lut in any dtype (a lookup), within 1e-6 relative for bcq in float32 (float32
sums, possibly fused) and 1e-2 for the others in half precision; GEMV and matmul within 1e-4 of the largest output in
float32, 1e-2 in float16 and 2e-2 in bfloat16 (the reference accumulates in another order). A packed model's logits:
within 1e-4 relative (float32) of the unpacked model's, on the dequantize-then-matmul path (more than 8 rows) and on
the GEMV path (a decoding step with the KV cache); float16 packing within 2 % (relative L2) of float32's.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO, build_tokenizer, calib_tokens, tiny_model
from cuda_support import GPU, strict_float32

from quantlib.catalog.pack_formats import PACK_FORMATS, packable
from quantlib.catalog.spec import QuantSpec
from quantlib.checkpoint.pack.load import PackedLinear, load_packed
from quantlib.checkpoint.pack.writer import pack_checkpoint
from quantlib.checkpoint.reader import load_quantized
from quantlib.checkpoint.writer import save_quantized
from quantlib.runner.walk import quantize_model

sys.path.insert(0, str(REPO / "tests" / "checkpoint"))  # the kernel tests' cases and builders
from test_kernels import CASES, D_IN, FP16_CASES, ODD_CASES, assert_close, dequant, gemv, make, matmul  # noqa: E402

from quantlib import kernels  # noqa: E402  (after test_kernels, which decides how triton is first imported)
from quantlib.kernels import triton_ops  # noqa: E402

pytestmark = GPU

# Short names tried for each pack format, first packable first: uniform grouped and per channel (RTN: data-free,
# exact on both devices), true binary-coding layers (ALTERNATING).
SOURCES = ["tiny.rtn.w4g32", "tiny.rtn.w3g32", "tiny.rtn.w4", "tiny.rtn.w3", "tiny.alternating.w3g32"]
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


def _check(fmt, bits, group_size, dtype, rtol, d_in=D_IN, d_out=40):
    tensors, _ = make(fmt, bits, group_size, d_in=d_in, d_out=d_out, dtype=dtype)
    tensors = tuple(t.to(CUDA) for t in tensors)
    ref = dequant(fmt, tensors, bits, group_size, d_in, backend="torch")
    out = dequant(fmt, tensors, bits, group_size, d_in, backend="triton")
    if fmt == "lut" or (fmt == "uniform" and dtype == torch.float32):  # a lookup; the same two float32 roundings
        assert out.dtype == ref.dtype and torch.equal(out, ref)
    else:  # bcq: float32 sums, possibly fused; half precision: Triton may keep q - z in float32 before the product
        assert_close(out, ref, 1e-6 if dtype == torch.float32 else 1e-2)
    gen = torch.Generator().manual_seed(2)
    for n in (1, 2, 5, 8):
        x = torch.randn(n, d_in, generator=gen).to(dtype).to(CUDA)
        assert_close(gemv(fmt, x, tensors, bits, group_size, backend="triton"),
                     gemv(fmt, x, tensors, bits, group_size, backend="torch"), rtol)
    x = torch.randn(3, 7, d_in, generator=gen).to(dtype).to(CUDA)  # 21 rows: dequantize, then matmul
    assert_close(matmul(fmt, x, tensors, bits, group_size, backend="triton"),
                 matmul(fmt, x, tensors, bits, group_size, backend="torch"), rtol)


@pytest.mark.parametrize("fmt,bits,group_size", CASES)
def test_compiled_kernels_equal_the_reference_fp32(fmt, bits, group_size):
    _check(fmt, bits, group_size, torch.float32, 1e-4)


@pytest.mark.parametrize("fmt,bits,group_size", ODD_CASES)
def test_compiled_kernels_d_in_not_word_aligned(fmt, bits, group_size):
    _check(fmt, bits, group_size, torch.float32, 1e-4, d_in=104)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("fmt,bits,group_size", FP16_CASES)
def test_compiled_kernels_half_precision(fmt, bits, group_size, dtype, rtol):
    _check(fmt, bits, group_size, dtype, rtol)


@pytest.mark.parametrize("fmt", ["uniform", "lut", "bcq"])
def test_compiled_kernels_at_a_large_shape(fmt):
    """Many programs and d_in iterations, partial row blocks (1000 rows), int64 row offsets in use."""
    _check(fmt, 4, -1 if fmt == "lut" else 128, torch.float16, 1e-2, d_in=4096, d_out=1000)


# ---------------------------------------------------------------------------------------------------------------- #
# Every pack format: its layers as the loader reads them, and a packed tiny model on the GPU


def _source(fmt: str) -> str:
    for name in SOURCES:
        if packable(QuantSpec.parse(name), fmt) is None:
            return name
    raise AssertionError(f"none of {SOURCES} can be packed as {fmt}: add a short name it holds")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """{(format, stat dtype): (packed dir, quantlib checkpoint dir)}, made on first use."""
    root = tmp_path_factory.mktemp("gpu-pack")
    build_tokenizer(root / "tok")
    made = {}

    def get(fmt: str, stat_dtype: str = "float32"):
        name = _source(fmt)
        src = root / name
        if not src.exists():
            model = tiny_model("llama")
            report = quantize_model(model, QuantSpec.parse(name), None, progress=False)
            save_quantized(model, QuantSpec.parse(name), report, src, root / "tok")
        out = root / f"{fmt}-{stat_dtype}"
        if (fmt, stat_dtype) not in made:
            pack_checkpoint(src, out, fmt, stat_dtype, stat_dtype)
            made[fmt, stat_dtype] = out
        return out, src

    return get


def _packed_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


@pytest.mark.parametrize("fmt", sorted(PACK_FORMATS))
def test_every_pack_format_compiled_kernels_equal_the_reference(fmt, packed):
    out, _ = packed(fmt)
    layers = _packed_layers(load_packed(out, backend="triton").to(CUDA))
    assert len(layers) == 14
    gen = torch.Generator().manual_seed(4)
    for name, m in layers.items():
        w_triton = m.dequantize()
        m.backend = "torch"
        w_torch = m.dequantize()
        if m.kind == "bcq":
            assert_close(w_triton, w_torch, 1e-6)
        else:
            assert torch.equal(w_triton, w_torch), name
        x = torch.randn(3, m.in_features, generator=gen).to(CUDA)
        y_torch = m(x)
        m.backend = "triton"
        assert_close(m(x), y_torch, 1e-4)


@pytest.mark.parametrize("fmt", sorted(PACK_FORMATS))
def test_a_packed_model_on_the_gpu_equals_its_unpacked_forward(fmt, packed):
    out, src = packed(fmt)
    ref = load_quantized(src).to(CUDA)
    model = load_packed(out, torch.float32, backend="triton").to(CUDA)
    x = calib_tokens(2, 16, seed=5).to(CUDA)  # 32 rows per linear: dequantize, then matmul
    with torch.no_grad():
        expected = ref(x).logits
        assert_close(model(x).logits, expected, 1e-4)
        # A decoding loop, one token a step with the KV cache: one row per linear, the GEMV kernel.
        past, steps = None, []
        for t in range(x.shape[1]):
            step = model(x[:1, t:t + 1], past_key_values=past, use_cache=True)
            past = step.past_key_values
            steps.append(step.logits[:, -1])
    assert_close(torch.stack(steps, 1), expected[:1], 1e-4)


@pytest.mark.parametrize("fmt", sorted(PACK_FORMATS))
def test_a_float16_packed_model_on_the_gpu_stays_close(fmt, packed):
    """The deployment setting: float16 statistics and activations. Logits within 2 % (relative L2) of the float32
    packed model's."""
    out32, _ = packed(fmt)
    out16, _ = packed(fmt, "float16")
    x = calib_tokens(2, 16, seed=6).to(CUDA)
    with torch.no_grad():
        a = load_packed(out16, torch.float16, backend="triton").to(CUDA)(x).logits.float()
        b = load_packed(out32, torch.float32, backend="triton").to(CUDA)(x).logits
    assert torch.isfinite(a).all()
    assert float((a - b).norm() / b.norm()) < 2e-2
