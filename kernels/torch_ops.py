"""Plain-torch dequantization and GEMV for the packed formats: the reference the Triton kernels are tested against and
the fallback on any device Triton does not serve.

No argument checking here: `dispatch.py` validates and normalizes (contiguous tensors, zeros in the scales' dtype)
before calling. The bit-stream decoding is written independently of `quantlib.formats.uniform.unpack_codes` (the same
word-pair arithmetic as the Triton kernels) so that the tests' comparison with `unpack_codes` checks something.
"""

from __future__ import annotations

import functools

import torch

from quantlib.transforms.incoherence import Incoherence

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


# ---------------------------------------------------------------------------------------------------------------- #
# trellis (QTIP). The codes are written out here again (not imported from quantlib.formats.trellis) so that the
# tests' comparison of this reference with TrellisQuantized.dequantize checks the arithmetic, as the Triton kernel
# writes it, against the format's.

TRELLIS_CODES = ("1mad", "3inst", "hyb")


def trellis_states(qweight: torch.Tensor, L: int, kv: int, n_steps: int) -> torch.Tensor:
    """(n_sequences, n_steps) int64 states of the packed symbol streams (n_sequences, ceil(n_steps kv / 32)) int32:
    state i is the concatenation, symbol i most significant, of the m = ceil(L / kv) symbols i, i + 1, ... (modulo
    n_steps: tail-biting) cut to its top L bits."""
    sym = unpack_stream(qweight, kv, n_steps)
    m = -(-L // kv)
    idx = torch.arange(n_steps, device=qweight.device)
    acc = torch.zeros_like(sym)
    for j in range(m):
        acc = (acc << kv) | sym[:, (idx + j) % n_steps]
    return acc >> (m * kv - L)


def _mod32(x: torch.Tensor) -> torch.Tensor:
    # x >= 0: x mod 2^32 without a 32-bit literal (the Triton kernel writes it the same way)
    return x - ((x >> 32) << 32)


def trellis_code_1mad(s: torch.Tensor) -> torch.Tensor:
    x = _mod32(s * 34038481 + 76625530)
    total = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)
    return (total - 510).to(torch.float32) / 147.800537109375


def _half_bits_to_float(bits16: torch.Tensor) -> torch.Tensor:
    """16-bit patterns (int64 in 0..65535) read as float16, widened to float32."""
    return (bits16 - ((bits16 >> 15) << 16)).to(torch.int16).view(torch.float16).to(torch.float32)


def trellis_code_3inst(s: torch.Tensor) -> torch.Tensor:
    x = _mod32(s * 89226354 + 64248484)
    # (x & 0x8FFF8FFF) ^ 0x3B603B60 one 16-bit half at a time
    hi = ((x >> 16) & 0x8FFF) ^ 0x3B60
    lo = (x & 0x8FFF) ^ 0x3B60
    return _half_bits_to_float(hi) + _half_bits_to_float(lo)


def trellis_code_hyb(s: torch.Tensor, L: int, tlut: torch.Tensor) -> torch.Tensor:
    """(..., 2) float32: entry (s (s + 1) >> (L - Q - 1)) mod 2^Q of the (2^Q, 2) table, the first coordinate
    negated when bit L - 1 of s (s + 1) is set."""
    Q = tlut.shape[0].bit_length() - 1
    h = s * (s + 1)
    vals = tlut.float()[(h >> (L - Q - 1)) & ((1 << Q) - 1)]
    neg = ((h >> (L - 1)) & 1).bool()
    return torch.stack([torch.where(neg, -vals[..., 0], vals[..., 0]), vals[..., 1]], -1)


def trellis_values(states: torch.Tensor, L: int, code: str, tlut: torch.Tensor | None) -> torch.Tensor:
    """(n_sequences, n_steps V) float32: each state's V values, in sequence order."""
    if code == "1mad":
        return trellis_code_1mad(states)
    if code == "3inst":
        return trellis_code_3inst(states)
    return trellis_code_hyb(states, L, tlut).reshape(states.shape[0], -1)


def dequant_trellis_transformed(qweight, scales, segments: list[int], bits: int, L: int, V: int, code: str,
                                tile: tuple[int, int], d_in: int, tlut=None) -> torch.Tensor:
    """W_t (d_out, d_in) float32, the layer in the transformed (incoherence-processed) domain: each segment's
    scale (float32) times the decoded tiles, laid out row tile by row tile, each tile's sequence read row by row.
    Rows of `segments` are whole row tiles; `scales` is float32."""
    tx, ty = tile
    n_steps = tx * ty // V
    d_out = sum(segments)
    values = trellis_values(trellis_states(qweight, L, bits * V, n_steps), L, code, tlut)
    Wt = values.reshape(d_out // tx, d_in // ty, tx, ty).permute(0, 2, 1, 3).reshape(d_out, d_in)
    row_scale = torch.repeat_interleave(scales, torch.tensor(segments, device=scales.device))
    return Wt * row_scale[:, None]


def trellis_transforms(seeds: list[list[int]], segments: list[int], d_in: int) -> list:
    """One `quantlib.transforms.incoherence.Incoherence` per segment (cached: rebuilding the signs costs a generator
    run)."""
    return [_incoherence(rows, d_in, int(so), int(si)) for rows, (so, si) in zip(segments, seeds)]


@functools.lru_cache(maxsize=256)
def _incoherence(rows: int, cols: int, seed_out: int, seed_in: int) -> Incoherence:
    return Incoherence(rows, cols, seed_out, seed_in)


def trellis_unweight(Wt: torch.Tensor, transforms: list, segments: list[int]) -> torch.Tensor:
    """W = A^T W_t B per segment, in float64 then float32: TrellisQuantized.dequantize's arithmetic."""
    out, r0 = [], 0
    for inc, rows in zip(transforms, segments):
        out.append(inc.unweight(Wt[r0:r0 + rows].double()).float())
        r0 += rows
    return torch.cat(out) if len(out) > 1 else out[0]


def dequant_trellis(qweight, scales, transforms: list, segments: list[int], bits: int, L: int, V: int, code: str,
                    tile: tuple[int, int], d_in: int, tlut=None) -> torch.Tensor:
    """The (d_out, d_in) float32 weight: W_t, then the incoherence transform undone per segment."""
    Wt = dequant_trellis_transformed(qweight, scales, segments, bits, L, V, code, tile, d_in, tlut)
    return trellis_unweight(Wt, transforms, segments)


def gemv_trellis(x, qweight, scales, transforms: list, segments: list[int], bits: int, L: int, V: int, code: str,
                 tile: tuple[int, int], tlut=None) -> torch.Tensor:
    """The GEMV contract: x.float() @ dequant(...).T in float32, returned in x.dtype."""
    return _gemv(x, dequant_trellis(qweight, scales, transforms, segments, bits, L, V, code, tile, x.shape[-1], tlut))
