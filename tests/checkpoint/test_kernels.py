"""quantlib.kernels: the torch reference against independent dense weights from quantlib.formats, the Triton kernels
against the torch reference, the dispatcher's routing and its argument checks.

The Triton tests skip without triton. Without CUDA they run in Triton's interpreter, and Triton (3.9) reads
TRITON_INTERPRET when it is first imported (it wraps its own tl.zeros, tl.sum, ... then), so this module sets it
before importing quantlib.kernels (which imports triton) and removes it again right after, so that other test
modules' backend="auto" stays on torch; the `device` fixture sets it back for each Triton test (the dispatcher also
reads it at call time). If triton was already imported without it, the Triton tests skip and say so. Shapes stay
small: the interpreter runs every program in numpy.
"""

from __future__ import annotations

import os

import pytest
import torch

# Before anything imports triton (see the module docstring).
_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

from quantlib.formats.bcq import BcqQuantized
from quantlib.formats.lut import LutQuantized
from quantlib.formats.uniform import UniformGrid, pack_codes, unpack_codes
from quantlib.kernels import (dequant_bcq, dequant_lut, dequant_uniform, gemv_bcq, gemv_lut, gemv_uniform, matmul_bcq,
                              matmul_lut, matmul_uniform, resolve_backend)
from quantlib.kernels import torch_ops, triton_ops

if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]

D_OUT, D_IN = 40, 192  # 40: partial row blocks (32 and 16); 192: partial column blocks, divisible by 32 and 64


# ---------------------------------------------------------------------------------------------------------------- #
# Inputs: each builder returns (tensors for the kernels, the dense weight from quantlib.formats)


def _n_groups(d_in, group_size):
    return 1 if group_size == -1 else d_in // group_size


