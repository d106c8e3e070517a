"""QuantEase: properties that a wrong coordinate descent would break (monotone objective, coordinate-wise optimality,
never worse than its LDLQ start), the outlier variants and their stored format, and the BLOOM/Falcon adapters."""

import pytest
import torch

from conftest import build_tokenizer, calib_tokens, quantize_save_reload, requires_assets, tiny_model
from test_solvers import correlated_problem
from quantlib.errors import ConfigError
from quantlib.stats.hessian import add_damping, fix_dead_columns, layer_error
from quantlib.formats.outliers import ColumnOutliers, OutlierQuantized, SparseOutliers
from quantlib.catalog.registry import FORMATS
from quantlib.runner.walk import quantize_model
from quantlib.solvers.contract import solve_layer
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

CAL = CalibSpec("c4", 8, 16)


def spec(solver="quantease", bits=3, gs=-1, **options):
    return QuantSpec.build("m", solver, bits, gs, calib=CAL, options=options)


def damped(H, s):
    return add_damping(fix_dead_columns(H)[0], s.opt("damp"))


def quantized_steps(result):
    """Objectives of quantized sweeps that follow a quantized sweep (these start on the grid)."""
    trace, relaxed = result.stats["cd_objective"], set(result.stats["cd_relaxed"])
    return [(trace[i - 1], trace[i]) for i in range(1, len(trace)) if i not in relaxed and i - 1 not in relaxed]


@pytest.mark.parametrize("gs,act_order", [(-1, True), (32, False), (16, True)])
def test_objective_never_increases_between_quantized_sweeps(gs, act_order):
    W, H = correlated_problem(d_out=24, d_in=96)
    s = spec(gs=gs, act_order=act_order, relax=False, iterations=8)
    result = solve_layer(W, H, s, "layer")
    trace = result.stats["cd_objective"]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(trace, trace[1:])), trace
    assert trace[-1] < trace[0]  # the sweeps do something
    # the per-step bookkeeping agrees with the objective of the returned weight
    assert layer_error(W, result.weight, damped(H, s)) == pytest.approx(result.stats["cd_final"], rel=1e-9)
    # the accelerated schedule: relaxed sweeps at 1, 4, ... and every quantized-after-quantized step is monotone
    accel = solve_layer(W, H, spec(gs=gs, act_order=act_order, iterations=30), "layer")
    assert accel.stats["cd_relaxed"] == [1, 4, 7, 10, 13, 16, 19, 22, 25]
    assert all(b <= a * (1 + 1e-12) for a, b in quantized_steps(accel))


def test_result_is_coordinate_wise_optimal():
    """At a fixed point of quantized sweeps no single weight can move to another grid point and lower f: the
    nearest grid point to each coordinate's unconstrained minimiser is the weight itself."""
    W, H = correlated_problem(d_out=16, d_in=48, seed=3)
    s = spec(bits=2, gs=16, relax=False, iterations=60)
    result = solve_layer(W, H, s, "layer")
    Hd = damped(H, s)
    u = result.weight + ((W - result.weight) @ Hd) / torch.diagonal(Hd)
    grid = result.rep.grid
    assert torch.equal(grid.round(u), result.weight)
    assert torch.equal(result.weight, grid.round(result.weight))  # on the grid


@pytest.mark.parametrize("gs,act_order", [(-1, True), (32, True), (-1, False)])
def test_gptq_quantease_starts_at_ldlq_and_ends_below(gs, act_order):
    W, H = correlated_problem(d_out=32, d_in=128, seed=gs + 7)
    s = spec("gptq_quantease", gs=gs, act_order=act_order, iterations=10)
    start = solve_layer(W, H, spec("ldlq", gs=gs, act_order=act_order), "layer")
    result = solve_layer(W, H, s, "layer")
    Hd = damped(H, s)
    f_ldlq = layer_error(W, start.weight, Hd)
    assert result.stats["cd_start"] == pytest.approx(f_ldlq, rel=1e-9)
    assert result.stats["cd_objective"][0] <= f_ldlq * (1 + 1e-12)  # the first sweep starts on LDLQ's grid point
    assert layer_error(W, result.weight, Hd) < f_ldlq
    assert torch.equal(result.rep.grid.scale, start.rep.grid.scale)  # LDLQ's grid is kept


@pytest.mark.parametrize("structured", [False, True])
def test_outliers_lower_the_objective_and_are_counted(structured):
    W, H = correlated_problem(d_out=32, d_in=200, seed=1)
    W[3, 17] = 25.0  # a real outlier that stretches the row's range
    plain = solve_layer(W, H, spec(iterations=10), "layer")
    s = spec(iterations=10, outliers=0.01, structured=structured)
    result = solve_layer(W, H, s, "layer")
    Hd = damped(H, s)
    assert layer_error(W, result.weight, Hd) < 0.9 * layer_error(W, plain.weight, Hd)
    rep = result.rep
    assert isinstance(rep, OutlierQuantized)
    if structured:
        assert isinstance(rep.outliers, ColumnOutliers) and rep.outliers.columns.numel() == 2  # round(200 * 0.01)
    else:
        assert isinstance(rep.outliers, SparseOutliers) and rep.outliers.count == 64  # round(32 * 200 * 0.01)
    assert rep.bits_per_weight > plain.rep.bits_per_weight + (0.32 if not structured else 0.16)
    assert torch.equal(result.weight, rep.dequantize())
    # the hard-thresholding step keeps quantized-after-quantized sweeps monotone too
    mono = solve_layer(W, H, spec(iterations=6, outliers=0.01, structured=structured, relax=False), "layer")
    trace = mono.stats["cd_objective"]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(trace, trace[1:])), trace


