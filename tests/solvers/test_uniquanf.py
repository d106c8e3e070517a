"""UniQuanF's family on a tiny model: FlexRound at zero steps is RTN, UniQuanF's unified quantizer with the
uniform alphas is the uniform grid, ALTERNATING beats its greedy start, training lowers every block's output error,
the bcq format reloads to identical logits and holds a uniform grid exactly, and a seed fixes the result."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tokenizer, calib_tokens, quantize_save_reload, tiny_model
from quantlib.errors import ConfigError
from quantlib.formats.bcq import BcqQuantized, levels, signs_of
from quantlib.formats.uniform import UniformGrid
from quantlib.solvers.grid_init import minmax_params
from quantlib.runner.walk import quantize_model
from quantlib.solvers.contract import LayerSolver, solve_layer
from quantlib.solvers.alternating import fit, greedy, nearest_level
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

CAL = CalibSpec("c4", 16, 32)


def spec(solver, bits=3, gs=-1, **options):
    return QuantSpec.build("m", solver, bits, gs, calib=CAL, options=options)


def _layer():
    return tiny_model("llama").model.layers[0].mlp.up_proj


def test_flexround_at_zero_steps_is_rtn():
    lin = _layer()
    for gs in (-1, 32):
        s = spec("flexround", 3, gs)
        module = LayerSolver(s).solve(lin, LayerSolver(s).task(None, "l"))
        frozen = module.freeze()
        rtn = solve_layer(lin.weight.detach().float(), None, QuantSpec.build("m", "rtn", 3, gs))
        assert torch.equal(frozen.rep.codes, rtn.rep.codes)
        assert torch.allclose(frozen.weight, rtn.weight, rtol=1e-6, atol=1e-8)


def test_uniquanf_with_uniform_alphas_is_the_uniform_grid():
    """alpha = (2^(b-2), ..., 2^-1) makes the levels -Q/2..Q/2 in steps of 1: W_hat is round-to-nearest on the grid
    of scale s and (real) zero point z."""
    lin = _layer()
    s = spec("uniquanf", 3)
    module = LayerSolver(s).solve(lin, LayerSolver(s).task(None, "l"))
    with torch.no_grad():
        module.alpha.copy_(torch.tensor([2.0, 1.0, 0.5]).expand_as(module.alpha))
        module.remap(module._u(), nearest=True)
        got = module.weight_hat()
    scale, zero = torch.exp(module.d1), module.zero
    want = UniformGrid(scale, zero, 3, -1).round(module.weight_fp)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_alternating_beats_greedy_and_the_nearest_level_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 64, generator=g)
    for b in (2, 3, 4):
        a0, i0 = greedy(x, b)
        e_greedy = ((x - levels(a0).gather(1, i0)) ** 2).mean()
        a, i, o = fit(x, b, 15, offset=True)
        e_alt = ((x - levels(a).gather(1, i) - o.unsqueeze(1)) ** 2).mean()
        assert e_alt <= e_greedy
        # the nearest level by search equals the exhaustive choice
        lv = levels(a)
        brute = (x.unsqueeze(-1) - o.view(-1, 1, 1) - lv.unsqueeze(1)).abs().argmin(-1)
        got = nearest_level(x - o.unsqueeze(1), a)
        assert torch.equal(lv.gather(1, got), lv.gather(1, brute))


def test_bcq_holds_a_uniform_grid_exactly_and_round_trips():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 64, generator=g)
    scale, zero = minmax_params(W, 3, 32, False)
    grid = UniformGrid(scale.half().float(), zero, 3, 32)
    codes = grid.quantize(W).long()
    alphas = (grid.scale.unsqueeze(-1) * torch.tensor([4.0, 2.0, 1.0]) / 2).half()  # s 2^(i-1), largest first
    offsets = (grid.scale * (7 / 2 - grid.zero)).half()
    signs = signs_of(7 - codes, 3)  # Cartesian index: bit 0 -> +1, so index 7 - q is the code q
    rep = BcqQuantized(signs, alphas, offsets, 32)
    assert torch.allclose(rep.dequantize(), grid.dequantize(codes.float()), atol=2e-3)
    again = BcqQuantized.from_tensors(rep.meta(), rep.to_tensors())
    assert torch.equal(again.dequantize(), rep.dequantize())
    assert rep.bits_per_weight == 3 + 16 * 4 * 2 / 64
    bad = {**rep.to_tensors(), "alphas": rep.alphas[:, :1]}
    with pytest.raises(ValueError, match="'alphas' has shape"):
        BcqQuantized.from_tensors(rep.meta(), bad)


def test_uniquanf_before_training_is_its_init_on_the_nearest_levels():
    """The block error before training is the unified init's: every weight already on its nearest level (not level
    0 of an unmapped index, which put the 'before' error of real blocks at 1e10)."""
    lin = _layer()
    s = spec("uniquanf", 3)
    module = LayerSolver(s).solve(lin, LayerSolver(s).task(None, "l"))
    with torch.no_grad():
        got = module.weight_hat()
        u = module._u()
        table = levels(module.alpha)[:, 0, :]  # per channel: one group
        nearest = (u.unsqueeze(-1) - table.unsqueeze(1)).abs().amin(-1)
        assert torch.allclose((u - table.gather(1, module.index)).abs(), nearest, atol=1e-6)
    W = module.weight_fp
    assert float((got - W).norm() / W.norm()) < 0.5


@pytest.mark.parametrize("solver", ["flexround", "uniquanf"])
def test_training_lowers_every_blocks_error_and_a_seed_fixes_it(solver):
    runs = [quantize_model(tiny_model("llama"), spec(solver, 3, epochs=3), calib_tokens(16, 32), progress=False,
                           seed=seed) for seed in (0, 0, 1)]
    for b in runs[0].blocks:
        assert b["error_after"] < b["error_before"], b
    a, b_, c = ([r.reps[k].dequantize() for k in sorted(r.reps)] for r in runs)
    assert all(torch.equal(x, y) for x, y in zip(a, b_))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_uniquanf_and_flexround_beat_rtn_on_the_tiny_model():
    x = calib_tokens(4, 32, seed=9)
    fp = tiny_model("llama")
    with torch.no_grad():
        ref = fp(x).logits
    err = {}
    for name, s in (("rtn", QuantSpec.build("m", "rtn", 3, -1)), ("flexround", spec("flexround", 3, epochs=4)),
                    ("uniquanf", spec("uniquanf", 3, epochs=4))):
        model = tiny_model("llama")
        quantize_model(model, s, calib_tokens(16, 32) if s.solver != "rtn" else None, progress=False)
        with torch.no_grad():
            err[name] = float(((model(x).logits - ref) ** 2).mean())
    assert err["flexround"] < err["rtn"] and err["uniquanf"] < err["rtn"], err


@pytest.mark.parametrize("name", ["m.alternating.w3", "m.c4.n16.L32.uniquanf.w3.ep1"])
def test_bcq_checkpoints_reload_to_identical_logits(name, tmp_path):
    build_tokenizer(tmp_path / "tok")
    _, layers, diag = quantize_save_reload(tiny_model("llama"), QuantSpec.parse(name), tmp_path / "tok",
                                           tmp_path / "q")
    assert all(m["format"] == "bcq" for m in layers.values())
    assert all(d["bits_per_weight"] == pytest.approx(3 + 16 * 4 / d["shape"][1]) for d in diag["layers"].values())


@pytest.mark.parametrize("name,message", [
    ("m.c4.n16.L32.uniquanf.neuqi.w3", "takes no init"),
    ("m.c4.n16.L32.uniquanf.w3.sym", "does not apply to uniquanf"),
    ("m.c4.n16.L32.alternating.w3", "uses no calibration data"),
    ("m.alternating.w3.sym", "does not apply to alternating"),
    ("m.uniquanf.w3", "needs calibration"),
    ("m.c4.n16.L32.flexround.w3.damp0p1", "does not apply to flexround"),
    ("m.c4.n16.L32.magr.flexround.w3", "block-wise"),
    ("m.c4.n16.L32.uniquanf.w3.ep0", "epochs must be >= 1"),
    ("m.c4.n16.L32.uniquanf.w3.qdrop2", r"qdrop is a probability in \[0, 1\]"),
    ("m.c4.n16.L32.uniquanf.w3.bs17", "larger than the 16 calibration windows"),
    ("m.c4.n16.L32.uniquanf.w3.p0", "remap_period must be >= 1"),
    ("m.c4.n16.L32.uniquanf.w3.clip0", "clip_grid must be >= 1"),
    ("m.alternating.w3.alt0", "alternations must be >= 1"),
])
def test_refused_before_any_work(name, message):
    with pytest.raises(ConfigError, match=message):
        QuantSpec.parse(name)


def _perturbed(module, seed):
    """Random trained-looking d1, d2, d3 (and alpha), so that the quantizer's every branch is taken."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p is getattr(module, "alpha", None):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def round_ste(x):
    return (torch.round(x) - x).detach() + x