def make_uniform(bits, group_size, d_out=D_OUT, d_in=D_IN, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ng = _n_groups(d_in, group_size)
    codes = torch.randint(0, 2 ** bits, (d_out, d_in), generator=gen).to(torch.uint8)
    scales = (torch.rand(d_out, ng, generator=gen) * 0.1 + 0.01).to(dtype)
    zeros = (torch.rand(d_out, ng, generator=gen) * (2 ** bits - 1)).to(dtype)  # real-valued zeros, as NeUQI's
    qweight = pack_codes(codes, bits)
    dense = UniformGrid(scales, zeros, bits, group_size).dequantize(unpack_codes(qweight, bits, d_in))
    return (qweight, scales, zeros), dense


def make_lut(bits, d_out=D_OUT, d_in=D_IN, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (d_out, d_in), generator=gen).to(torch.uint8)
    tables = torch.randn(d_out, 2 ** bits, generator=gen).to(torch.float16)
    rep = LutQuantized(codes, tables, bits)
    qweight = rep.to_tensors()["qweight"]
    # LutQuantized keeps float16 tables and dequantizes to float32: exact in either dtype.
    return (qweight, tables.to(dtype)), rep.dequantize().to(dtype)


def make_bcq(nb, group_size, d_out=D_OUT, d_in=D_IN, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ng = _n_groups(d_in, group_size)
    signs = torch.rand(nb, d_out, d_in, generator=gen) < 0.5
    alphas = (torch.rand(d_out, ng, nb, generator=gen) + 0.05).to(torch.float16)
    offsets = (torch.randn(d_out, ng, generator=gen) * 0.1).to(torch.float16)
    rep = BcqQuantized(signs, alphas, offsets, group_size)
    t = rep.to_tensors()
    # BcqQuantized sums in float32 from float16 parameters; ours sums in float32 and rounds to alpha's dtype.
    return (t["qplanes"], alphas.to(dtype), offsets.to(dtype)), rep.dequantize().to(dtype)


def make(fmt, bits, group_size, **kw):
    if fmt == "uniform":
        return make_uniform(bits, group_size, **kw)
    if fmt == "lut":
        return make_lut(bits, **kw)
    return make_bcq(bits, group_size, **kw)


def dequant(fmt, tensors, bits, group_size, d_in, **kw):
    if fmt == "uniform":
        return dequant_uniform(*tensors, bits, group_size, d_in, **kw)
    if fmt == "lut":
        return dequant_lut(*tensors, bits, d_in, **kw)
    return dequant_bcq(*tensors, group_size, d_in, **kw)


def gemv(fmt, x, tensors, bits, group_size, **kw):
    if fmt == "uniform":
        return gemv_uniform(x, *tensors, bits, group_size, **kw)
    if fmt == "lut":
        return gemv_lut(x, *tensors, bits, **kw)
    return gemv_bcq(x, *tensors, group_size, **kw)


def matmul(fmt, x, tensors, bits, group_size, **kw):
    if fmt == "uniform":
        return matmul_uniform(x, *tensors, bits, group_size, **kw)
    if fmt == "lut":
        return matmul_lut(x, *tensors, bits, **kw)
    return matmul_bcq(x, *tensors, group_size, **kw)


def assert_close(out, ref, rtol):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    atol = rtol * ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


# lut has no groups: one case per bit width.
CASES = ([("uniform", b, g) for b in (2, 3, 4, 8) for g in (32, 64, -1)]
         + [("lut", b, -1) for b in (2, 3, 4, 8)]
         + [("bcq", b, g) for b in (2, 3, 4, 8) for g in (32, 64, -1)])
FP16_CASES = [("uniform", 3, 32), ("uniform", 4, -1), ("lut", 3, -1), ("lut", 4, -1), ("bcq", 3, 64), ("bcq", 4, -1)]
# d_in = 104 at 3 bits: rows end mid-word and codes cross word boundaries at every offset; plus 1, 5 and 7 bits.
ODD_CASES = [("uniform", 3, 8), ("uniform", 3, -1), ("uniform", 5, 8), ("uniform", 7, -1), ("lut", 3, -1),
             ("lut", 1, -1), ("lut", 5, -1), ("bcq", 3, 8), ("bcq", 3, -1)]


@pytest.fixture
def device(monkeypatch):
    """The device for the Triton tests: CUDA when present, else the CPU through Triton's interpreter."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not triton_ops.LIBRARY_INTERPRETED:
        pytest.skip("no CUDA, and Triton's interpreter is off: TRITON_INTERPRET was not 1 when triton was imported "
                    "(Triton reads it at import); run this file on its own, or export TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def _to(tensors, device):
    return tuple(t.to(device) for t in tensors)


# ---------------------------------------------------------------------------------------------------------------- #
# The torch reference against the formats' own dequantization


@pytest.mark.parametrize("fmt,bits,group_size", CASES + ODD_CASES)
def test_torch_reference_matches_formats(fmt, bits, group_size):
    d_in = 104 if (fmt, bits, group_size) in ODD_CASES else D_IN
    tensors, dense = make(fmt, bits, group_size, d_in=d_in)
    qweight = tensors[0]
    if fmt in ("uniform", "lut"):  # the reference's stream decoder against the format's own
        assert torch.equal(torch_ops.unpack_stream(qweight, bits, d_in), unpack_codes(qweight, bits, d_in).long())
    w = dequant(fmt, tensors, bits, group_size, d_in, backend="torch")
    if fmt == "bcq":  # float32 sums in another order
        torch.testing.assert_close(w, dense, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(w, dense)
    x = torch.randn(3, d_in, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gemv(fmt, x, tensors, bits, group_size, backend="torch"), x @ dense.T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,bits,group_size", FP16_CASES)
def test_torch_reference_float16(fmt, bits, group_size):
    tensors, dense = make(fmt, bits, group_size, dtype=torch.float16)
    w = dequant(fmt, tensors, bits, group_size, D_IN, backend="torch")
    assert w.dtype == torch.float16
    if fmt == "uniform":  # (q - z) * s in float16, the same two roundings as UniformGrid.dequantize in float16
        assert torch.equal(w, dense)
    else:
        assert_close(w, dense, 1e-3)


# ---------------------------------------------------------------------------------------------------------------- #
# Triton against the torch reference


def _check_triton(fmt, bits, group_size, device, dtype, rtol, d_in=D_IN, **make_kw):
    tensors, _ = make(fmt, bits, group_size, d_in=d_in, dtype=dtype, **make_kw)
    tensors = _to(tensors, device)
    ref = dequant(fmt, tensors, bits, group_size, d_in, backend="torch")
    out = dequant(fmt, tensors, bits, group_size, d_in, backend="triton")
    assert_close(out, ref, rtol)
    gen = torch.Generator().manual_seed(2)
    for n in (1, 4):
        x = torch.randn(n, d_in, generator=gen).to(dtype).to(device)
        assert_close(gemv(fmt, x, tensors, bits, group_size, backend="triton"),
                     gemv(fmt, x, tensors, bits, group_size, backend="torch"), rtol)


@pytest.mark.parametrize("fmt,bits,group_size", CASES)
def test_triton_matches_torch_fp32(fmt, bits, group_size, device):
    _check_triton(fmt, bits, group_size, device, torch.float32, 1e-4)


@pytest.mark.parametrize("fmt,bits,group_size", FP16_CASES)
def test_triton_matches_torch_fp16(fmt, bits, group_size, device):
    _check_triton(fmt, bits, group_size, device, torch.float16, 1e-2)


@pytest.mark.parametrize("fmt,bits,group_size", ODD_CASES)
def test_triton_d_in_not_word_aligned(fmt, bits, group_size, device):
    _check_triton(fmt, bits, group_size, device, torch.float32, 1e-4, d_in=104)


@pytest.mark.parametrize("fmt", ["uniform", "lut", "bcq"])
def test_triton_small_blocks(fmt, device):
    """Blocks far smaller than the matrix: many programs, several d_in iterations, a partial block on both axes."""
    bits, g, d_in = 3, 8, 104
    tensors, _ = make(fmt, bits, g, d_in=d_in, d_out=37)
    tensors = _to(tensors, device)
    blocks = dict(block_r=8, block_k=32)
    params = (bits, g) if fmt == "uniform" else (bits,) if fmt == "lut" else (g,)
    ref = dequant(fmt, tensors, bits, g, d_in, backend="torch")
    out = getattr(triton_ops, f"dequant_{fmt}")(*tensors, *params, d_in, **blocks)
    assert_close(out, ref, 1e-4)
    x = torch.randn(5, d_in, generator=torch.Generator().manual_seed(3)).to(device)
    y = getattr(triton_ops, f"gemv_{fmt}")(x, *tensors, *params, **blocks)
    assert_close(y, gemv(fmt, x, tensors, bits, g, backend="torch"), 1e-4)


@pytest.mark.parametrize("fmt", ["uniform", "lut", "bcq"])
def test_triton_tiny_shapes(fmt, device):
    """Matrices smaller than one block in both directions: everything masked but a corner."""
    _check_triton(fmt, 3, -1, device, torch.float32, 1e-4, d_in=5, d_out=3)


# ---------------------------------------------------------------------------------------------------------------- #
# The dispatcher


@pytest.mark.parametrize("fmt", ["uniform", "lut", "bcq"])
def test_matmul_many_rows_is_dequant_then_matmul(fmt):
    bits, g = 3, 32
    tensors, _ = make(fmt, bits, g)
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(4))  # 15 rows > 8
    w = dequant(fmt, tensors, bits, g, D_IN, backend="torch")
    y = matmul(fmt, x, tensors, bits, g, backend="torch")
    assert y.shape == (3, 5, D_OUT)
    assert torch.equal(y, x @ w.T)


@pytest.mark.parametrize("fmt", ["uniform", "lut", "bcq"])
def test_matmul_triton_routes(fmt, device):
    bits, g = 4, 64
    tensors, _ = make(fmt, bits, g)
    tensors = _to(tensors, device)
    w = dequant(fmt, tensors, bits, g, D_IN, backend="torch")
    gen = torch.Generator().manual_seed(5)
    many = torch.randn(3, 5, D_IN, generator=gen).to(device)  # dequant kernel, then torch matmul
    assert_close(matmul(fmt, many, tensors, bits, g, backend="triton"), many @ w.T, 1e-4)
    few = torch.randn(2, 3, D_IN, generator=gen).to(device)  # 6 rows: the GEMV kernel
    y = matmul(fmt, few, tensors, bits, g, backend="triton")
    assert y.shape == (2, 3, D_OUT)
    assert torch.equal(y.reshape(6, D_OUT), gemv(fmt, few.reshape(6, D_IN), tensors, bits, g, backend="triton"))
    assert_close(y, few @ w.T, 1e-4)


def test_matmul_empty_rows_and_non_contiguous_inputs():
    (qw, s, z), dense = make_uniform(3, 32)
    assert matmul_uniform(torch.zeros(0, 4, D_IN), qw, s, z, 3, 32, backend="torch").shape == (0, 4, D_OUT)
    # Non-contiguous tensors are copied to contiguous memory by the dispatcher: same results.
    qw_nc, s_nc = qw.T.contiguous().T, s.T.contiguous().T
    x = torch.randn(D_IN, 2).T
    assert not (qw_nc.is_contiguous() or s_nc.is_contiguous() or x.is_contiguous())
    assert torch.equal(dequant_uniform(qw_nc, s_nc, z, 3, 32, D_IN, backend="torch"), dense)
    torch.testing.assert_close(gemv_uniform(x, qw_nc, s_nc, z, 3, 32, backend="torch"), x @ dense.T)


def test_non_contiguous_triton(device):
    (qw, s, z), _ = make_uniform(3, 32)
    qw, s, z = _to((qw.T.contiguous().T, s.T.contiguous().T, z), device)
    x = torch.randn(D_IN, 2).T.to(device)
    assert_close(gemv_uniform(x, qw, s, z, 3, 32, backend="triton"),
                 gemv_uniform(x, qw, s, z, 3, 32, backend="torch"), 1e-4)


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1|triton package"):
        resolve_backend("triton", cpu)
    (qw, s, z), _ = make_uniform(3, 32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1|triton package"):
        dequant_uniform(qw, s, z, 3, 32, D_IN, backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*'auto', 'torch', 'triton'"):
        dequant_uniform(qw, s, z, 3, 32, D_IN, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu) == ("triton" if triton_ops.LIBRARY_INTERPRETED else "torch")
    if triton_ops.AVAILABLE:  # the flag set now, but triton imported without it: a message that says so
        monkeypatch.setattr(triton_ops, "LIBRARY_INTERPRETED", False)
        assert resolve_backend("auto", cpu) == "torch"
        with pytest.raises(ValueError, match="after triton was imported"):
            resolve_backend("triton", cpu)


def test_without_triton(monkeypatch):
    """triton_ops imports without triton; the dispatcher then stays on torch and explains an explicit "triton"."""
    import importlib.util
    import sys

    from quantlib.kernels import dispatch

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("quantlib.kernels._triton_ops_without_triton", triton_ops.__file__)
    bare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bare)
    assert not bare.AVAILABLE and not bare.interpret_enabled()
    (qw, s, z), dense = make_uniform(3, 32)
    with pytest.raises(ImportError, match="triton"):
        bare.dequant_uniform(qw, s, z, 3, 32, D_IN)
    monkeypatch.setattr(dispatch, "triton_ops", bare)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert torch.equal(dequant_uniform(qw, s, z, 3, 32, D_IN), dense)
    with pytest.raises(ValueError, match="needs the triton package"):
        dequant_uniform(qw, s, z, 3, 32, D_IN, backend="triton")


# ---------------------------------------------------------------------------------------------------------------- #
# Bad inputs: ValueError naming the tensor or argument, before any work

U = make_uniform(3, 32)[0]
L = make_lut(3)[0]
B = make_bcq(3, 32)[0]
X = torch.randn(2, D_IN)


def _bad_cases():
    qw, s, z = U
    lq, lut = L
    p, a, o = B
    meta = torch.device("meta")
    return [
        # dtypes
        ("qweight", lambda: dequant_uniform(qw.float(), s, z, 3, 32, D_IN)),
        ("scales", lambda: dequant_uniform(qw, s.int(), z, 3, 32, D_IN)),
        ("zeros", lambda: dequant_uniform(qw, s, z.long(), 3, 32, D_IN)),
        ("lut", lambda: dequant_lut(lq, lut.int(), 3, D_IN)),
        ("planes", lambda: dequant_bcq(p.long(), a, o, 32, D_IN)),
        ("alpha", lambda: dequant_bcq(p, a.int(), o, 32, D_IN)),
        ("offset", lambda: dequant_bcq(p, a, o.int(), 32, D_IN)),
        ("x", lambda: gemv_uniform(X.int(), qw, s, z, 3, 32)),
        ("x", lambda: matmul_lut(X.int(), lq, lut, 3)),
        # shapes
        (r"qweight must have shape \(40, 18\)", lambda: dequant_uniform(qw[:, :-1], s, z, 3, 32, D_IN)),
        ("qweight", lambda: dequant_uniform(qw, s, z, 4, 32, D_IN)),
        ("qweight", lambda: gemv_uniform(X[:, :-32], qw, s, z, 3, 32)),
        ("scales", lambda: dequant_uniform(qw, s[:, :-1], z, 3, 32, D_IN)),
        ("zeros", lambda: dequant_uniform(qw, s, z[:-1], 3, 32, D_IN)),
        ("qweight", lambda: dequant_lut(lq[:, :-1], lut, 3, D_IN)),
        ("lut", lambda: dequant_lut(lq, lut[:, :4], 3, D_IN)),
        ("planes", lambda: dequant_bcq(p[:, :, :-1], a, o, 32, D_IN)),
        ("planes", lambda: dequant_bcq(p[0], a, o, 32, D_IN)),
        ("planes", lambda: dequant_bcq(torch.zeros(9, D_OUT, 6, dtype=torch.int32), a, o, 32, D_IN)),
        ("alpha", lambda: dequant_bcq(p, a[:, :, :2], o, 32, D_IN)),
        ("offset", lambda: dequant_bcq(p, a, o[:, :2], 32, D_IN)),
        # scalars
        ("bits", lambda: dequant_uniform(qw, s, z, 1, 32, D_IN)),
        ("bits", lambda: dequant_uniform(qw, s, z, 9, 32, D_IN)),
        ("bits", lambda: dequant_lut(lq, lut, 0, D_IN)),
        ("group_size", lambda: dequant_uniform(qw, s, z, 3, 40, D_IN)),
        ("group_size", lambda: dequant_uniform(qw, s, z, 3, 0, D_IN)),
        ("group_size", lambda: gemv_bcq(X, p, a, o, 50)),
        ("d_in", lambda: dequant_uniform(qw, s, z, 3, 32, 0)),
        # GEMV row limit
        ("x has 9 rows", lambda: gemv_uniform(torch.randn(9, D_IN), qw, s, z, 3, 32)),
        ("x has 9 rows", lambda: gemv_lut(torch.randn(9, D_IN), lq, lut, 3)),
        ("x has 9 rows", lambda: gemv_bcq(torch.randn(9, D_IN), p, a, o, 32)),
        ("x must be 2-D", lambda: gemv_lut(torch.randn(1, 2, D_IN), lq, lut, 3)),
        # devices
        ("zeros on meta", lambda: dequant_uniform(qw, s, z.to(meta), 3, 32, D_IN)),
        ("x on meta", lambda: gemv_lut(X.to(meta), lq, lut, 3)),
        ("offset on meta", lambda: matmul_bcq(X, p, a, o.to(meta), 32)),
    ]


@pytest.mark.parametrize("match,call", _bad_cases(), ids=[f"{i}-{m}" for i, (m, _) in enumerate(_bad_cases())])
def test_bad_inputs(match, call):
    with pytest.raises(ValueError, match=match):
        call()
