"""GuidedQuant's family on tiny models: gradient capture equals autograd, the guided Hessians and objective, k-means
and LNQ's steps (table update = its normal equations, code update = exhaustive per-coordinate search, objective
never increasing), the lookup-table format, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import calib_tokens, tiny_model
from test_solvers import correlated_problem
from quantlib.errors import ConfigError, DataError
from quantlib.formats.lut import LutQuantized
from quantlib.stats.hessian import HessianAccumulator, WeightedHessianAccumulator, layer_error
from quantlib.runner.walk import quantize_model
from quantlib.solvers.contract import solve_layer
from quantlib.solvers.lnq import table_update, weighted_kmeans
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec
from quantlib.stats.artifacts import compute_statistic, open_statistic

CAL = CalibSpec("c4", 6, 16)
CALIB = "m.c4.n6.L16"


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    """The three statistics of a tiny Llama on 6 windows of 16 tokens."""
    root = tmp_path_factory.mktemp("stats")
    tokens = calib_tokens(6, 16)
    compute_statistic("gradients.G4", tiny_model("llama"), tokens, root / "gradients", CALIB, "m", progress=False)
    compute_statistic("fp_hessian", tiny_model("llama"), tokens, root / "fp_hessian", CALIB, "m", progress=False)
    compute_statistic("guided_hessian.g2", tiny_model("llama"), tokens, root / "guided", CALIB, "m",
                      inputs={"gradients": root / "gradients"}, progress=False)
    return root, tokens


def _open(spec, root):
    paths = {"gradients": root / "gradients", "fp_hessian": root / "fp_hessian", "guided_hessian": root / "guided"}
    return {k: open_statistic(k, paths[k], spec) for k in spec.statistic_kinds()}


def test_gradient_capture_equals_autograd(stats):
    """Per window, the squared weight gradient (summed into the Fisher) and the grouped squared output gradient
    (the saliency) equal a direct autograd computation."""
    root, tokens = stats
    spec = QuantSpec.build("m", "sqllm", 3, calib=CAL)
    grads = open_statistic("gradients", root / "gradients", spec)
    model = tiny_model("llama")
    lin = model.model.layers[1].mlp.down_proj
    out = {}
    lin.register_forward_hook(lambda m, a, o: out.__setitem__("z", o))
    fisher = torch.zeros_like(lin.weight)
    for w in range(len(tokens)):
        model.zero_grad()
        ids = tokens[w:w + 1]
        loss = model(ids, labels=ids, use_cache=False).loss
        out["z"].retain_grad()
        loss.backward()
        fisher += lin.weight.grad ** 2
        sal = (out["z"].grad[0] * 1e3).square().reshape(16, 4, -1).mean(-1)
        got = grads.saliency(1, "mlp.down_proj", 4)[w]
        assert torch.allclose(got, sal, rtol=1e-2, atol=1e-6), w  # stored in bfloat16
        # g = 2 is the mean of adjacent pairs of the G = 4 groups
        assert torch.allclose(grads.saliency(1, "mlp.down_proj", 2)[w], got.reshape(16, 2, 2).mean(-1))
    assert torch.allclose(grads.fisher(1, ["mlp.down_proj"]), fisher, rtol=1e-5, atol=1e-12)
    assert json.loads((root / "gradients" / "manifest.json").read_text())["G"] == 4


def test_weighted_hessians_and_the_guided_objective():
    """Constant weights give c H; per-output-channel saliency (g = d_out) turns the guided objective into the
    saliency-weighted output error sum_t sum_j s_tj (dw_j . x_t)^2 / N (GuidedQuant's Remark 3.1)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=g)
    plain, weighted = HessianAccumulator(12), WeightedHessianAccumulator(12, 1)
    plain.add(x)
    weighted.add(x, torch.full((50, 1), 3.0))
    assert torch.allclose(weighted.result()[0], 3 * plain.result(), rtol=1e-5, atol=1e-6)
    s = torch.rand(50, 4, generator=g)
    acc = WeightedHessianAccumulator(12, 4)
    acc.add(x, s)
    dW = torch.randn(4, 12, generator=g)
    guided = sum(float(dW[j] @ acc.result()[j] @ dW[j]) for j in range(4))
    direct = float((s * (x @ dW.T) ** 2).sum() / 50)
    assert guided == pytest.approx(direct, rel=1e-5)
    # the solvers are invariant to the scale of H, so g = 1 with constant saliency is the plain objective
    W, H = correlated_problem(d_out=16, d_in=64)
    spec = QuantSpec.build("m", "ldlq", 3, 16, calib=CAL)
    assert torch.equal(solve_layer(W, H, spec).weight, solve_layer(W, 7.0 * H, spec).weight)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    W = (centres[torch.randint(0, 4, (5, 200), generator=g)] + 0.01 * torch.randn(5, 200, generator=g))
    codes, tables = weighted_kmeans(W, torch.ones_like(W), 2, 50, 0)
    for r in range(5):
        assert torch.allclose(tables[r].float().sort().values, centres, atol=0.01)
        assert torch.allclose(tables[r].float()[codes[r].long()], W[r], atol=0.05)
    # exact zeros weigh nothing: a row that is mostly zeros still spends its entries on the nonzero values
    W2 = torch.cat([torch.zeros(1, 150), W[:1, :50]], 1)
    codes2, tables2 = weighted_kmeans(W2, (W2 != 0).float(), 2, 50, 0)
    assert torch.allclose(tables2[0].float().sort().values, centres, atol=0.01)


def test_table_update_solves_its_normal_equations():
    W, H = correlated_problem(d_out=6, d_in=40, seed=3)
    codes = torch.randint(0, 4, (6, 40), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    lam = 1e-7 * float(torch.diagonal(H).mean())
    tables = table_update(W, H, codes, 4, lam)
    for r in range(6):
        P = torch.nn.functional.one_hot(codes[r].long(), 4).double()
        A = P.T @ H.double() @ P + lam * torch.eye(4, dtype=torch.float64)
        b = P.T @ H.double() @ W[r].double()
        assert torch.allclose(tables[r], torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
        # no table does better on that row's objective
        def f(c):
            d = (W[r].double() - P @ c)
            return float(d @ H.double() @ d)
        assert f(tables[r]) <= f(tables[r] + 1e-3 * torch.randn(4, dtype=torch.float64)) + 1e-12


def test_lnq_objective_never_increases_and_ends_below_squeezellm():
    W, H = correlated_problem(d_out=12, d_in=48, seed=4, dtype=torch.float32)
    stats = {"fisher": torch.rand(12, 48, generator=torch.Generator().manual_seed(0))}
    spec = QuantSpec.build("m", "lnq", 2, calib=CAL, options={"fp_inputs": False, "alternations": 4})
    result = solve_layer(W, H, spec, "l", stats)
    trace = result.stats["lnq_objective"]  # start, table, then (codes, table) per alternation
    for i in range(2, len(trace), 2):  # coordinate descent never raises the objective of the tables it starts from
        assert trace[i] <= trace[i - 1] * (1 + 1e-9), trace
    assert result.stats["lnq_final"] == pytest.approx(min(trace), rel=1e-10) and min(trace) < trace[0]
    sq = solve_layer(W, None, QuantSpec.build("m", "sqllm", 2, calib=CAL), "l", stats)
    assert layer_error(W, result.weight, H) <= layer_error(W, sq.weight, H)
    assert layer_error(W, result.weight, H) == pytest.approx(result.stats["lnq_final"], rel=1e-5)


def test_code_update_is_the_exhaustive_per_coordinate_search():
    """The core's coordinate descent with the table's projection: at its fixed point no single weight can move to
    another entry of its row's table and lower the objective."""
    from quantlib.solvers.loops import CoordinateDescent

    W, H = correlated_problem(d_out=8, d_in=40, seed=5, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    rep = LutQuantized(torch.randint(0, 4, (8, 40), generator=g, dtype=torch.uint8),
                       (torch.randn(8, 4, generator=g) * W.std()).half(), 2)
    perm = torch.arange(40)
    cd = CoordinateDescent(W, rep.dequantize(), H, rep.projection(perm), perm)
    _, codes, _, trace, _ = cd.run(40, relax=False)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(trace, trace[1:]))
    cd.project.restore(codes)
    fixed = LutQuantized(cd.project.codes(), rep.tables, 2)
    W_hat = fixed.dequantize()
    f = layer_error(W, W_hat, H)
    for r in range(8):
        for j in range(40):
            for c in range(4):
                trial = W_hat.clone()
                trial[r, j] = rep.tables[r, c].float()
                assert layer_error(W, trial, H) >= f * (1 - 1e-6), (r, j, c)


def test_lut_format_round_trip_and_bits():
    codes = torch.randint(0, 8, (5, 64), dtype=torch.uint8)
    tables = torch.randn(5, 8).half()
    rep = LutQuantized(codes, tables, 3)
    again = LutQuantized.from_tensors(rep.meta(), rep.to_tensors())
    assert torch.equal(again.dequantize(), rep.dequantize()) and torch.equal(again.codes, codes)
    assert rep.bits_per_weight == 3 + 16 * 8 / 64
    both = LutQuantized.stack_rows([rep.select_rows(slice(0, 2)), rep.select_rows(slice(2, 5))])
    assert torch.equal(both.dequantize(), rep.dequantize())
    with pytest.raises(ValueError, match="float16"):
        LutQuantized.from_tensors(rep.meta(), {**rep.to_tensors(), "lut": tables.float()})


@pytest.mark.parametrize("name", ["m.c4.n6.L16.sqllm.w3", "m.c4.n6.L16.lnq.w2", "m.c4.n6.L16.lnq.w2.gq2",
                                  "m.c4.n6.L16.ldlq.w3g32.gq2", "m.c4.n6.L16.ldlq.w3g32.fpin.gq2",
                                  "m.c4.n6.L16.lnq.w3.qin.hdinit", "m.c4.n6.L16.lnq.w2.gptqassign",
                                  "m.c4.n6.L16.qtip.w2.1mad.tl8", "m.c4.n6.L16.qtip.w2.gq2.hybq6.tl8"])
def test_methods_run_through_the_runner(name, stats):
    root, tokens = stats
    spec = QuantSpec.parse(name)
    model = tiny_model("llama")
    report = quantize_model(model, spec, tokens if spec.needs_tokens else None, statistics=_open(spec, root),
                            progress=False)
    assert len(report.reps) == 14 and all(r.format == spec.format for r in report.reps.values())
    for layer, d in report.layers.items():
        assert torch.equal(report.reps[layer].dequantize(), model.get_submodule(layer).weight), layer
        if spec.opt_or("guided_groups", 0):
            assert d["guided_groups"] == 2 and len(d["row_blocks"]) == 2 and d["guided_error"] > 0
            if spec.solver == "qtip":  # each row block its own transforms, solved with its own transformed H_k
                assert len(report.reps[layer].segments) == 2
        if spec.solver == "lnq":
            assert d.get("lnq_final", 0) <= d.get("lnq_start", 1) or "row_blocks" in d


def test_guided_hessians_from_the_artifact_equal_the_runners_own_at_block_0(stats):
    """`fpin` takes the artifact's H_k; the runner's own capture from one pass of the unquantized block (`noseq`) sees
    the same inputs in block 0, so both give the same first block."""
    root, tokens = stats
    runs = {}
    for name in ("m.c4.n6.L16.ldlq.w3g32.gq2.noseq", "m.c4.n6.L16.ldlq.w3g32.fpin.gq2"):
        spec = QuantSpec.parse(name)
        runs[name] = quantize_model(tiny_model("llama"), spec, tokens, statistics=_open(spec, root), progress=False)
    a, b = runs.values()
    for layer in a.reps:
        if ".layers.0." in layer:
            assert torch.equal(a.reps[layer].codes, b.reps[layer].codes), layer


@pytest.mark.parametrize("name,message", [
    ("m.rtn.w3.gq4", "'gq4' .* does not apply to rtn"),
    ("m.c4.n6.L16.spqr.w3g16.gq4", "does not apply to spqr"),
    ("m.c4.n6.L16.sqllm.w3.gq4", "does not apply to sqllm"),
    ("m.c4.n6.L16.sqllm.w3g64", "one lookup table per row"),
    ("m.c4.n6.L16.sqllm.neuqi.w3", "takes no init"),
    ("m.c4.n6.L16.lnq.w3.sym", "does not apply to lnq"),
    ("m.c4.n6.L16.lnq.w3.cd0", "cd_cycles must be >= 1"),
    ("m.c4.n6.L16.lnq.w3.cd2.gptqassign", "no effect with the LDLQ assignment"),
    ("m.c4.n6.L16.quantease.w3.gq2.ol0p01", "guided objective .gq. and outliers do not combine"),
    ("m.c4.n6.L16.lnq.w1", "bits must be between 2 and 8"),
    ("m.c4.n6.L16.ldlq.w3.noseq.fpin", "'noseq' has no effect with 'fpin'"),
])
def test_refused_before_any_work(name, message):
    with pytest.raises(ConfigError, match=message):
        QuantSpec.parse(name)


def test_group_counts_that_do_not_fit_are_refused(stats, tmp_path):
    root, tokens = stats
    spec = QuantSpec.parse("m.c4.n6.L16.ldlq.w3g32.gq3")  # 3 divides no layer's output size here
    from quantlib.access.adapters import check_row_groups_fit

    with pytest.raises(ConfigError, match="gq 3 does not divide the output size 64 of layer 'self_attn.q_proj'"):
        check_row_groups_fit(tiny_model("llama").config.to_dict(), 3, "m", "gq")
    grads = open_statistic("gradients", root / "gradients", spec)
    with pytest.raises(DataError, match="4 groups, which 3 groups cannot be averaged from"):
        grads.saliency(0, "self_attn.q_proj", 3)
    # an artifact of other windows than the ones quantized with
    with pytest.raises(DataError, match="other calibration windows"):
        grads.check_tokens(calib_tokens(6, 16, seed=3))
    # and the config refuses a gq that the configured saliency groups cannot serve
    from quantlib.config.experiment import Experiment

    cfg = {"models": {"m": {"source": "x"}}, "datasets": {"c4": {"path": "json"}}, "run_models": ["m"],
           "calibration": {"dataset": "c4", "nsamples": 6, "seqlen": 16}, "gradients": {"groups": 4},
           "methods": [{"id": "l", "solver": "lnq", "bits": [2], "options": {"guided_groups": 8}}]}
    with pytest.raises(ConfigError, match="gq8 needs the saliency in a multiple of 8 groups"):
        Experiment(cfg)
