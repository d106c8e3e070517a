"""SpQR: properties that a wrong implementation would break (below RTN, outliers grow as the threshold falls, the
feedback loop equals plain GPTQ with SpQR's dynamic groups, exact leave-one-out, statistics on a 3-bit grid, the
bit count), and the stored format."""

import math

import pytest
import torch

from conftest import build_tokenizer, quantize_save_reload, tiny_model
from test_solvers import correlated_problem
from quantlib.errors import ConfigError
from quantlib.stats.hessian import add_damping, fix_dead_columns, layer_error
from quantlib.solvers.grid_init import minmax_params
from quantlib.formats.spqr import SpqrQuantized
from quantlib.formats.uniform import UniformGrid, group_index
from quantlib.stats.hessian import PreparedHessian
from quantlib.solvers.loops import ErrorFeedback
from quantlib.solvers import spqr
from quantlib.solvers.contract import solve_layer
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

CAL = CalibSpec("c4", 8, 16)


def spec(solver="spqr", bits=3, gs=16, **options):
    return QuantSpec.build("m", solver, bits, gs, calib=CAL, options=options)


def damped(H, s):
    return add_damping(fix_dead_columns(H)[0], s.opt("damp"))


def test_below_rtn_and_outliers_grow_as_the_threshold_falls():
    W, H = correlated_problem(d_out=48, d_in=128, seed=2)
    Hd = damped(H, spec())
    e_rtn = layer_error(W, solve_layer(W, None, spec("rtn"), "l").weight, Hd)
    plain = solve_layer(W, H, spec(keep_outliers=False), "l")
    assert layer_error(W, plain.weight, Hd) < 0.8 * e_rtn
    counts, errors = [], []
    for threshold in (0.5, 0.2, 0.1, 0.05):
        result = solve_layer(W, H, spec(outlier_threshold=threshold), "l")
        assert isinstance(result.rep, SpqrQuantized) and result.rep.outliers is not None
        assert torch.equal(result.weight, result.rep.dequantize())
        counts.append(result.rep.outliers.count)
        errors.append(layer_error(W, result.weight, Hd))
    assert counts == sorted(counts) and counts[0] < counts[-1] and counts[0] > 0, counts
    assert errors == sorted(errors, reverse=True), errors
    assert errors[1] < 0.9 * layer_error(W, plain.weight, Hd)  # the default 0.2 keeps outliers that matter
    assert solve_layer(W, H, spec(), "l").rep.outliers.count == counts[1]  # 0.2 is the default


def gptq_dynamic_groups(W, H, bits, gs, act_order, damp=0.01):
    """GPTQ written the plain way (inverse Hessian, Schur complement) with SpQR's dynamic statistics: when the first
    column of a group comes up, each row's statistics are fitted (tight range) to the current working values of the
    group's columns. Groups are contiguous in the original column order."""
    d_in = W.shape[1]
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(d_in)
    Hinv = torch.linalg.inv(add_damping(H, damp)[perm][:, perm])
    group = group_index(d_in, gs)[perm]
    Wp, Q, grids = W[:, perm].clone(), torch.empty_like(W), {}
    for i in range(d_in):
        g = int(group[i])
        if g not in grids:
            grids[g] = UniformGrid(*minmax_params(Wp[:, group == g], bits, -1, False, tight=True), bits, -1)
        Q[:, i] = grids[g].round(Wp[:, i:i + 1])[:, 0]
        Wp[:, i + 1:] -= ((Wp[:, i] - Q[:, i]) / Hinv[i, i])[:, None] * Hinv[i, i + 1:][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


@pytest.mark.parametrize("gs,act_order", [(16, False), (32, False), (16, True)])
def test_without_outliers_and_quantized_stats_it_is_gptq_with_dynamic_groups(gs, act_order):
    W, H = correlated_problem(d_out=32, d_in=96, seed=gs)
    result = solve_layer(W, H, spec(gs=gs, keep_outliers=False, stat_bits=16, act_order=act_order), "l")
    assert isinstance(result.rep, SpqrQuantized) and result.rep.outliers is None
    assert result.rep.bits_per_weight == 3 + 32 / gs
    ref = gptq_dynamic_groups(W, H, 3, gs, act_order)
    assert ((result.weight - ref).abs() > 1e-9).float().mean() < 1e-3  # float64: exact up to rare rounding ties
    assert layer_error(W, result.weight, H) == pytest.approx(layer_error(W, ref, H), rel=1e-6)


@pytest.mark.parametrize("act_order", [True, False])
def test_per_channel_without_outliers_is_ldlq_on_spqrs_grid(act_order):
    """One group per row is fitted before any feedback, so SpQR is then exactly LDLQ on the tight min-max grid.
    (LDLQ's own grid differs: GPTQ's range includes 0 and its zero point is an integer; with groups, LDLQ fits every
    group up front on W while SpQR fits each on the error-fed values when the loop reaches it.)"""
    W, H = correlated_problem(d_out=24, d_in=64, seed=5)
    s = spec(gs=-1, keep_outliers=False, stat_bits=16, act_order=act_order)
    result = solve_layer(W, H, s, "l")
    grid = UniformGrid(*minmax_params(W, 3, -1, False, tight=True), 3, -1)
    hess = PreparedHessian(H, s.opt("damp"), act_order, "l")
    U, _ = hess.ldl()
    project = grid.projection(hess.perm)
    ErrorFeedback(W, U, hess.perm).run(project)
    assert torch.equal(result.rep.codes, project.codes())
    assert torch.allclose(result.rep.grid.scale, grid.scale)


def test_leave_one_out_reduction_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 16, generator=g, dtype=torch.float64)
    X[3, 5] = 9.0
    X[7, :] = X[7, 0]  # a constant row
    X[9, 2] = X[9, 11] = X[9].min() - 1  # a tied minimum
    dk = torch.rand(16, generator=g, dtype=torch.float64) + 0.5

    def err(Y, d):
        grid = UniformGrid(*minmax_params(Y, 3, -1, False, tight=True), 3, -1)
        return ((grid.round(Y) - Y) ** 2 * d).sum(1)

    brute = torch.stack([err(X, dk) - err(X[:, [j for j in range(16) if j != i]], dk[[j for j in range(16) if j != i]])
                         for i in range(16)], 1)
    fast = spqr.leave_one_out_reduction(X, dk, 3)
    assert torch.allclose(fast, brute, atol=1e-12)
    assert fast[3].argmax() == 5 and fast[3, 5] > 10 * fast[3].median()


