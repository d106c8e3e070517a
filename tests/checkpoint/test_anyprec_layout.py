"""The Any-Precision bit-plane layout (quantlib.checkpoint.pack.anyprec_layout): golden words, an independent per-element
implementation of the layout as a second opinion, and round trips."""

from __future__ import annotations

import hashlib

import pytest
import torch

from quantlib.checkpoint.pack.anyprec_layout import pack_planes, unpack_planes


def _u32(x: torch.Tensor) -> list[int]:
    return (x.to(torch.int64) & 0xFFFFFFFF).flatten().tolist()


def _slow_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The layout written out element by element, straight from its description (slow; small shapes only)."""
    d_out, d_in = codes.shape
    c = codes.tolist()
    n_bytes = d_in // 8
    out = torch.zeros(bits, d_out, d_in // 32, dtype=torch.int32)
    for p in range(bits):
        shift = bits - 1 - p  # plane 0 is the MSB
        for r in range(d_out):
            # 8 codes per byte, the first in the byte's top bit
            row_bytes = []
            for i in range(n_bytes):
                byte = 0
                for m in range(8):
                    byte |= ((c[r][8 * i + m] >> shift) & 1) << (7 - m)
                row_bytes.append(byte)
            # 128-byte chunks (a shorter last one): word t = bytes t, t+T, t+2T, t+3T, most significant first
            for start in range(0, n_bytes, 128):
                T = min(128, n_bytes - start) // 4
                for t in range(T):
                    word = 0
                    for k in range(4):
                        word = (word << 8) | row_bytes[start + t + k * T]
                    out[p, r, start // 4 + t] = word - 2 ** 32 if word >= 2 ** 31 else word
    return out


def _codes(bits: int, d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, (d_out, d_in), generator=g, dtype=torch.uint8)


def _formula_codes(bits: int, d_out: int, d_in: int) -> torch.Tensor:
    """Codes from a fixed formula (no RNG), so that words recorded from the reference packer stay valid."""
    r = torch.arange(d_out)[:, None]
    j = torch.arange(d_in)[None, :]
    return ((r * 7 + j * j * 3 + j // 5) % 2 ** bits).to(torch.uint8)


# --- golden words -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_one_word_row_reads_codes_from_the_top_bit(bits):
    codes = _codes(bits, 3, 32, seed=bits)
    packed = pack_planes(codes, bits)
    assert packed.shape == (bits, 3, 1) and packed.dtype == torch.int32
    for p in range(bits):
        for r in range(3):
            expected = sum(((int(codes[r, j]) >> (bits - 1 - p)) & 1) << (31 - j) for j in range(32))
            assert _u32(packed[p, r]) == [expected]


def test_codes_mod_8_give_the_classic_planes():
    codes = (torch.arange(32) % 8).to(torch.int64).unsqueeze(0)
    assert _u32(pack_planes(codes, 3)) == [0x0F0F0F0F, 0x33333333, 0x55555555]


def test_trailing_chunk_interleaves_with_its_own_stride():
    # d_in = 64: 8 bytes, one short chunk with T = 2 words; word 0 = bytes 0, 2, 4, 6 and word 1 = bytes 1, 3, 5, 7
    for col, word, value in [(0, 0, 0x80000000), (8, 1, 0x80000000), (16, 0, 0x00800000), (63, 1, 0x00000001),
                             (47, 1, 0x00000100)]:
        codes = torch.zeros(1, 64, dtype=torch.uint8)
        codes[0, col] = 1
        expected = [0, 0]
        expected[word] = value
        assert _u32(pack_planes(codes, 1)) == expected, col


def test_full_chunk_interleaves_with_stride_32():
    # d_in = 1024: one full chunk; byte 33 is byte 1 of the second group of 32, so slot 1 of word 1
    codes = torch.zeros(1, 1024, dtype=torch.uint8)
    codes[0, 8 * 33] = 1
    words = _u32(pack_planes(codes, 1))
    assert words[1] == 0x00800000 and sum(words) == 0x00800000


# Recorded from GuidedQuant's own packer (pack_single_weight) on _formula_codes: the first and last word of each
# plane and a SHA-256 of the whole tensor as little-endian int32.
_REFERENCE = {
    (3, 5, 4352): ([0x277D8877, 0x50F5BF2B, 0x52A54A94], [0x7782D877, 0xBFF55002, 0x4AA55229],
                   "123c683df493be5478dfb70354483311f5001c0279633059c09869c81cd3afcb"),
    (4, 3, 1056): ([0x363441C9, 0x277D8877, 0x50F5BF2B, 0x52A54A94], [0xCBFEBEB6, 0x75C888A3, 0xFD40AFD4, 0x294A5294],
                   "dfd500fffc0661f9177bbba8630f47036469fbd9e1c886c6d8fc8675e192595c"),
}


@pytest.mark.parametrize("shape", sorted(_REFERENCE))
def test_matches_words_recorded_from_the_reference_packer(shape):
    bits, d_out, d_in = shape
    first, last, digest = _REFERENCE[shape]
    packed = pack_planes(_formula_codes(bits, d_out, d_in), bits)
    assert _u32(packed[:, 0, 0]) == first
    assert _u32(packed[:, -1, -1]) == last
    data = b"".join(x.to_bytes(4, "little", signed=True) for x in packed.flatten().tolist())
    assert hashlib.sha256(data).hexdigest() == digest


# --- against the per-element implementation --------------------------------------------------------------------


@pytest.mark.parametrize("bits,d_out,d_in", [(3, 8, 576), (4, 16, 1024), (2, 4, 1536), (3, 5, 4352)])
def test_matches_per_element_layout(bits, d_out, d_in):
    codes = _codes(bits, d_out, d_in, seed=d_in)
    assert torch.equal(pack_planes(codes, bits), _slow_pack(codes, bits))


# --- round trips and properties ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip(bits):
    for d_in in (32, 1056, 2080):  # a lone short chunk; full chunks plus a short one
        codes = _codes(bits, 7, d_in, seed=bits * d_in)
        packed = pack_planes(codes, bits)
        assert packed.shape == (bits, 7, d_in // 32) and packed.dtype == torch.int32
        back = unpack_planes(packed, bits, d_in)
        assert back.dtype == torch.uint8 and torch.equal(back, codes)


def test_unpack_round_trips_arbitrary_words():
    g = torch.Generator().manual_seed(5)
    qweight = torch.randint(-2 ** 31, 2 ** 31, (3, 4, 45), generator=g, dtype=torch.int64).to(torch.int32)
    assert torch.equal(pack_planes(unpack_planes(qweight, 3, 1440), 3), qweight)


def test_top_planes_are_the_lower_precision_codes():
    # the reason for MSB-first planes: the first b' planes of a b-bit packing are the b'-bit packing of codes >> (b-b')
    codes = _codes(4, 6, 1056, seed=3)
    assert torch.equal(pack_planes(codes, 4)[:2], pack_planes(codes >> 2, 2))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_dtypes_agree(dtype):
    codes = _codes(5, 3, 1088, seed=1)
    assert torch.equal(pack_planes(codes.to(dtype), 5), pack_planes(codes, 5))


# --- bad inputs --------------------------------------------------------------------------------------------------


def test_rejects_d_in_not_multiple_of_32():
    with pytest.raises(ValueError, match=r"multiple of 32.*d_in = 48"):
        pack_planes(torch.zeros(2, 48, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"multiple of 32.*d_in = 40"):
        unpack_planes(torch.zeros(3, 2, 1, dtype=torch.int32), 3, 40)


@pytest.mark.parametrize("bad", [8, -1])
def test_rejects_codes_out_of_range(bad):
    codes = torch.zeros(2, 32, dtype=torch.int64)
    codes[1, 5] = bad
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_planes(codes, 3)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_planes(torch.zeros(2, 32, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_planes(torch.zeros(1, 2, 1, dtype=torch.int32), bits, 32)


def test_rejects_float_or_non_2d_codes():
    with pytest.raises(ValueError, match="integer"):
        pack_planes(torch.zeros(2, 32), 3)
    with pytest.raises(ValueError, match="2-D"):
        pack_planes(torch.zeros(2, 2, 32, dtype=torch.uint8), 3)


@pytest.mark.parametrize("shape", [(2, 4, 2), (3, 4, 3), (3, 4), (3, 4, 2, 1)])
def test_unpack_rejects_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"\(3, d_out, 2\)"):
        unpack_planes(torch.zeros(shape, dtype=torch.int32), 3, 64)


def test_unpack_rejects_wrong_dtype():
    with pytest.raises(ValueError, match=r"int32.*\(3, d_out, 2\)"):
        unpack_planes(torch.zeros(3, 4, 2, dtype=torch.int64), 3, 64)
