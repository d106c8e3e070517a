"""The bit-plane layout of Any-Precision LLM lookup-table checkpoints (Park et al., "Any-Precision LLM: Low-Cost
Deployment of Multiple, Different-Sized LLMs"), which the released checkpoints of GuidedQuant (Kim et al.,
"GuidedQuant: Large Language Model Quantization via Exploiting End Loss Guidance") also use.

A (d_out, d_in) matrix of b-bit codes is stored as `qweight`, an int32 tensor (b, d_out, d_in / 32): one bit plane per
bit of the code, the most significant bit first, so that plane p carries bit b-1-p of every code. Keeping the top
planes alone gives the codes of a lower precision, which is what lets one checkpoint serve several bit widths.

Within a plane, each row is first written as a string of bytes, eight consecutive codes per byte with the earliest
code in the byte's top bit. The bytes are then regrouped into 32-bit words for the GPU kernel, where each of a warp's
32 threads loads one word: the row is cut into chunks of 128 bytes (1024 codes), and word t of a chunk (t = 0..31)
is made of the chunk's bytes t, t+32, t+64 and t+96, from its most to its least significant byte. A last, shorter
chunk of R bytes (R is a multiple of 4 because d_in is a multiple of 32) is regrouped the same way with T = R / 4
words in place of 32: word t holds bytes t, t+T, t+2T and t+3T. Words are the int32 values themselves, so the layout
does not depend on the host's byte order.

Example: one row of 32 codes c_0..c_31 packs, in each plane, to the single word sum_j bit(c_j) * 2^(31 - j); the
3-bit codes 0, 1, ..., 7 repeated four times give the planes 0x0F0F0F0F, 0x33333333 and 0x55555555.
"""

from __future__ import annotations

import functools
import numbers

import torch

_CHUNK_BYTES = 128  # one byte group per warp: 32 threads x 4 bytes


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")
    return int(bits)


def _check_d_in(d_in: int) -> None:
    if d_in % 32 != 0:
        raise ValueError(f"Any-Precision needs the input dimension to be a multiple of 32, got d_in = {d_in}")


@functools.lru_cache(maxsize=16)
def _word_order(d_in: int) -> torch.Tensor:
    """(d_in,) int64: entry 32 * w + j is the column whose code lands in bit 31 - j of word w (j = 0 is the top bit).

    Computed once per width: packing is then a single column gather followed by summing bits within each word.
    """
    n_bytes = d_in // 8
    n_words = d_in // 32
    full = n_bytes // _CHUNK_BYTES
    tail_stride = (n_bytes - full * _CHUNK_BYTES) // 4
    w = torch.arange(n_words)
    in_full = w < full * 32
    t = torch.where(in_full, w % 32, w - full * 32)
    base = torch.where(in_full, (w // 32) * _CHUNK_BYTES, torch.full_like(w, full * _CHUNK_BYTES))
    stride = torch.where(in_full, torch.full_like(w, 32), torch.full_like(w, tail_stride))
    # slot k = 0..3 of a word, most significant first, takes byte base + t + k * stride
    src_byte = base[:, None] + t[:, None] + stride[:, None] * torch.arange(4)
    # within a byte the first of its 8 codes is the top bit, so bit order follows column order
    cols = 8 * src_byte[:, :, None] + torch.arange(8)
    return cols.reshape(d_in)


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(d_out, d_in) integer codes in [0, 2^bits) -> (bits, d_out, d_in // 32) int32 bit planes, MSB plane first."""
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D (d_out, d_in) tensor, got {getattr(codes, 'shape', type(codes))}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    d_out, d_in = codes.shape
    _check_d_in(d_in)
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 2 ** bits:
            raise ValueError(f"codes must lie in [0, {2 ** bits}) for bits = {bits}, got values in [{lo}, {hi}]")
    n_words = d_in // 32
    order = _word_order(d_in).to(codes.device)
    # uint8 holds every valid code and keeps the gathered copy small
    permuted = codes.to(torch.uint8)[:, order].view(d_out, n_words, 32)
    weights = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(31, -1, -1, device=codes.device)
    out = torch.empty(bits, d_out, n_words, dtype=torch.int32, device=codes.device)
    for p in range(bits):
        plane = ((permuted >> (bits - 1 - p)) & 1).to(torch.int64)
        words = (plane * weights).sum(-1)
        # words are unsigned 32-bit values; store their two's-complement int32 reading
        out[p] = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return out


def unpack_planes(qweight: torch.Tensor, bits: int, d_in: int) -> torch.Tensor:
    """The inverse of `pack_planes`: (bits, d_out, d_in // 32) int32 bit planes -> (d_out, d_in) uint8 codes."""
    bits = _check_bits(bits)
    _check_d_in(d_in)
    if not isinstance(qweight, torch.Tensor):
        raise ValueError(f"qweight must be a torch.Tensor, got {type(qweight).__name__}")
    d_out = qweight.shape[1] if qweight.dim() == 3 else None
    expected = f"(bits, d_out, d_in // 32) = ({bits}, d_out, {d_in // 32})"
    if qweight.dim() != 3 or qweight.shape[0] != bits or qweight.shape[2] != d_in // 32:
        raise ValueError(f"qweight must have shape {expected}, got {tuple(qweight.shape)}")
    if qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 with shape {expected}, got {qweight.dtype}")
    n_words = d_in // 32
    # arithmetic right shift of int32 still yields the right bit at every position 0..31
    shifts = torch.arange(31, -1, -1, dtype=torch.int32, device=qweight.device)
    permuted = torch.zeros(d_out, n_words, 32, dtype=torch.uint8, device=qweight.device)
    for p in range(bits):
        plane = ((qweight[p].unsqueeze(-1) >> shifts) & 1).to(torch.uint8)
        permuted |= plane << (bits - 1 - p)
    codes = torch.empty(d_out, d_in, dtype=torch.uint8, device=qweight.device)
    codes[:, _word_order(d_in).to(qweight.device)] = permuted.view(d_out, d_in)
    return codes
