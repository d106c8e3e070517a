"""Triton kernels: dequantize and GEMV (n <= 8 activation rows) for the `uniform`, `lut` and `bcq` packed formats.

Every kernel tiles the output rows (BLOCK_R of them per program); dequant kernels also tile d_in, GEMV kernels loop
over d_in in BLOCK_K columns with a float32 accumulator of (BLOCK_N activation rows, BLOCK_R output rows). A code j of
a row starts at bit j*b of the row's LSB-first stream: the kernels load its word and the next (only when the code
crosses into it), widen both to 64 bits through uint32 so that a negative int32 does not sign-extend, shift, mask.

The callers (`dispatch.py`) validate shapes and dtypes and pass contiguous tensors; nothing is checked here.

Interpreter: Triton wraps its own language library (tl.zeros, tl.sum, ...) with `triton.jit` when `triton` is first
imported, as interpreted or as compiled functions depending on TRITON_INTERPRET at that moment (triton 3.9; setting
the variable later does not convert them). So TRITON_INTERPRET=1 must be in the environment before the first
`import triton`; `LIBRARY_INTERPRETED` records which mode the library got, and the kernels below are wrapped in that
same mode whatever the variable says when this module is imported. This module imports without triton; its
functions then raise ImportError.
"""

# String annotations (`tl.constexpr` is not evaluated when triton is absent); triton parses them as constexpr.
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; the dispatcher never picks this one
    triton = None
    tl = None

AVAILABLE = triton is not None
MAX_GEMV_ROWS = 8


def _library_interpreted() -> bool:
    if triton is None:
        return False
    try:
        import triton.language.standard as standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return any(isinstance(v, InterpretedFunction) for v in vars(standard).values())


LIBRARY_INTERPRETED = _library_interpreted()


def interpret_requested() -> bool:
    """TRITON_INTERPRET as Triton reads it (1, true, on, yes)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpret_enabled() -> bool:
    """Whether the kernels can run on the CPU now: TRITON_INTERPRET is set and was set when triton was imported."""
    return LIBRARY_INTERPRETED and interpret_requested()


# ---------------------------------------------------------------------------------------------------------------- #
# Kernels and the device functions they share (plain functions, wrapped by `jit_kernel` below)


def _decode_codes_fn(q_ptr, rows64, cols, mask, n_words, BITS: tl.constexpr):
    """The BITS-bit codes of columns `cols` of rows `rows64`: code j starts at bit j*BITS of its row's stream."""
    bit = cols * BITS
    word, shift = bit >> 5, bit & 31
    wptr = q_ptr + rows64[:, None] * n_words + word[None, :]
    lo = tl.load(wptr, mask=mask, other=0)
    # The next word only when the code crosses into it; it then exists (a row has ceil(d_in * BITS / 32) words).
    hi_mask = mask & ((shift + BITS) > 32)[None, :]
    hi = tl.load(wptr + 1, mask=hi_mask, other=0)
    stream = lo.to(tl.uint32, bitcast=True).to(tl.int64) | (hi.to(tl.uint32, bitcast=True).to(tl.int64) << 32)
    return (stream >> shift.to(tl.int64)[None, :]) & ((1 << BITS) - 1)


def _bcq_weight_fn(p_ptr, a_ptr, o_ptr, g, rows64, cols, mask, n_words, plane_stride, NB: tl.constexpr):
    """sum_i alpha_i sign_i + offset in float32 for a (rows, cols) tile; `g` indexes the (row, group) statistics."""
    # The pointer steps one plane at a time, so no int32 product i * plane_stride can overflow.
    wptr = p_ptr + rows64[:, None] * n_words + (cols >> 5)[None, :]
    w = tl.zeros(mask.shape, dtype=tl.float32)
    for i in tl.static_range(NB):
        word = tl.load(wptr, mask=mask, other=0)
        # One bit never crosses a word; the low bit after the (arithmetic) shift is the wanted bit whatever the sign.
        sign = ((word >> (cols & 31)[None, :]) & 1) * 2 - 1
        a = tl.load(a_ptr + g * NB + i, mask=mask, other=0.0).to(tl.float32)
        w += a * sign.to(tl.float32)
        wptr += plane_stride
    return w + tl.load(o_ptr + g, mask=mask, other=0.0).to(tl.float32)