@pytest.mark.parametrize("structured", [False, True])
def test_outlier_format_round_trip_gives_identical_logits(tmp_path, structured):
    tok_dir = tmp_path / "src"
    build_tokenizer(tok_dir)
    model = tiny_model("llama")
    s = QuantSpec.build("m", "quantease", 3, 32, calib=CalibSpec("c4", 8, 32),
                        options={"outliers": 0.05, "structured": structured, "iterations": 4})
    _, layers, diag = quantize_save_reload(model, s, tok_dir, tmp_path / "q")
    assert all(m["format"] == "uniform_outliers" for m in layers.values())
    assert all(d["bits_per_weight"] > 3.5 for d in diag["layers"].values())  # 3 bits + group stats + outliers
    assert 3.5 < diag["avg_bits_per_weight"] < max(d["bits_per_weight"] for d in diag["layers"].values()) + 1e-9


def test_outlier_representations_select_rows():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(10, 12, generator=g) * (torch.rand(10, 12, generator=g) < 0.2)
    sp = SparseOutliers.from_dense(S)
    assert torch.equal(sp.dense(), S.half().float())
    assert torch.equal(sp.select_rows(slice(3, 7)).dense(), S[3:7].half().float())
    cols = ColumnOutliers.from_dense(S, torch.tensor([5, 1]))
    assert torch.equal(cols.select_rows(slice(2, 9)).dense()[:, [1, 5]], S[2:9, [1, 5]].half().float())
    assert "uniform_outliers" in FORMATS


@pytest.mark.parametrize("options", [{}, {"iterations": 10}, {"outliers": 0.01}, {"outliers": 0.005, "structured": True},
                                     {"relax": False, "act_order": False}, {"outlier_step": 0.5, "outliers": 0.02}])
@pytest.mark.parametrize("solver", ["quantease", "gptq_quantease"])
def test_short_names_round_trip(solver, options):
    if solver == "gptq_quantease" and ({"outliers", "outlier_step", "structured"} & set(options)):
        pytest.skip("outliers are a QuantEase option")
    s = spec(solver, gs=64, **options)
    assert QuantSpec.parse(s.short_name()) == s
    assert (".ol0p01" in s.short_name()) == (options.get("outliers") == 0.01)
    assert ".it" not in spec(solver).short_name()  # the default 30 iterations is not written


def test_outlier_settings_need_a_fraction():
    for options in ({"structured": True}, {"outlier_step": 0.5}):
        with pytest.raises(ConfigError, match="applies only with outliers"):
            spec(**options)
    with pytest.raises(ConfigError, match=r"fraction of the weights in \[0, 1\)"):
        spec(outliers=1.5)


@pytest.mark.parametrize("family", ["bloom", "falcon"])
def test_bloom_and_falcon_adapters(family):
    import transformers as T

    from quantlib.access.adapters import adapter_for, get_adapter

    torch.manual_seed(0)
    if family == "bloom":
        cfg = T.BloomConfig(vocab_size=300, hidden_size=64, n_layer=2, n_head=4)
    else:
        cfg = T.FalconConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.config.use_cache = False
    adapter = adapter_for(model)
    block = adapter.block_list(model)[0]
    names = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {n for g in adapter.subgroups for n in g}
    dims = get_adapter(cfg.model_type).input_dims(cfg.to_dict())
    assert {n: block.get_submodule(n).in_features for n in names} == dims
    x = calib_tokens(4, 16)
    with torch.no_grad():
        before = model(x).logits
    report = quantize_model(model, QuantSpec.build("m", "ldlq", 4, 32, calib=CAL), calib_tokens(8), progress=False)
    assert len(report.layers) == 2 * len(names)
    with torch.no_grad():
        after = model(x).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)


@pytest.mark.slow
@requires_assets
def test_gptq_quantease_not_worse_than_ldlq_on_real_layers():
    """Hessians of real layers of the offline model from C4 text: gptq_quantease ends at or below LDLQ's objective
    and quantease with 1 % outliers below plain quantease."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import ASSETS, SMOL_DIR, SMOL_GGUF

    model = AutoModelForCausalLM.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_GGUF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_GGUF)
    text = pd.read_parquet(ASSETS / "datasets/c4/found/yxanul--yxanul_0.6B/c4_validation_2k.parquet")["text"]
    ids = tok("\n\n".join(text[1100:1160]), return_tensors="pt").input_ids[:, :8 * 256].reshape(8, 256)
    names = ("model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj")
    acts = {}

    def keep_input(name):
        def hook(module, inputs, output):  # returns None: the module's output is left as it is
            acts[name] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep_input(n)) for n in names]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for name in names:
        X = acts[name]
        H = X.T @ X / X.shape[0]
        W = model.get_submodule(name).weight.data.float()
        for gs in (-1, 64):
            s = spec("gptq_quantease", gs=gs)
            Hd = damped(H, s)
            f_ldlq = layer_error(W, solve_layer(W, H, spec("ldlq", gs=gs), name).weight, Hd)
            result = solve_layer(W, H, s, name)
            assert result.stats["cd_start"] == pytest.approx(f_ldlq, rel=1e-4)
            assert layer_error(W, result.weight, Hd) <= f_ldlq * (1 + 1e-6)
            plain = layer_error(W, solve_layer(W, H, spec(gs=gs), name).weight, Hd)
            outl = layer_error(W, solve_layer(W, H, spec(gs=gs, outliers=0.01), name).weight, Hd)
            assert outl < plain
