"""QTIP: BlockLDLQ's feedback is exact (the objective splits into the blocks' own errors), BlockLDLQ with the trellis
beats plain trellis rounding of the same transformed weights, the stored layer decodes to the solver's weight and is
cut per stacked layer, GuidedQuant's row blocks stack, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from test_solvers import correlated_problem
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec
from quantlib.errors import ConfigError
from quantlib.formats.trellis import TrellisQuantized, tiles_to_weight, weight_to_tiles
from quantlib.solvers.contract import LayerSolver, solve_layer
from quantlib.solvers.loops import ErrorFeedback
from quantlib.solvers.qtip import Prepared
from quantlib.stats.hessian import PreparedHessian, layer_error

CAL = CalibSpec("c4", 8, 16)


def _spec(bits=2, **options):
    options = {"trellis_L": 8, "code_1mad": True, "tile_rows": 8, "tile_cols": 8, **options}
    return QuantSpec.build("m", "qtip", bits, calib=CAL, options=options)


def test_block_feedback_splits_the_objective_into_block_errors():
    """For any block step, tr(E H E^T) = sum_B r_B D_B r_B^T with r_B = target_B - w_hat_B and D_B = M D M^T:
    the identity that makes a block quantizer minimising |r_B| the right step (BlockLDLQ)."""
    W, H = correlated_problem(12, 32, seed=3)
    U, D = PreparedHessian(H, 0.01, False, "l").ldl()
    ef = ErrorFeedback(W, U, torch.arange(32))
    ef.run_blocks(lambda k0, t: torch.round(t * 2) / 2, 8)  # any rounding of the targets
    W_hat = (ef.Wt - ef.err).T
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(32, dtype=H.dtype)
    total = 0.0
    for b0 in range(0, 32, 8):
        M = U[b0:b0 + 8, b0:b0 + 8]
        r = (ef.targets[b0:b0 + 8] - (ef.Wt - ef.err)[b0:b0 + 8]).T  # (rows, 8)
        total += float(((r @ (M * D[b0:b0 + 8]) @ M.T) * r).sum())
    assert layer_error(W, W_hat, Hd) == pytest.approx(total, rel=1e-9)
    # width 1 is scalar LDLQ
    a, b = ErrorFeedback(W, U, torch.arange(32)), ErrorFeedback(W, U, torch.arange(32))
    a.run_blocks(lambda k0, t: torch.round(t * 2) / 2, 1)
    b.run(lambda k, t: torch.round(t * 2) / 2)
    assert torch.allclose(a.err, b.err, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blockldlq_never_ends_above_plain_trellis_rounding(seed):
    W, H = correlated_problem(32, 64, seed=seed, dtype=torch.float32)
    spec = _spec()
    result = solve_layer(W, H, spec, "layer")
    task = LayerSolver(spec).task(H, "layer")
    prep = Prepared(W, task)
    _, plain = prep.trellis.quantize(weight_to_tiles(prep.W, prep.tile))
    W_plain = prep.incs[0].unweight(tiles_to_weight(plain, 32, 64, prep.tile).double() * prep.scales[0]).float()
    qtip, rounding = layer_error(W, result.weight, H), layer_error(W, W_plain, H)
    assert qtip < 0.9 * rounding
    # the objective is the transformed one: the same error seen from the transformed domain
    Wt_hat = prep.incs[0].weight(result.weight.double())
    assert layer_error(prep.W.double() * prep.scales[0].double(), Wt_hat, prep.hessian.raw.double()) == \
        pytest.approx(qtip, rel=1e-4)


def test_stored_layer_decodes_to_the_solver_weight_and_is_cut_per_layer():
    W, H = correlated_problem(48, 64, seed=4, dtype=torch.float32)
    result = solve_layer(W, H, _spec(3), "block.q+k", rows=(32, 16))
    rep = result.rep
    assert rep.format == "trellis" and rep.shape == (48, 64)
    assert rep.bits_per_weight == pytest.approx(3 + 16 * 2 / (48 * 64))
    back = TrellisQuantized.from_tensors(rep.meta(), rep.to_tensors())
    assert torch.equal(back.dequantize(), result.weight)
    assert rep.to_tensors()["trellis"].numel() * 32 == 48 * 64 * 3  # k bits per weight, packed
    q, k = rep.select_rows(slice(0, 32)), rep.select_rows(slice(32, 48))
    assert torch.allclose(q.dequantize(), result.weight[:32]) and torch.allclose(k.dequantize(), result.weight[32:])
    assert torch.allclose(TrellisQuantized.stack_rows([q, k]).dequantize(), result.weight)
    with pytest.raises(ValueError, match="cut a segment"):
        rep.select_rows(slice(0, 16))
    # the two layers got their own output transforms and scales, one shared input transform
    assert rep.seeds[0, 0] != rep.seeds[1, 0] and rep.seeds[0, 1] == rep.seeds[1, 1]
    assert not torch.equal(rep.scales[0], rep.scales[1])


def test_quantization_improves_with_bits_and_state_bits():
    W, H = correlated_problem(32, 64, seed=5, dtype=torch.float32)
    err = {(b, L): layer_error(W, solve_layer(W, H, _spec(b, trellis_L=L), "l").weight, H)
           for b, L in ((2, 6), (2, 10), (3, 10))}
    assert err[(2, 6)] > err[(2, 10)] > err[(3, 10)]
    ref = float(((W @ H) * W).sum())
    assert err[(2, 10)] / ref < 0.1


@pytest.mark.parametrize("name,match", [
    ("m.c4.n8.L16.qtip.w2g64", "group size"),
    ("m.c4.n8.L16.qtip.w2.tl2", "state bits"),
    ("m.c4.n8.L16.qtip.w9", "bits"),
    ("m.c4.n8.L16.qtip.w2.tl9", "hyb_bits"),  # HYB's Q = 9 needs L > 9
    ("m.c4.n8.L16.qtip.w2.1mad.3inst", "one code"),
    ("m.c4.n8.L16.qtip.w2.1mad.hybq8", "applies only to the HYB"),
    ("m.c4.n8.L16.qtip.w2.wscale0", "scale"),
])
def test_bad_settings_are_refused(name, match):
    with pytest.raises(ConfigError, match=match):
        QuantSpec.parse(name)


def test_layer_not_in_whole_tiles_is_refused():
    W, H = correlated_problem(24, 64, seed=0, dtype=torch.float32)
    with pytest.raises(ConfigError, match="tiles"):
        solve_layer(W, H, _spec(tile_rows=16), "l")


def test_short_name_round_trips():
    spec = _spec(3, code_1mad=False, code_3inst=True, trellis_L=12)
    assert spec.short_name() == "m.c4.n8.L16.qtip.w3.3inst.ty8.tx8.tl12"
    assert QuantSpec.parse(spec.short_name()) == spec
    default = QuantSpec.parse("m.c4.n8.L16.qtip.w2")  # the paper's: HYB, Q = 9, V = 2, L = 16, 16 x 16 tiles
    assert [default.opt(k) for k in ("trellis_L", "hyb_bits", "tile_rows", "tile_cols", "scale")] == [16, 9, 16, 16, 0.9]
    assert not default.opt("code_1mad") and not default.opt("code_3inst")


def test_hyb_runs_with_two_weights_per_state():
    W, H = correlated_problem(32, 64, seed=6, dtype=torch.float32)
    result = solve_layer(W, H, _spec(code_1mad=False, trellis_L=8, hyb_bits=5), "l")
    rep = result.rep
    assert rep.trellis.code == "hyb" and rep.trellis.V == 2 and rep.symbols.shape == (4 * 8, 32)
    assert rep.bits_per_weight == pytest.approx(2 + (16 + 16 * 32 * 2) / (32 * 64))  # the stored table counted
    back = TrellisQuantized.from_tensors(rep.meta(), rep.to_tensors())
    assert torch.equal(back.dequantize(), result.weight)
    ref = float(((W @ H) * W).sum())
    assert layer_error(W, result.weight, H) / ref < 0.1