def _plain_lsq(m, columns):
    """LSQ's quantizer as a plain autograd expression, the scale gathered per column."""
    scale = m.log_scale.exp()[:, columns]
    codes = torch.clamp(round_ste(m.weight_fp / scale + m.zero[:, columns]), 0, 2 ** m.bits - 1)
    return scale * (codes - m.zero[:, columns])


def _plain_flexround(m, columns):
    """FlexRound's quantizer as a plain autograd expression, parameters gathered per column."""
    divisor = torch.exp(m.d1[:, columns] + m.d2 + m.d3)
    codes = torch.clamp(round_ste(m.weight_fp / divisor + m.zero[:, columns]), 0, 2 ** m.bits - 1)
    return torch.exp(m.d1)[:, columns] * (codes - m.zero[:, columns])


def _plain_uniquanf(m, columns):
    """UniQuanF's quantizer (after remapping) as a plain autograd expression, parameters gathered per column."""
    u = m.weight_fp / torch.exp(m.d1[:, columns] + m.d2 + m.d3) + m.zero[:, columns] - m.Q / 2
    d_out, n_groups, _ = m.alpha.shape
    q = levels(m.alpha).gather(2, m.index.reshape(d_out, n_groups, -1)).reshape(m.index.shape)
    inside = ((u - q).abs() <= m.alpha.detach().abs().amin(-1)[:, columns]).to(u.dtype)
    out = q.detach() + inside * ((u - u.detach()) + (q - q.detach()))
    return torch.exp(m.d1)[:, columns] * (out + m.Q / 2 - m.zero[:, columns])


