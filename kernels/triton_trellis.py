"""Triton kernels for the `trellis` format (QTIP): dequantize and GEMV (n <= 8 activation rows) in the transformed
(incoherence-processed) domain, one launch per segment (a segment's rows share a scale and the input-side
transform). The transforms themselves are applied in torch around the kernels (`dispatch.py`, kernels/README.md).

Same conventions as `triton_ops` (whose `jit_kernel`, block choices and interpreter handling this module shares): the
callers validate and pass contiguous tensors, nothing is checked here; the module imports without triton, its
functions then raise ImportError.
"""

# String annotations (`tl.constexpr` is not evaluated when triton is absent); triton parses them as constexpr.
from __future__ import annotations

import torch

from .triton_ops import AVAILABLE, dequant_blocks, gemv_blocks, jit_kernel, tl, triton


def _trellis_weight_fn(q_ptr, s_ptr, lut_ptr, seg, rows, cols, mask, d_in, n_words,
                       TX: tl.constexpr, TY: tl.constexpr, L: tl.constexpr, KV: tl.constexpr, V: tl.constexpr,
                       N: tl.constexpr, M: tl.constexpr, CODE: tl.constexpr, Q: tl.constexpr):
    """W_t[rows, cols] in float32 for one segment of a trellis layer (rows counted from the segment's first row,
    q_ptr at its first sequence): scale * code(state), the state of weight (r, c) being step p // V of sequence
    (r // TX) (d_in / TY) + c // TY, p = (r % TX) TY + c % TY. State i is symbols i .. i + M - 1 (circularly, mod N
    steps), symbol i most significant, cut to its top L bits: the M KV-bit fields are read from one 64-bit chunk
    at the step's first bit (never more than 62 bits needed: shift <= 31, M KV <= 31) or, for the fields past the
    sequence's end, from the chunk at its first bit."""
    seq = (rows // TX).to(tl.int64)[:, None] * (d_in // TY) + (cols // TY)[None, :]
    p = (rows % TX)[:, None] * TY + (cols % TY)[None, :]
    step = p // V
    base = q_ptr + seq * n_words
    bit = step * KV
    word, shift = bit >> 5, bit & 31
    lo = tl.load(base + word, mask=mask, other=0)
    hi = tl.load(base + word + 1, mask=mask & (word + 1 < n_words), other=0)
    a = (lo.to(tl.uint32, bitcast=True).to(tl.int64) | (hi.to(tl.uint32, bitcast=True).to(tl.int64) << 32)) >> \
        shift.to(tl.int64)
    lo0 = tl.load(base, mask=mask, other=0)
    hi0 = tl.load(base + 1, mask=mask & (step * 0 + 1 < n_words), other=0)  # a tensor: n_words may be a constexpr 1
    b = lo0.to(tl.uint32, bitcast=True).to(tl.int64) | (hi0.to(tl.uint32, bitcast=True).to(tl.int64) << 32)
    state = tl.zeros(mask.shape, dtype=tl.int64)
    for j in tl.static_range(M):
        wrapped = step + j >= N
        fa = (a >> (j * KV)) & ((1 << KV) - 1)
        fb = (b >> (tl.where(wrapped, step + j - N, 0) * KV).to(tl.int64)) & ((1 << KV) - 1)
        state = (state << KV) | tl.where(wrapped, fb, fa)
    state = state >> (M * KV - L)
    if CODE == 0:  # 1MAD: the byte sum of (34038481 s + 76625530) mod 2^32, minus 510, / 147.800537109375
        x = state * 34038481 + 76625530
        x = x - ((x >> 32) << 32)
        total = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)
        # IEEE division (compiled `/` on float32 may be an approximate division): the reference's rounding
        val = tl.math.div_rn((total - 510).to(tl.float32), tl.full(mask.shape, 147.800537109375, tl.float32))
    elif CODE == 1:  # 3INST: (x & 0x8FFF8FFF) ^ 0x3B603B60, x = (89226354 s + 64248484) mod 2^32, halves as float16
        x = state * 89226354 + 64248484
        x = x - ((x >> 32) << 32)
        hi16 = ((x >> 16) & 0x8FFF) ^ 0x3B60
        lo16 = (x & 0x8FFF) ^ 0x3B60
        val = (hi16.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
               + lo16.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
    else:  # HYB (V = 2): table entry (s (s + 1) >> (L - Q - 1)) mod 2^Q, coordinate p % 2, the first one signed
        h = state * (state + 1)
        idx = (h >> (L - Q - 1)) & ((1 << Q) - 1)
        v = p % 2
        val = tl.load(lut_ptr + idx * 2 + v, mask=mask, other=0.0).to(tl.float32)
        val = tl.where((((h >> (L - 1)) & 1) == 1) & (v == 0), -val, val)
    return val * tl.load(s_ptr + seg).to(tl.float32)


def _trellis_dequant_kernel(q_ptr, s_ptr, lut_ptr, out_ptr, seg, d_rows, d_in, n_words,
                            TX: tl.constexpr, TY: tl.constexpr, L: tl.constexpr, KV: tl.constexpr, V: tl.constexpr,
                            N: tl.constexpr, M: tl.constexpr, CODE: tl.constexpr, Q: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < d_rows)[:, None] & (cols < d_in)[None, :]
    w = _trellis_weight(q_ptr, s_ptr, lut_ptr, seg, rows, cols, mask, d_in, n_words, TX, TY, L, KV, V, N, M, CODE, Q)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * d_in + cols[None, :], w, mask=mask)


