"""Properties that would catch a wrong solver: LDLQ beats RTN on the layer objective, equals a plain
column-by-column GPTQ, and survives a Hessian that is not positive definite."""

import logging

import pytest
import torch

from quantlib.errors import NumericalError
from quantlib.stats.hessian import HessianAccumulator, damp_until_pd, gram, layer_error
from quantlib.solvers.contract import solve_layer
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

CAL = CalibSpec("c4", 8, 16)


def correlated_problem(d_out=48, d_in=128, n=1024, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=dtype) / d_in ** 0.5
    X = torch.randn(n, d_in, generator=g, dtype=dtype) @ (torch.eye(d_in, dtype=dtype) + 2 * mix)
    X *= torch.linspace(0.2, 3, d_in, dtype=dtype)  # uneven channel scales, as in real activations
    acc = HessianAccumulator(d_in)
    acc.add(X)
    H = (acc.sum / acc.tokens).to(dtype)
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    return W, H


def gptq_reference(W, H, grid, act_order, damp=0.01):
    """The GPTQ algorithm written the plain way: quantize a column, spread its error with the inverse Hessian,
    remove the column from the inverse (Schur complement). Static groups: each column keeps its group's grid."""
    d_in = W.shape[1]
    Hd = H + damp * torch.diagonal(H).mean() * torch.eye(d_in, dtype=H.dtype)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(d_in)
    Wp, Hinv = W[:, perm].clone(), torch.linalg.inv(Hd[perm][:, perm])
    s, z = grid.column_params(d_in, perm)
    Q = torch.empty_like(Wp)
    for i in range(d_in):
        q = grid.dequantize(grid.quantize(Wp[:, i:i + 1], s[:, i:i + 1], z[:, i:i + 1]), s[:, i:i + 1], z[:, i:i + 1])
        Q[:, i] = q[:, 0]
        Wp[:, i + 1:] -= ((Wp[:, i] - Q[:, i]) / Hinv[i, i])[:, None] * Hinv[i, i + 1:][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


@pytest.mark.parametrize("bits,gs", [(2, -1), (3, 32), (4, -1), (4, 16)])
@pytest.mark.parametrize("act_order", [True, False])
def test_ldlq_equals_gptq(bits, gs, act_order):
    W, H = correlated_problem(seed=bits + gs)
    spec = QuantSpec.build("m", "ldlq", bits, gs, calib=CAL, options={"act_order": act_order})
    result = solve_layer(W, H, spec, "layer")
    ref = gptq_reference(W, H, result.rep.grid, act_order)
    # float64: exact up to rare ties in rounding
    mismatch = (result.weight - ref).abs() > 1e-9
    assert mismatch.float().mean() < 1e-3
    assert layer_error(W, result.weight, H) == pytest.approx(layer_error(W, ref, H), rel=1e-6)


@pytest.mark.parametrize("bits,gs", [(2, -1), (3, -1), (3, 32), (4, 64)])
def test_ldlq_objective_below_rtn_on_correlated_inputs(bits, gs):
    W, H = correlated_problem(seed=bits)
    e_ldlq = layer_error(W, solve_layer(W, H, QuantSpec.build("m", "ldlq", bits, gs, calib=CAL), "l").weight, H)
    e_rtn = layer_error(W, solve_layer(W, None, QuantSpec.build("m", "rtn", bits, gs), "l").weight, H)
    assert e_ldlq < 0.8 * e_rtn


def test_act_order_keeps_static_groups():
    """With H reorder the codes of each column still use the grid of the column's original group."""
    W, H = correlated_problem(d_in=64)
    res = solve_layer(W, H, QuantSpec.build("m", "ldlq", 3, 16, calib=CAL), "l")
    assert torch.allclose(res.rep.dequantize(), res.weight)
    assert res.rep.grid.scale.shape == (W.shape[0], 4)


def test_non_pd_hessian_is_recovered_with_a_warning(caplog):
    W, H = correlated_problem(d_in=64, n=32)  # rank 32 < 64: singular
    H = H - 0.02 * torch.diagonal(H).mean() * torch.eye(64, dtype=H.dtype)  # and indefinite
    spec = QuantSpec.build("m", "ldlq", 4, -1, calib=CAL)
    with caplog.at_level(logging.WARNING, logger="quantlib"):
        res = solve_layer(W, H, spec, "model.layers.0.mlp.down_proj")
    assert torch.isfinite(res.weight).all()
    assert res.stats["damp"] > 0.01
    assert "model.layers.0.mlp.down_proj" in caplog.text and "not positive definite" in caplog.text


def test_hopeless_hessian_raises_a_clear_error():
    H = -torch.eye(8)
    with pytest.raises(NumericalError, match="non-positive mean diagonal"):
        damp_until_pd(H, 0.01, "l")
    H = torch.full((8, 8), float("nan"))
    with pytest.raises(NumericalError, match="NaN"):
        damp_until_pd(H, 0.01, "l")


def test_dead_inputs_are_rounded_not_nan():
    W, H = correlated_problem(d_in=64)
    H[5, :] = 0
    H[:, 5] = 0
    res = solve_layer(W, H, QuantSpec.build("m", "ldlq", 4, -1, calib=CAL), "l")
    assert res.stats["dead_columns"] == 1 and torch.isfinite(res.weight).all()


@pytest.mark.parametrize("d", [5, 512, 513, 1100, 1536])
def test_blocked_gram_equals_full_product(d):
    x = torch.randn(300, d, generator=torch.Generator().manual_seed(d))
    G = gram(x, block=512)
    torch.testing.assert_close(G, x.T @ x, rtol=1e-5, atol=1e-3)
    if d > 512:  # mirrored blocks: exactly symmetric
        assert torch.equal(G, G.T)
