"""The `mse` init (GPTQ's quantizer with its MSE clipping search, QuaRot's and SpinQuant's weight clipping)."""

import pytest
import torch

from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec
from quantlib.errors import ConfigError
from quantlib.solvers.grid_init import grouped, init_grid, minmax_params, mse_params

CAL = CalibSpec("c4", 8, 16)


def heavy_tailed(d_out, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) * 0.02
    W[:, ::9] *= 6  # outlier columns: clipping them pays off in most rows
    return W


def reference_search(W, bits, sym, norm=2.4, grid=100, maxshrink=0.8):
    """GPTQ's `find_params(mse=True)` written out per row (per channel), from the raw range: the best error found."""
    best = torch.full((W.shape[0],), float("inf"), dtype=torch.float64)
    x = W.double()
    xmin = torch.minimum(x.min(1).values, torch.zeros(()))
    xmax = torch.maximum(x.max(1).values, torch.zeros(()))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    maxq = 2 ** bits - 1
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        scale = (p * xmax - p * xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-p * xmin / scale)
        q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, maxq)
        err = ((scale[:, None] * (q - zero[:, None]) - x).abs() ** norm).sum(1)
        best = torch.minimum(best, err)
    return best


def error(W, scale, zero, bits, group_size, norm=2.4):
    g = grouped(W.double(), group_size)
    s, z = scale.double()[..., None], zero.double()[..., None]
    q = torch.clamp(torch.round(g / s) + z, 0, 2 ** bits - 1)
    return ((s * (q - z) - g).abs() ** norm).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_matches_gptq_search_per_channel(bits, sym):
    W = heavy_tailed(24, 96, bits)
    scale, zero = mse_params(W, bits, -1, sym)
    ours = error(W, scale, zero, bits, -1).squeeze(-1)
    ref = reference_search(W, bits, sym)
    assert torch.allclose(ours, ref, rtol=1e-4)


@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("sym", [False, True])
def test_never_worse_than_minmax_and_clips_outliers(group_size, sym):
    W = heavy_tailed(32, 64, 7)
    s0, z0 = minmax_params(W, 3, group_size, sym)
    s, z = mse_params(W, 3, group_size, sym)
    e0, e = error(W, s0, z0, 3, group_size), error(W, s, z, 3, group_size)
    assert (e <= e0 * (1 + 1e-6)).all()
    assert (s <= s0).all() and (s >= 0.2 * s0).all()  # only shrinks, at most to 0.21 of the range
    assert (s < s0).float().mean() > 0.5  # outliers make a shrink pay in most groups
    assert e.sum() < 0.97 * e0.sum()
    assert torch.equal(z, z0)


def test_an_all_zero_group_keeps_a_valid_grid():
    W = heavy_tailed(4, 32, 1)
    W[1] = 0
    s, z = mse_params(W, 4, -1, False)
    assert (s > 0).all() and torch.isfinite(z).all()
    q = torch.clamp(torch.round(W[1:2] / s[1]) + z[1], 0, 15)
    assert torch.equal((q - z[1]) * s[1], torch.zeros(1, 32))


def test_spec_options_and_refusals():
    spec = QuantSpec.build("m", "ldlq", 4, -1, "mse", calib=CAL, options={"sym": True})
    W = heavy_tailed(8, 32, 3)
    grid = init_grid(W, spec, None)
    s, z = mse_params(W, 4, -1, True)
    assert torch.equal(grid.scale, s) and torch.equal(grid.zero, z)
    # A coarser search over the same range can only do as well or worse.
    coarse = QuantSpec.build("m", "ldlq", 4, -1, "mse", calib=CAL, options={"sym": True, "mse_grid": 5})
    assert "mgrid5" in coarse.short_name()
    g2 = init_grid(W, coarse, None)
    assert error(W, grid.scale, grid.zero, 4, -1).sum() <= error(W, g2.scale, g2.zero, 4, -1).sum()
    for bad in ({"mse_maxshrink": 1.0}, {"mse_grid": 0}, {"mse_norm": 0.0}):
        with pytest.raises(ConfigError, match="mse"):
            QuantSpec.build("m", "ldlq", 4, -1, "mse", calib=CAL, options=bad)