def test_statistics_are_on_a_3_bit_grid_and_counted():
    W, H = correlated_problem(d_out=48, d_in=64, seed=4)
    result = solve_layer(W, H, spec(keep_outliers=False), "l")
    grid = result.rep.grid
    for stat in (grid.scale, grid.zero):
        for rows in stat.split(16):  # beta2 = 16 rows, every group of columns
            assert all(len(torch.unique(col)) <= 8 for col in rows.T)
    # SpQR's count: 3 + (3 + 3) / 16 + 2 (16 + 16) / (16 * 16)
    assert result.rep.bits_per_weight == pytest.approx(3.625)
    fine = solve_layer(W, H, spec(keep_outliers=False, stat_bits=16), "l")
    assert layer_error(W, fine.weight, H) < layer_error(W, result.weight, H)  # quantizing statistics costs something
    with_outliers = solve_layer(W, H, spec(), "l").rep
    d_out, d_in = W.shape
    assert with_outliers.bits_per_weight == pytest.approx(
        3.625 + (32 * with_outliers.outliers.count + 32 * (d_out + 1)) / (d_out * d_in))


def test_bad_settings_are_refused():
    W, H = correlated_problem(d_out=16, d_in=32)
    with pytest.raises(ConfigError, match="'sym' .*does not apply to spqr"):
        spec(sym=True)
    # A name cannot carry inf (it would not read back): refused as any option's non-finite value ...
    with pytest.raises(ConfigError, match="'outlier_threshold' takes a finite number, got inf"):
        spec(outlier_threshold=math.inf)
    with pytest.raises(ConfigError, match="keep_outliers"):  # ... and no threshold at all points at keep_outliers
        spec(outlier_threshold=0.0)
    with pytest.raises(ConfigError, match="no effect without outliers"):
        spec(keep_outliers=False, outlier_threshold=0.1)
    with pytest.raises(ConfigError, match="one of"):
        spec(stat_bits=12)
    with pytest.raises(ConfigError, match="init"):
        QuantSpec.build("m", "spqr", 3, 16, init="neuqi", calib=CAL)


def test_round_trip_gives_identical_logits(tmp_path):
    tok_dir = tmp_path / "src"
    build_tokenizer(tok_dir)
    model = tiny_model("llama")
    s = QuantSpec.build("m", "spqr", 3, 16, calib=CalibSpec("c4", 8, 32))
    _, layers, diag = quantize_save_reload(model, s, tok_dir, tmp_path / "q")
    assert all(m["format"] == "spqr" and m["stat_bits"] == 3 and m["stat_group"] == 16 and m["outliers"]
               for m in layers.values())
    assert all(d["bits_per_weight"] > 3.625 for d in diag["layers"].values())
    assert any(d["outlier_fraction"] > 0 for d in diag["layers"].values())


@pytest.mark.parametrize("options", [{}, {"outlier_threshold": 0.1}, {"keep_outliers": False, "stat_bits": 16},
                                     {"stat_group": 32, "loo": False, "act_order": False}])
def test_short_names_round_trip(options):
    s = spec(**options)
    assert QuantSpec.parse(s.short_name()) == s
    assert s.short_name().endswith("spqr.w3g16") == (not options)
    assert ("ot0p1" in s.short_name()) == ("outlier_threshold" in options)


def test_a_nearly_constant_row_far_from_zero_keeps_the_statistics_finite():
    """A row whose group holds nearly equal values far from 0 (found on SmolLM2's layer 16 o_proj) has a tight range of
    almost no width and a zero point near 10^7; quantized with its block's other zeros it overflowed float16 and gave
    NaN weights. It now takes the range including 0, and the other rows of its block keep their own statistics."""
    W, _ = correlated_problem(d_out=32, d_in=64, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    H = torch.diag(0.5 + torch.rand(64, generator=g))  # no error feedback: the row is fitted as it is
    plain = solve_layer(W, H, spec())
    W[5, :16] = 5.0 + 1e-6 * torch.randn(16, generator=g)
    result = solve_layer(W, H, spec())
    assert torch.isfinite(result.weight).all()
    assert (result.weight[5, :16] - W[5, :16]).abs().max() < 5 / 7  # a step of [0, 5] at 3 bits
    others = [r for r in range(16) if r != 5]  # the same block of 16 rows of statistics
    def rel(w_hat):
        return ((w_hat[others] - W[others]).square().sum() / W[others].square().sum()).item()

    assert rel(result.weight) < 1.5 * rel(plain.weight), (rel(result.weight), rel(plain.weight))
