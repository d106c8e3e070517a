"""NeUQI's inits and MagR: properties that would catch a wrong implementation."""

import itertools
import math

import pytest
import torch
from conftest import calib_tokens, requires_assets

from quantlib.errors import ConfigError
from quantlib.solvers.grid_init import _IntZeroSearch, _loss, group_weights, init_grid, optimal_zero, weighted_error
from quantlib.solvers.preprocess import magr, prox_linf
from quantlib.solvers.contract import LayerSolver
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

CAL = CalibSpec("c4", 8, 16)


def spec(init, bits, gs, **options):
    return QuantSpec.build("m", "ldlq", bits, gs, init, calib=CAL, options=options)


def layer(d_out, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) * 0.02
    W[:, ::7] *= 4  # a few large columns, as in real layers
    hdiag = torch.rand(d_in, generator=g) ** 3 + 1e-3  # uneven positive diag(H)
    return W, hdiag


def brute_force_zero_loss(x, h, maxq, lo=-25, hi=25, steps=50001):
    best = torch.full(x.shape[:-1], float("inf"), dtype=x.dtype)
    for zs in torch.linspace(lo, hi, steps, dtype=x.dtype).split(4000):
        t = x.unsqueeze(-1) - zs
        e = t - torch.clamp(torch.round(t), 0, maxq)
        best = torch.minimum(best, (h.unsqueeze(-1) * e * e).sum(-2).amin(-1))
    return best


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_optimal_zero_matches_brute_force(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(8, 2, 24, generator=g, dtype=torch.float64) * 3 + 2
    h = torch.rand(2, 24, generator=g, dtype=torch.float64)
    h /= h.sum(-1, keepdim=True)
    maxq = 2 ** bits - 1
    zeta = optimal_zero(x, h, maxq).unsqueeze(-1)
    e = x - zeta - torch.clamp(torch.round(x - zeta), 0, maxq)
    loss = (h * e * e).sum(-1)
    ref = brute_force_zero_loss(x, h, maxq)
    assert (loss <= ref + 1e-9).all()  # a grid of step 1e-3 cannot beat the exact optimum
    assert (loss >= ref - 1e-3 * ref.abs() - 1e-6).all()  # and lands close to it


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_integer_zero_search_matches_brute_force(bits):
    g = torch.Generator().manual_seed(10 + bits)
    w = (torch.randn(16, 3, 40, generator=g, dtype=torch.float64) * 2 + 0.5).sort(-1).values
    h = torch.rand(3, 40, generator=g, dtype=torch.float64)
    h /= h.sum(-1, keepdim=True)
    hs = h.expand_as(w).contiguous()
    maxq = 2 ** bits - 1
    search = _IntZeroSearch(w, hs, maxq)
    for factor in (0.05, 0.2, 0.6, 1.0):  # heavy clipping to none
        scale = (w[..., -1] - w[..., 0]) / maxq * factor
        zero, loss = search(scale)
        every = torch.stack([_loss(w, hs, scale, torch.full_like(scale, z), maxq) for z in range(maxq + 1)], -1)
        torch.testing.assert_close(loss, every.amin(-1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(_loss(w, hs, scale, zero, maxq), loss, rtol=1e-9, atol=1e-12)


CASES = [(2, 64, (24, 128)), (3, -1, (16, 96)), (4, 32, (12, 64)), (3, 16, (8, 48))]


@pytest.mark.parametrize("bits,gs,shape", CASES)
def test_neuqi_objective_never_worse_than_minmax(bits, gs, shape):
    W, hdiag = layer(*shape, seed=bits)
    h = group_weights(hdiag, shape[1], gs, True)
    errs = {}
    for init, opts in [("minmax", {}), ("minmax", {"sym": True}), ("neuqi", {"grid": 256, "grid_coarse": 16}),
                       ("neuqi_int", {"grid": 128})]:
        grid = init_grid(W, spec(init, bits, gs, **opts), hdiag)
        errs[init + ("_sym" if opts.get("sym") else "")] = weighted_error(W, grid, h)
    tol = 1e-6
    assert (errs["neuqi"] <= errs["minmax"] * (1 + tol)).all()
    assert (errs["neuqi"] <= errs["minmax_sym"] * (1 + tol)).all()
    assert (errs["neuqi_int"] <= errs["minmax"] * (1 + tol)).all()
    assert errs["neuqi"].sum() < 0.9 * errs["minmax"].sum()  # a real gain, not a tie


def test_neuqi_real_zero_beats_integer_zero_on_the_same_grid():
    # grid = grid_coarse: both search exactly the scales s0 * t / 16; a real zero point can only help.
    W, hdiag = layer(32, 128, seed=5)
    h = group_weights(hdiag, 128, 32, True)
    real = weighted_error(W, init_grid(W, spec("neuqi", 3, 32, grid=16, grid_coarse=16), hdiag), h)
    integer = weighted_error(W, init_grid(W, spec("neuqi_int", 3, 32, grid=16), hdiag), h)
    assert (real <= integer * (1 + 1e-6)).all()


def test_neuqi_int_zero_points_are_integers_in_range():
    W, hdiag = layer(16, 128, seed=1)
    grid = init_grid(W, spec("neuqi_int", 3, 32, grid=64), hdiag)
    assert torch.equal(grid.zero, grid.zero.round())
    assert grid.zero.min() >= 0 and grid.zero.max() <= 7
    real = init_grid(W, spec("neuqi", 3, 32, grid=64, grid_coarse=16), hdiag)
    assert not torch.equal(real.zero, real.zero.round())  # the real variant really is real


def test_diag_weighting_changes_the_objective():
    W, hdiag = layer(16, 128, seed=2)
    hw = group_weights(hdiag, 128, 64, True)
    weighted = init_grid(W, spec("neuqi", 2, 64, grid=64, grid_coarse=16), hdiag)
    uniform = init_grid(W, spec("neuqi", 2, 64, grid=64, grid_coarse=16, hdiag_weight=False), hdiag)
    assert weighted_error(W, weighted, hw).sum() < weighted_error(W, uniform, hw).sum()


def test_neuqi_rejects_symmetric_grids():
    W, hdiag = layer(4, 64, seed=0)
    for init in ("neuqi", "neuqi_int"):  # they choose the zero point: 'sym' is refused when the name is built
        with pytest.raises(ConfigError, match=f"'sym' .*does not apply to ldlq .{init} init."):
            spec(init, 3, 32, sym=True)


@pytest.mark.parametrize("alpha", [1e-3, 0.3, 3.0, 100.0])  # few, many (full sort), most and all entries clipped
def test_prox_linf_is_the_proximal_operator(alpha):
    """prox(v) = argmin_u 1/2 ||u - v||^2 + alpha ||u||_inf: no point sampled near it does better, on the
    partial-sort path (few clipped entries) and the full-sort one alike."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(40, 3, 24, generator=g, dtype=torch.float64)

    def cost(u):
        return 0.5 * ((u - v) ** 2).sum(-1) + alpha * u.abs().amax(-1)

    p = prox_linf(v, alpha)
    best = cost(p)
    for scale in (1e-1, 1e-3):
        for _ in range(100):
            u = p + scale * torch.randn(v.shape, generator=g, dtype=torch.float64)
            assert (best <= cost(u) + 1e-12).all()
    small = v.abs().sum(-1) <= alpha
    assert (p[small] == 0).all()


@pytest.mark.parametrize("gs", [32, -1])
def test_magr_reduces_max_magnitude_and_keeps_the_output(gs):
    g = torch.Generator().manual_seed(0)
    d_in = 128
    X = torch.randn(2048, d_in, generator=g) @ (torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=g) / d_in ** 0.5)
    H = X.T @ X / X.shape[0]
    W = torch.randn(32, d_in, generator=g) * 0.02
    W[:, 3] *= 8  # outliers, what MagR is for
    s = QuantSpec.build("m", "ldlq", 3, gs, preprocess=["magr"], calib=CAL, options={"magr_alpha": 1e-2})
    V = magr(W, LayerSolver(s).task(H, "test"))
    def gmax(M):
        return M.reshape(32, -1, d_in if gs == -1 else gs).abs().amax(-1)
    assert (gmax(V) < gmax(W)).all() and gmax(V).mean() < 0.9 * gmax(W).mean()
    out_err = ((V - W) @ H * (V - W)).sum() / ((W @ H) * W).sum()
    assert out_err < 0.05


def test_runner_measures_error_against_original_weights(monkeypatch):
    """With MagR, the solver sees preprocessed weights; the recorded layer error compares with the original."""
    from conftest import calib_tokens, tiny_model
    from quantlib.runner.walk import quantize_model

    model = tiny_model("llama")
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    s = QuantSpec.build("tiny", "ldlq", 4, 32, preprocess=["magr"], calib=CAL, options={"magr_iters": 5})
    report = quantize_model(model, s, calib_tokens(8, 16), progress=False)
    name = next(iter(W0))
    full = next(k for k in report.layers if k.endswith(name.split("layers.")[-1]))
    assert report.layers[full]["rel_error"] > 0
    assert not torch.equal(dict(model.named_modules())[name].weight, W0[name])


@pytest.mark.parametrize("name", [
    "m.c4.n8.L16.ldlq.neuqi.w3g64",
    "m.c4.n8.L16.ldlq.neuqi_int.w2.grid256",
    "m.c4.n8.L16.ldlq.neuqi.w2g128.grid1024.coarse32.unweighted",
    "m.c4.n8.L16.magr.ldlq.w3g64",
    "m.c4.n8.L16.magr.ldlq.neuqi.w3.malpha0p01.iters50",
    "m.c4.n8.L16.rtn.neuqi.w4g64",
])
def test_new_short_names_round_trip(name):
    assert QuantSpec.parse(name).short_name() == name


def test_short_name_defaults():
    assert spec("neuqi", 3, 64).short_name() == "m.c4.n8.L16.ldlq.neuqi.w3g64"
    s = QuantSpec.build("m", "ldlq", 3, 64, preprocess=["magr"], calib=CAL, options={"magr_alpha": 1e-4})
    assert s.short_name() == "m.c4.n8.L16.magr.ldlq.w3g64"  # 1e-4 is the grouped default
    s = QuantSpec.build("m", "ldlq", 3, -1, preprocess=["magr"], calib=CAL, options={"magr_alpha": 1e-4})
    assert s.short_name() == "m.c4.n8.L16.magr.ldlq.w3.malpha0p0001"  # per channel the default is 1e-3
    # the diag-weighted init needs the Hessian even with RTN
    assert QuantSpec.build("m", "rtn", 4, 64, "neuqi", calib=CAL).calib == CAL


@pytest.mark.slow
@requires_assets
@pytest.mark.parametrize("bits,gs", [(3, 64), (2, 64), (3, -1)])
def test_neuqi_objective_on_real_layers(bits, gs):
    """The same comparison on real layers of the offline model (converted float32 copy), with a random positive
    diag(H)."""
    from pathlib import Path

    from safetensors.torch import load_file

    model_dir = Path(__file__).resolve().parents[2] / "resources/models/smollm2-135m-instruct-q4_1"
    if not model_dir.exists():
        pytest.skip(f"{model_dir} not converted yet (run the offline workflow once)")
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    names = [n for n in tensors if n.endswith(("layers.3.self_attn.q_proj.weight", "layers.17.mlp.down_proj.weight"))]
    assert names
    g = torch.Generator().manual_seed(0)
    for name in names:
        W = tensors[name].float()
        hdiag = torch.rand(W.shape[1], generator=g) ** 3 + 1e-3
        h = group_weights(hdiag, W.shape[1], gs, True)
        mm = weighted_error(W, init_grid(W, spec("minmax", bits, gs), hdiag), h)
        nq = weighted_error(W, init_grid(W, spec("neuqi", bits, gs), hdiag), h)
        assert (nq <= mm * (1 + 1e-6)).all(), name


# ------------------------------------------------------------------------------------- MagR's clipped init

def test_clip_init_keeps_each_groups_minimum_on_code_0_and_clips_only_the_top():
    """NeUQI's reference init after MagR (`clip_wo_shift_zp`): step beta (max - min) / Qmax of the group's own range,
    the minimum on code 0; with beta = 1 the maximum lands on the top code, with beta < 1 the top (1 - beta) of the
    range saturates and nothing at the bottom does."""
    from quantlib.solvers.grid_init import clip_init

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g) + 0.3  # groups whose ranges need not contain 0
    for bits, beta in ((2, 0.8), (3, 0.9), (4, 1.0), (3, 0.6)):
        spec = QuantSpec.build("m", "rtn", bits, 32, init="clip", options={"clip_beta": beta})
        grid = clip_init(W, spec)
        maxq = 2 ** bits - 1
        groups = W.reshape(16, 2, 32)
        lo, hi = groups.amin(-1), groups.amax(-1)
        assert torch.allclose(grid.scale, beta * (hi - lo) / maxq)
        assert torch.equal(grid.zero, -torch.round(lo / grid.scale))
        codes = grid.quantize(W).reshape(16, 2, 32).long()
        at_min = groups == lo.unsqueeze(-1)
        assert (codes[at_min] == 0).all()
        # The top code sits within half a step of min + beta (max - min) (the zero point is rounded): above that
        # and half a step more, every weight saturates.
        top = groups > (lo + beta * (hi - lo) + grid.scale).unsqueeze(-1)
        assert (codes[top] == maxq).all()
        w_hat_max = grid.dequantize(grid.quantize(W)).reshape(16, 2, 32).amax(-1)
        if beta < 1:  # clipped: the group's maximum is not representable (beta < 2 Qmax / (2 Qmax + 1) here)
            assert (w_hat_max < hi).all()
        else:
            assert torch.allclose(w_hat_max, hi, atol=float(grid.scale.max()) / 2 + 1e-6)


def test_clip_init_defaults_are_the_references_and_it_composes_with_magr_and_every_solver():
    from conftest import tiny_model
    from quantlib.runner.walk import quantize_model

    beta = {("w2", ""): 0.8, ("w3", ""): 0.9, ("w4", ""): 1.0, ("w2", "g128"): 0.95, ("w3", "g64"): 1.0,
            ("w2", "g32"): 0.8}
    for (bits, group), want in beta.items():
        assert QuantSpec.parse(f"m.c4.n8.L32.magr.ldlq.clip.{bits}{group}").opt("clip_beta") == want
    assert QuantSpec.parse("m.rtn.clip.w2.beta0p7").short_name() == "m.rtn.clip.w2.beta0p7"
    with pytest.raises(ConfigError, match="clip_beta shrinks the min-max step"):
        QuantSpec.build("m", "rtn", 2, -1, init="clip", options={"clip_beta": 1.2})
    for name in ("m.rtn.clip.w3g32", "m.c4.n16.L32.magr.ldlq.clip.w2g32", "m.c4.n16.L32.quantease.clip.w3g32.it2"):
        model = tiny_model("llama")
        report = quantize_model(model, QuantSpec.parse(name), calib_tokens(16, 32), progress=False)
        assert report.layers and all(math.isfinite(d["rel_error"]) for d in report.layers.values())