def _uniform_dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, d_out, d_in, n_words, n_groups, group_size,
                            BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)  # row offsets in int64: d_out * d_in may pass 2^31 on large layers
    mask = (rows < d_out)[:, None] & (cols < d_in)[None, :]
    q = _decode_codes(q_ptr, rows64, cols, mask, n_words, BITS)
    gptr = rows64[:, None] * n_groups + (cols // group_size)[None, :]
    s = tl.load(s_ptr + gptr, mask=mask, other=0.0)
    z = tl.load(z_ptr + gptr, mask=mask, other=0.0)
    # In the scales' dtype, as the torch reference and external runtimes do.
    w = (q.to(s_ptr.dtype.element_ty) - z) * s
    tl.store(out_ptr + rows64[:, None] * d_in + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _uniform_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, n, d_out, d_in, n_words, n_groups, group_size,
                         BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    rmask = rows < d_out
    xr = tl.arange(0, BLOCK_N)
    xmask = xr < n
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < d_in
        mask = rmask[:, None] & cmask[None, :]
        q = _decode_codes(q_ptr, rows64, cols, mask, n_words, BITS)
        gptr = rows64[:, None] * n_groups + (cols // group_size)[None, :]
        s = tl.load(s_ptr + gptr, mask=mask, other=0.0)
        z = tl.load(z_ptr + gptr, mask=mask, other=0.0)
        # The weight rounded exactly as the dequant kernel rounds it, then float32 for the products.
        w = ((q.to(s_ptr.dtype.element_ty) - z) * s).to(tl.float32)
        xt = tl.load(x_ptr + xr[:, None] * d_in + cols[None, :], mask=xmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + xr[:, None] * d_out + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=xmask[:, None] & rmask[None, :])


def _lut_dequant_kernel(q_ptr, lut_ptr, out_ptr, d_out, d_in, n_words,
                        BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    mask = (rows < d_out)[:, None] & (cols < d_in)[None, :]
    q = _decode_codes(q_ptr, rows64, cols, mask, n_words, BITS)
    w = tl.load(lut_ptr + rows64[:, None] * (1 << BITS) + q, mask=mask, other=0.0)
    tl.store(out_ptr + rows64[:, None] * d_in + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _lut_gemv_kernel(x_ptr, q_ptr, lut_ptr, y_ptr, n, d_out, d_in, n_words,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    rmask = rows < d_out
    xr = tl.arange(0, BLOCK_N)
    xmask = xr < n
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < d_in
        mask = rmask[:, None] & cmask[None, :]
        q = _decode_codes(q_ptr, rows64, cols, mask, n_words, BITS)
        w = tl.load(lut_ptr + rows64[:, None] * (1 << BITS) + q, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(x_ptr + xr[:, None] * d_in + cols[None, :], mask=xmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + xr[:, None] * d_out + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=xmask[:, None] & rmask[None, :])


def _bcq_dequant_kernel(p_ptr, a_ptr, o_ptr, out_ptr, d_out, d_in, n_words, n_groups, group_size, plane_stride,
                        NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    mask = (rows < d_out)[:, None] & (cols < d_in)[None, :]
    g = rows64[:, None] * n_groups + (cols // group_size)[None, :]
    acc = _bcq_weight(p_ptr, a_ptr, o_ptr, g, rows64, cols, mask, n_words, plane_stride, NB)
    tl.store(out_ptr + rows64[:, None] * d_in + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _bcq_gemv_kernel(x_ptr, p_ptr, a_ptr, o_ptr, y_ptr, n, d_out, d_in, n_words, n_groups, group_size, plane_stride,
                     NB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    rmask = rows < d_out
    xr = tl.arange(0, BLOCK_N)
    xmask = xr < n
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < d_in
        mask = rmask[:, None] & cmask[None, :]
        g = rows64[:, None] * n_groups + (cols // group_size)[None, :]
        w = _bcq_weight(p_ptr, a_ptr, o_ptr, g, rows64, cols, mask, n_words, plane_stride, NB)
        # Rounded to alpha's dtype like the dequantized weight, so GEMV agrees with x @ dequant(...).T.
        w = w.to(a_ptr.dtype.element_ty).to(tl.float32)
        xt = tl.load(x_ptr + xr[:, None] * d_in + cols[None, :], mask=xmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + xr[:, None] * d_out + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=xmask[:, None] & rmask[None, :])


# ---------------------------------------------------------------------------------------------------------------- #
# Launchers

def jit_kernel(fn):
    # The wrapper class chosen by the library's mode, not by today's TRITON_INTERPRET (see the module docstring):
    # an interpreted kernel cannot call compiled library functions, nor the reverse.
    if LIBRARY_INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


if AVAILABLE:
    # The kernels call these by their global names (jitted the same way as the kernels).
    _decode_codes = jit_kernel(_decode_codes_fn)
    _bcq_weight = jit_kernel(_bcq_weight_fn)
    _KERNELS = {
        "uniform_dequant": jit_kernel(_uniform_dequant_kernel), "uniform_gemv": jit_kernel(_uniform_gemv_kernel),
        "lut_dequant": jit_kernel(_lut_dequant_kernel), "lut_gemv": jit_kernel(_lut_gemv_kernel),
        "bcq_dequant": jit_kernel(_bcq_dequant_kernel), "bcq_gemv": jit_kernel(_bcq_gemv_kernel),
    }


def _kernels() -> dict:
    if not AVAILABLE:
        raise ImportError("the Triton kernels need the `triton` package (pip install 'quantlib[kernels]'); "
                          "use backend='torch' without it")
    return _KERNELS


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dequant_blocks(d_out: int, d_in: int, block_r: int | None, block_k: int | None) -> tuple[int, int]:
    # 32 x 128 tiles: 4096 weights per program, enough work per program without register pressure; smaller for small
    # matrices, but never under 16 (tiny block dimensions are not worth an untested corner of the compiler).
    return block_r or max(16, min(32, _pow2(d_out))), block_k or max(16, min(128, _pow2(d_in)))


def gemv_blocks(n: int, d_out: int, d_in: int, block_r, block_k) -> tuple[int, int, int]:
    # BLOCK_N >= 2 for the same reason (a size-1 block dimension); the masked extra row costs nothing in a GEMV bound
    # by the weight's bandwidth. The (BLOCK_N, BLOCK_R, BLOCK_K) product tile is kept at 8192 elements.
    block_n = max(2, _pow2(n))
    block_r = block_r or 16
    block_k = block_k or max(16, min(256, _pow2(d_in), 8192 // (block_n * block_r)))
    return block_n, block_r, block_k


def _group_arg(group_size: int, d_in: int) -> int:
    # group_size -1 (one group per row) becomes d_in: column // d_in is group 0 for every real column.
    return d_in if group_size == -1 else group_size


def dequant_uniform(qweight, scales, zeros, bits: int, group_size: int, d_in: int, *, block_r=None, block_k=None):
    """(d_out, d_in) in scales.dtype; `zeros` must already be in scales.dtype."""
    k = _kernels()
    d_out, n_words = qweight.shape
    out = torch.empty(d_out, d_in, dtype=scales.dtype, device=scales.device)
    if out.numel():
        br, bk = dequant_blocks(d_out, d_in, block_r, block_k)
        grid = (triton.cdiv(d_out, br), triton.cdiv(d_in, bk))
        k["uniform_dequant"][grid](qweight, scales, zeros, out, d_out, d_in, n_words, scales.shape[1],
                                   _group_arg(group_size, d_in), BITS=bits, BLOCK_R=br, BLOCK_K=bk)
    return out


def gemv_uniform(x, qweight, scales, zeros, bits: int, group_size: int, *, block_r=None, block_k=None):
    """x (n <= 8, d_in) -> (n, d_out) in x.dtype, float32 accumulation."""
    k = _kernels()
    n, d_in = x.shape
    d_out, n_words = qweight.shape
    y = torch.empty(n, d_out, dtype=x.dtype, device=x.device)
    if y.numel():
        bn, br, bk = gemv_blocks(n, d_out, d_in, block_r, block_k)
        k["uniform_gemv"][(triton.cdiv(d_out, br),)](
            x, qweight, scales, zeros, y, n, d_out, d_in, n_words, scales.shape[1], _group_arg(group_size, d_in),
            BITS=bits, BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk)
    return y


def dequant_lut(qweight, lut, bits: int, d_in: int, *, block_r=None, block_k=None):
    """(d_out, d_in) in lut.dtype."""
    k = _kernels()
    d_out, n_words = qweight.shape
    out = torch.empty(d_out, d_in, dtype=lut.dtype, device=lut.device)
    if out.numel():
        br, bk = dequant_blocks(d_out, d_in, block_r, block_k)
        grid = (triton.cdiv(d_out, br), triton.cdiv(d_in, bk))
        k["lut_dequant"][grid](qweight, lut, out, d_out, d_in, n_words, BITS=bits, BLOCK_R=br, BLOCK_K=bk)
    return out


def gemv_lut(x, qweight, lut, bits: int, *, block_r=None, block_k=None):
    k = _kernels()
    n, d_in = x.shape
    d_out, n_words = qweight.shape
    y = torch.empty(n, d_out, dtype=x.dtype, device=x.device)
    if y.numel():
        bn, br, bk = gemv_blocks(n, d_out, d_in, block_r, block_k)
        k["lut_gemv"][(triton.cdiv(d_out, br),)](x, qweight, lut, y, n, d_out, d_in, n_words,
                                                 BITS=bits, BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk)
    return y


def dequant_bcq(planes, alpha, offset, group_size: int, d_in: int, *, block_r=None, block_k=None):
    """(d_out, d_in) in alpha.dtype, summed in float32."""
    k = _kernels()
    nb, d_out, n_words = planes.shape
    out = torch.empty(d_out, d_in, dtype=alpha.dtype, device=alpha.device)
    if out.numel():
        br, bk = dequant_blocks(d_out, d_in, block_r, block_k)
        grid = (triton.cdiv(d_out, br), triton.cdiv(d_in, bk))
        k["bcq_dequant"][grid](planes, alpha, offset, out, d_out, d_in, n_words, alpha.shape[1],
                               _group_arg(group_size, d_in), d_out * n_words, NB=nb, BLOCK_R=br, BLOCK_K=bk)
    return out


def gemv_bcq(x, planes, alpha, offset, group_size: int, *, block_r=None, block_k=None):
    k = _kernels()
    n, d_in = x.shape
    nb, d_out, n_words = planes.shape
    y = torch.empty(n, d_out, dtype=x.dtype, device=x.device)
    if y.numel():
        bn, br, bk = gemv_blocks(n, d_out, d_in, block_r, block_k)
        k["bcq_gemv"][(triton.cdiv(d_out, br),)](
            x, planes, alpha, offset, y, n, d_out, d_in, n_words, alpha.shape[1], _group_arg(group_size, d_in),
            d_out * n_words, NB=nb, BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk)
    return y
