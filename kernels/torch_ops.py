"""Plain-torch dequantization and GEMV for the packed formats: the reference the Triton kernels are tested against and
the fallback on any device Triton does not serve.

No argument checking here: `dispatch.py` validates and normalizes (contiguous tensors, zeros in the scales' dtype)
before calling. The bit-stream decoding is written independently of `quantlib.formats.uniform.unpack_codes` (the same
word-pair arithmetic as the Triton kernels) so that the tests' comparison with `unpack_codes` checks something.
"""

from __future__ import annotations

import torch

# Rows decoded at once: bounds the int64 temporaries (three of d_in entries per row) on large layers.
_ELEMENTS_PER_CHUNK = 1 << 22


def _row_chunks(d_out: int, d_in: int):
    step = max(1, _ELEMENTS_PER_CHUNK // max(d_in, 1))
    for r0 in range(0, d_out, step):
        yield slice(r0, min(r0 + step, d_out))


def _group_of_columns(d_in: int, group_size: int, device) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(d_in, dtype=torch.long, device=device)
    return torch.arange(d_in, device=device) // group_size


def unpack_stream(qweight: torch.Tensor, bits: int, d_in: int) -> torch.Tensor:
    """Codes (d_out, d_in) int64 of a (d_out, ceil(d_in * bits / 32)) int32 LSB-first bit stream per row.

    Code j starts at bit j*bits: read its word and the next as one 64-bit value, shift, mask. The words are widened to
    int64 and masked to their low 32 bits first, so a negative int32 (bit 31 set) does not sign-extend into the next
    word's half."""
    device = qweight.device
    pos = torch.arange(d_in, device=device, dtype=torch.int64) * bits
    word, shift = pos >> 5, pos & 31
    out = torch.empty(qweight.shape[0], d_in, dtype=torch.int64, device=device)
    for rows in _row_chunks(qweight.shape[0], d_in):
        words = qweight[rows].to(torch.int64) & 0xFFFFFFFF
        # One zero word past the end: the last code of a row never crosses it, but reading word+1 stays in bounds.
        words = torch.nn.functional.pad(words, (0, 1))
        stream = words[:, word] | (words[:, word + 1] << 32)
        out[rows] = (stream >> shift) & ((1 << bits) - 1)
    return out


def dequant_uniform(qweight, scales, zeros, bits: int, group_size: int, d_in: int) -> torch.Tensor:
    """w[r, j] = (q[r, j] - zeros[r, g(j)]) * scales[r, g(j)], evaluated in the scales' dtype (cast q, subtract,
    multiply: what external runtimes do, so float16 scales give their float16 rounding)."""
    gidx = _group_of_columns(d_in, group_size, scales.device)
    out = torch.empty(qweight.shape[0], d_in, dtype=scales.dtype, device=scales.device)
    for rows in _row_chunks(qweight.shape[0], d_in):
        q = unpack_stream(qweight[rows], bits, d_in).to(scales.dtype)
        out[rows] = (q - zeros[rows][:, gidx].to(scales.dtype)) * scales[rows][:, gidx]
    return out


def dequant_lut(qweight, lut, bits: int, d_in: int) -> torch.Tensor:
    """w[r, j] = lut[r, q[r, j]], in the table's dtype (a lookup: exact)."""
    out = torch.empty(qweight.shape[0], d_in, dtype=lut.dtype, device=lut.device)
    for rows in _row_chunks(qweight.shape[0], d_in):
        out[rows] = lut[rows].gather(1, unpack_stream(qweight[rows], bits, d_in))
    return out


def dequant_bcq(planes, alpha, offset, group_size: int, d_in: int) -> torch.Tensor:
    """w[r, j] = sum_i alpha[r, g(j), i] * (2 bit_i[r, j] - 1) + offset[r, g(j)], summed in float32 over the planes in
    order then the offset (the Triton kernel's order), rounded to alpha's dtype."""
    nb, d_out = planes.shape[0], planes.shape[1]
    gidx = _group_of_columns(d_in, group_size, alpha.device)
    out = torch.empty(d_out, d_in, dtype=alpha.dtype, device=alpha.device)
    for rows in _row_chunks(d_out, d_in):
        a = alpha[rows].float()[:, gidx, :]  # (rows, d_in, nb)
        acc = torch.zeros(a.shape[0], d_in, dtype=torch.float32, device=alpha.device)
        for i in range(nb):
            sign = unpack_stream(planes[i, rows], 1, d_in).float() * 2 - 1
            acc += a[:, :, i] * sign
        out[rows] = (acc + offset[rows].float()[:, gidx]).to(alpha.dtype)
    return out


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # The GEMV contract: the dequantized weight (already rounded to its dtype) times x, accumulated in float32.
    return (x.float() @ w.float().T).to(x.dtype)


def gemv_uniform(x, qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    return _gemv(x, dequant_uniform(qweight, scales, zeros, bits, group_size, x.shape[-1]))


def gemv_lut(x, qweight, lut, bits: int) -> torch.Tensor:
    return _gemv(x, dequant_lut(qweight, lut, bits, x.shape[-1]))


def gemv_bcq(x, planes, alpha, offset, group_size: int) -> torch.Tensor:
    return _gemv(x, dequant_bcq(planes, alpha, offset, group_size, x.shape[-1]))
