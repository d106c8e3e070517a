"""The sequential block runner on tiny models of every supported family."""

import pytest
import torch

from conftest import calib_tokens, tiny_model
from quantlib.errors import ConfigError, UnsupportedArchitecture
from quantlib.access.adapters import adapter_for
from quantlib.runner.walk import quantize_model
from quantlib.catalog.names import CalibSpec
from quantlib.catalog.spec import QuantSpec

CAL = CalibSpec("c4", 16, 32)
FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt_neox"]


def _weights(model):
    adapter = adapter_for(model)
    return {f"{i}.{n}": lin.weight.detach().clone()
            for i, b in enumerate(adapter.block_list(model)) for n, lin in adapter.linears(b)}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_is_quantized_onto_its_grid(family):
    model = tiny_model(family)
    spec = QuantSpec.build("m", "ldlq", 3, 32, calib=CAL)
    report = quantize_model(model, spec, calib_tokens(), progress=False)
    adapter = adapter_for(model)
    n_linears = sum(len(g) for g in adapter.subgroups) * len(adapter.block_list(model))
    assert len(report.layers) == len(report.reps) == n_linears
    state = model.state_dict()
    from quantlib.formats import load_representation
    for layer, rep in report.reps.items():
        stored = load_representation(rep.meta(), rep.to_tensors())  # the packed form decodes to the same weights
        assert torch.equal(stored.dequantize(), state[f"{layer}.weight"]), layer
        assert report.layers[layer]["rel_error"] < 0.2
    with torch.no_grad():
        assert torch.isfinite(model(calib_tokens(2)).logits).all()


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_one_pass_and_chunked_passes_agree(family):
    """The single-pass path (quantize inside the forward) and the one-pass-per-subgroup path over chunks must give
    the same true-sequential result."""
    spec = QuantSpec.build("m", "ldlq", 4, -1, calib=CAL)
    a, b = tiny_model(family), tiny_model(family)
    quantize_model(a, spec, calib_tokens(), chunk_tokens=10_000, progress=False)
    quantize_model(b, spec, calib_tokens(), chunk_tokens=64, progress=False)  # 2 windows per chunk
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        # Summation order differs between one batch and eight chunks: allow a rare flipped rounding.
        assert (wa[k] - wb[k]).abs().gt(1e-5).float().mean() < 0.01, k


def _o_proj_from_fp_inputs(spec):
    """Block 0's o_proj quantized from the inputs of the *unquantized* block."""
    from quantlib.stats.hessian import HessianAccumulator
    from quantlib.solvers.contract import solve_layer

    ref = tiny_model("llama")
    o_proj = ref.model.layers[0].self_attn.o_proj
    captured = {}
    h = o_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        ref(calib_tokens())
    h.remove()
    acc = HessianAccumulator(64)
    acc.add(captured["x"])
    return solve_layer(o_proj.weight.detach().float(), acc.result(), spec, "o").weight


@pytest.mark.parametrize("chunk_tokens", [10_000, 64])
def test_true_sequential_uses_quantized_predecessors(chunk_tokens):
    """True sequential: the o_proj Hessian comes from the output of the *quantized* q/k/v. With the option off
    (GPTQ's OPT scripts) every layer of the block takes its Hessian from the unquantized block."""
    seq_spec = QuantSpec.build("m", "ldlq", 2, -1, calib=CAL)
    noseq_spec = QuantSpec.build("m", "ldlq", 2, -1, calib=CAL, options={"true_sequential": False})
    seq, noseq = tiny_model("llama"), tiny_model("llama")
    quantize_model(seq, seq_spec, calib_tokens(), chunk_tokens=chunk_tokens, progress=False)
    quantize_model(noseq, noseq_spec, calib_tokens(), chunk_tokens=chunk_tokens, progress=False)
    expected_noseq = _o_proj_from_fp_inputs(noseq_spec)
    assert torch.allclose(noseq.model.layers[0].self_attn.o_proj.weight, expected_noseq, atol=1e-6)
    assert not torch.allclose(seq.model.layers[0].self_attn.o_proj.weight, _o_proj_from_fp_inputs(seq_spec))


def test_ldlq_model_output_closer_than_rtn():
    tokens = calib_tokens(16, 32)
    fp = tiny_model("llama")
    with torch.no_grad():
        ref = fp(tokens).logits
    errs = {}
    for solver in ("rtn", "ldlq"):
        model = tiny_model("llama")
        quantize_model(model, QuantSpec.build("m", solver, 3, -1, calib=CAL), tokens, progress=False)
        with torch.no_grad():
            errs[solver] = float(((model(tokens).logits - ref) ** 2).mean())
    assert errs["ldlq"] < errs["rtn"]


def test_deterministic():
    spec = QuantSpec.build("m", "ldlq", 3, 32, calib=CAL)
    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        quantize_model(model, spec, calib_tokens(), progress=False)
        runs.append(_weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_data_free_rtn_needs_no_tokens():
    model = tiny_model("opt")
    report = quantize_model(model, QuantSpec.build("m", "rtn", 4, 32), None, progress=False)
    assert all("error" not in d for d in report.layers.values())


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match="'gpt2' is not supported; supported model types: .*llama"):
        quantize_model(tiny_model("gpt2"), QuantSpec.build("m", "rtn", 4, -1), None, progress=False)


def test_group_size_that_does_not_divide_is_refused_before_work():
    model = tiny_model("llama")
    before = _weights(model)
    with pytest.raises(ConfigError, match="group size 48 does not divide .* 'model.layers.0.self_attn.q_proj'"):
        quantize_model(model, QuantSpec.build("m", "ldlq", 4, 48, calib=CAL), calib_tokens(), progress=False)
    assert all(torch.equal(before[k], w) for k, w in _weights(model).items())


@pytest.mark.parametrize("name", ["m.rtn.w4g32.blocks1", "m.c4.n16.L32.ldlq.w3g32.blocks1",
                                  "m.c4.n16.L32.lsq.w3g32.blocks1.ep1"])
def test_blocks_quantizes_only_the_first_blocks_and_leaves_the_rest_exactly_fp(name):
    """`blocks` n: blocks 0..n-1 quantized as the full run quantizes them, the rest untouched, in every mode."""
    spec = QuantSpec.parse(name)
    assert spec.opt("blocks") == 1 and spec.short_name() == name
    fp, part, full = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    tokens = calib_tokens() if spec.needs_tokens else None
    report = quantize_model(part, spec, tokens, progress=False)
    quantize_model(full, QuantSpec.parse(name.replace(".blocks1", "")), tokens, progress=False)
    before, after, whole = _weights(fp), _weights(part), _weights(full)
    assert sorted(report.layers) == sorted(f"model.layers.0.{n}" for g in adapter_for(part).subgroups for n in g)
    for key in before:
        if key.startswith("1."):
            assert torch.equal(after[key], before[key]), key  # left unquantized, bit for bit
        else:
            assert not torch.equal(after[key], before[key]) and torch.equal(after[key], whole[key]), key


def test_blocks_beyond_the_model_or_negative_are_refused():
    with pytest.raises(ConfigError, match="the model has only 2 decoder blocks"):
        quantize_model(tiny_model("llama"), QuantSpec.parse("m.rtn.w4g32.blocks3"), progress=False)
    with pytest.raises(ConfigError, match="blocks is a number of decoder blocks"):
        QuantSpec.build("m", "rtn", 4, 32, options={"blocks": -1})
    assert QuantSpec.build("m", "rtn", 4, 32, options={"blocks": 0}).short_name() == "m.rtn.w4g32"