def _trellis_gemv_kernel(x_ptr, q_ptr, s_ptr, lut_ptr, y_ptr, seg, n, d_rows, d_in, n_words,
                         TX: tl.constexpr, TY: tl.constexpr, L: tl.constexpr, KV: tl.constexpr, V: tl.constexpr,
                         N: tl.constexpr, M: tl.constexpr, CODE: tl.constexpr, Q: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < d_rows
    xr = tl.arange(0, BLOCK_N)
    xmask = xr < n
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < d_in
        mask = rmask[:, None] & cmask[None, :]
        w = _trellis_weight(q_ptr, s_ptr, lut_ptr, seg, rows, cols, mask, d_in, n_words,
                            TX, TY, L, KV, V, N, M, CODE, Q)
        xt = tl.load(x_ptr + xr[:, None] * d_in + cols[None, :], mask=xmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(xt.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + xr[:, None] * d_rows + rows[None, :], acc, mask=xmask[:, None] & rmask[None, :])


if AVAILABLE:
    # The kernels call the device function by its global name (jitted the same way as the kernels).
    _trellis_weight = jit_kernel(_trellis_weight_fn)
    _TRELLIS_KERNELS = {"dequant": jit_kernel(_trellis_dequant_kernel), "gemv": jit_kernel(_trellis_gemv_kernel)}


def _trellis_kernels() -> dict:
    if not AVAILABLE:
        raise ImportError("the Triton kernels need the `triton` package (pip install 'quantlib[kernels]'); "
                          "use backend='torch' without it")
    return _TRELLIS_KERNELS


# ---------------------------------------------------------------------------------------------------------------- #
# Launchers

_TRELLIS_CODE_IDS = {"1mad": 0, "3inst": 1, "hyb": 2}


def _trellis_constants(bits: int, L: int, V: int, code: str, tile, tlut) -> dict:
    tx, ty = tile
    kv = bits * V
    return {"TX": tx, "TY": ty, "L": L, "KV": kv, "V": V, "N": tx * ty // V, "M": -(-L // kv),
            "CODE": _TRELLIS_CODE_IDS[code], "Q": 0 if tlut is None else tlut.shape[0].bit_length() - 1}


def _trellis_segments(segments, tile, d_in):
    """(first row, rows, first sequence, sequences) of each segment."""
    tx, ty = tile
    r0 = s0 = 0
    for rows in segments:
        n_seq = rows // tx * (d_in // ty)
        yield r0, rows, s0, n_seq
        r0, s0 = r0 + rows, s0 + n_seq


def dequant_trellis_transformed(qweight, scales, segments: list[int], bits: int, L: int, V: int, code: str, tile,
                                d_in: int, tlut=None, *, block_r=None, block_k=None):
    """W_t (d_out, d_in) float32, the layer in the transformed domain (`scales` float32): the torch reference's
    `dequant_trellis_transformed`, bit for bit."""
    k = _trellis_kernels()
    n_words = qweight.shape[1]
    out = torch.empty(sum(segments), d_in, dtype=torch.float32, device=scales.device)
    const = _trellis_constants(bits, L, V, code, tile, tlut)
    lut = scales if tlut is None else tlut  # never read by the computed codes
    for i, (r0, rows, s0, n_seq) in enumerate(_trellis_segments(segments, tile, d_in)):
        br, bk = dequant_blocks(rows, d_in, block_r, block_k)
        grid = (triton.cdiv(rows, br), triton.cdiv(d_in, bk))
        k["dequant"][grid](qweight[s0:s0 + n_seq], scales, lut, out[r0:r0 + rows], i, rows, d_in, n_words,
                           **const, BLOCK_R=br, BLOCK_K=bk)
    return out


def gemv_trellis(x, qweight, scales, transforms: list, segments: list[int], bits: int, L: int, V: int, code: str,
                 tile, tlut=None, *, block_r=None, block_k=None):
    """x (n <= 8, d_in) -> (n, d_out) in x.dtype, as QTIP computes it: per segment, x_t = B x (torch, float32), the
    kernel's y_t = W_t x_t (float32 accumulation, W_t decoded on the fly), y = A^T y_t (torch, float32).
    `transforms` are the segments' `quantlib.transforms.incoherence.Incoherence`."""
    k = _trellis_kernels()
    n, d_in = x.shape
    n_words = qweight.shape[1]
    const = _trellis_constants(bits, L, V, code, tile, tlut)
    lut = scales if tlut is None else tlut
    xf = x.float()
    parts = []
    for i, ((r0, rows, s0, n_seq), inc) in enumerate(zip(_trellis_segments(segments, tile, d_in), transforms)):
        xt = inc.inputs(xf).contiguous()
        yt = torch.empty(n, rows, dtype=torch.float32, device=x.device)
        if yt.numel():
            bn, br, bk = gemv_blocks(n, rows, d_in, block_r, block_k)
            k["gemv"][(triton.cdiv(rows, br),)](xt, qweight[s0:s0 + n_seq], scales, lut, yt, i, n, rows, d_in,
                                                n_words, **const, BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk)
        parts.append(inc.outputs(yt))
    return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).to(x.dtype)
