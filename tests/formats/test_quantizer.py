"""The uniform grid, min-max init and the packed representation."""

import pytest
import torch

from quantlib.errors import ConfigError
from quantlib.solvers.grid_init import minmax_params
from quantlib.access.adapters import check_group_size
from quantlib.formats.uniform import UniformGrid, UniformQuantized, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("d_in", [32, 64, 100, 576])
def test_pack_unpack_round_trip(bits, d_in):
    g = torch.Generator().manual_seed(bits * 1000 + d_in)
    codes = torch.randint(0, 2 ** bits, (7, d_in), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-d_in * bits // 32))
    assert torch.equal(unpack_codes(packed, bits, d_in), codes)


def test_packing_is_the_gptq_bit_order():
    # 4-bit: first code in the lowest nibble of the first word, like GPTQ's qweight.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_codes(codes, 4).item() & 0xFFFFFFFF == 0x87654321
    # 3-bit: a contiguous stream across words; code 10 straddles words 0 and 1.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111
    words = pack_codes(codes, 3)[0]
    assert (int(words[0]) & 0xFFFFFFFF) >> 30 == 0b11 and int(words[1]) & 1 == 1


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", [-1, 16])
def test_minmax_rtn_error_within_half_a_step(sym, gs):
    W = torch.randn(12, 64) * torch.linspace(0.1, 3, 64)
    scale, zero = minmax_params(W, 4, gs, sym)
    grid = UniformGrid(scale, zero, 4, gs)
    codes = grid.quantize(W)
    assert codes.min() >= 0 and codes.max() <= 15
    if not sym:  # asymmetric: integer zero point inside the grid, every weight inside the range
        assert torch.all((zero >= 0) & (zero <= 15)) and torch.equal(zero, zero.round())
        s, _ = grid.column_params(64)
        assert torch.all((grid.round(W) - W).abs() <= s / 2 + 1e-6)


def test_all_zero_group_and_positive_group():
    W = torch.zeros(2, 8)
    W[1] = torch.arange(1, 9, dtype=torch.float32)  # all positive: 0 still representable
    scale, zero = minmax_params(W, 3, -1, False)
    grid = UniformGrid(scale, zero, 3, -1)
    assert torch.equal(grid.round(W)[0], W[0])
    assert grid.round(torch.zeros(2, 1)).abs().max() == 0


def test_representation_round_trip_and_row_selection():
    W = torch.randn(10, 48)
    scale, zero = minmax_params(W, 3, 16, False)
    rep = UniformQuantized(UniformGrid(scale, zero, 3, 16).quantize(W).to(torch.uint8), UniformGrid(scale, zero, 3, 16))
    back = UniformQuantized.from_tensors(rep.meta(), rep.to_tensors())
    assert torch.equal(back.dequantize(), rep.dequantize())
    assert torch.equal(rep.select_rows(slice(2, 5)).dequantize(), rep.dequantize()[2:5])
    assert rep.bits_per_weight == pytest.approx(3 + 32 * 3 / 48)


def test_group_size_must_divide():
    check_group_size(576, 64, "x")
    with pytest.raises(ConfigError, match="does not divide the input dimension 576 of layer 'layers.0.q'"):
        check_group_size(576, 128, "layers.0.q")