@pytest.mark.parametrize("solver", ["lsq", "flexround", "uniquanf"])
@pytest.mark.parametrize("gs", [-1, 32])
def test_hand_written_backward_equals_autograd_of_the_plain_quantizer(solver, gs):
    """The quantizers' autograd functions (quantlib.solvers.trainable) give the plain expression's weight bit for bit
    and its gradients for every parameter to float round-off, with weights outside the grid (clamped) and outside
    the smallest alpha (no gradient) present."""
    from quantlib.formats.uniform import group_index
    lin = _layer()
    s = spec(solver, 3, gs)
    module = LayerSolver(s).solve(lin, LayerSolver(s).task(None, "l"))
    _perturbed(module, 1)
    module.steps = 1  # not a remapping step: the same levels for both expressions
    columns = group_index(module.in_features, gs)
    g = torch.Generator().manual_seed(2)
    upstream = torch.randn(module.weight_fp.shape, generator=g)
    params = [p for group in module.param_groups(s) for p in group["params"]]
    plain = {"lsq": _plain_lsq, "flexround": _plain_flexround, "uniquanf": _plain_uniquanf}[solver](module, columns)
    want = torch.autograd.grad((plain * upstream).sum(), params)
    got_weight = module.weight_hat()
    got = torch.autograd.grad((got_weight * upstream).sum(), params)
    assert torch.equal(got_weight, plain.detach())
    if solver != "uniquanf":
        clamped = torch.clamp(torch.round(module._divided().detach()), 0, 7) != torch.round(module._divided().detach())
        assert clamped.any()
    for p, a, b in zip(params, got, want):
        assert a.shape == p.shape
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max())), float((a - b).abs().max())


def test_local_remapping_is_the_best_index_neighbour():
    """remap(nearest=False) moves each weight to the best of c - 1, c, c + 1 (clamped), keeping c on ties and
    preferring c - 1 over c + 1 on a tie between them: a candidate-by-candidate reference, with ties forced by
    putting u exactly on levels and halfway between two."""
    lin = _layer()
    s = spec("uniquanf", 3)
    module = LayerSolver(s).solve(lin, LayerSolver(s).task(None, "l"))
    _perturbed(module, 3)
    g = torch.Generator().manual_seed(4)
    d_out, d_in = module.index.shape
    module.index.copy_(torch.randint(0, 8, (d_out, d_in), generator=g))
    table = levels(module.alpha.detach())
    u = module._u().detach().clone()
    exact = _gather_levels(table, module.index)
    u[:, ::7] = exact[:, ::7]  # on the current level
    nb = _gather_levels(table, (module.index + 1).clamp(max=7))
    u[:, 3::7] = ((exact + nb) / 2)[:, 3::7]  # halfway to c + 1
    best, best_err = module.index.clone(), (u - _gather_levels(table, module.index)).abs()
    for step in (-1, 1):
        cand = (module.index + step).clamp(0, 7)
        err = (u - _gather_levels(table, cand)).abs()
        better = err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    before = module.index.clone()
    module.remap(u, nearest=False)
    assert torch.equal(module.index, best)
    assert not torch.equal(module.index, before) and (module.index - before).abs().max() == 1


def _gather_levels(table, index):
    d_out, n_groups, _ = table.shape
    return table.gather(2, index.reshape(d_out, n_groups, -1)).reshape(index.shape)
