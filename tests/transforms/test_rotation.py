"""Rotations (quantlib.transforms.rotation) and the quantized forward (quantlib.transforms.activations): the
rotated full-precision model computes the same function, each rotation is orthogonal, the online Hadamards are
exact, the activation quantizer equals a brute-force nearest-grid-point reference, and the KV-quantized attention
equals attention over the dequantized cache."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_model

from quantlib.errors import ConfigError, UnsupportedArchitecture
from quantlib.transforms import activations as A
from quantlib.transforms import rotation as R
from quantlib.transforms.hadamard import hadamard_matrix


def _model(family="llama", tied=False, dtype=torch.float64):
    model = tiny_model(family).to(dtype)
    g = torch.Generator().manual_seed(1)
    # random norm gains: folding them is only tested when they are not all 1
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = (0.5 + torch.rand(p.shape, generator=g)).to(dtype)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


X = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False)])
def test_rotated_fp_model_keeps_logits(family, tied):
    # float64 weights, but transformers' RMSNorm normalises in float32: equal to 1e-6 of the largest logit (round-off
    # is ~1e-7; a wrong side or transpose of any rotation is off by O(1))
    model = _model(family, tied)
    if family == "qwen2":  # q/k/v biases: make them non-zero
        for layer in model.model.layers:
            for n in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, n).bias.data.normal_()
    ref = _logits(model, X)
    Q1, Q2s = R.quarot_rotations(model, seed=7)
    R.rotate_model(model, Q1, Q2s)
    A.install(model, A.ForwardQuant(rotated=True))
    out = _logits(model, X)
    assert (out - ref).abs().max() < 1e-6 * ref.abs().max()
    # the norms hold no gain any more, the head is its own weight, the stream really is rotated
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "layernorm" in n or n == "model.norm.weight")
    # Qwen3's per-head query/key norms keep their (random) gains: R1 does not reach them
    assert all(not torch.all(p == 1) for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    # the online Hadamards are needed: without them (R4 weight side folded) the function changes
    A.uninstall(model)
    assert (_logits(model, X) - ref).abs().max() > 1e-3


def test_quarot_o_proj_hadamard_keeps_logits_and_mixes_heads():
    # QuaRot's online Hadamard on o_proj's input: o_proj's weight rotated on its input side, the same transform online
    model = _model()
    ref = _logits(model, X)
    R.rotate_model(model, *R.quarot_rotations(model, seed=3))
    before = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    R.rotate_o_inputs(model)
    assert torch.allclose(model.model.layers[0].self_attn.o_proj.weight,
                          before @ hadamard_matrix(before.shape[1]).T, atol=1e-12)
    A.install(model, A.ForwardQuant(rotated=True, o_rotated=True))
    seen = {}
    o_proj = model.model.layers[0].self_attn.o_proj
    o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("rotated", a[0]), prepend=True)
    o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("online", a[0]))
    out = _logits(model, X)
    assert (out - ref).abs().max() < 1e-6 * ref.abs().max()
    H = hadamard_matrix(seen["rotated"].shape[-1])
    assert torch.allclose(seen["online"], seen["rotated"] @ H.T, atol=1e-12)
    # without the online half the function changes
    A.install(model, A.ForwardQuant(rotated=True))
    assert (_logits(model, X) - ref).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="o_rotated"):
        A.ForwardQuant(o_rotated=True)


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", False)])
def test_in_place_rotation_equals_the_dict_path_bit_for_bit(family, tied):
    # rotate_model writes each product back before making the next; SpinQuant's differentiable path builds them all
    # in a dict (rotated_state): one formula, so the same bits, and the dict path leaves its input as it was
    model = _model(family, tied, dtype=torch.float32)
    for layer in model.model.layers if family == "qwen2" else []:
        layer.self_attn.v_proj.bias.data.normal_()
    ref = copy.deepcopy(model)
    Q1, Q2s = R.quarot_rotations(model, seed=5)
    R.rotate_model(model, Q1, Q2s)
    R.fold_norms(ref)
    params = R.rotation_params(ref)
    base = {n: p.detach().clone() for n, p in params.items()}
    state = R.rotated_state(ref, base, Q1.double(), [Q.double() for Q in Q2s])
    assert state.keys() == base.keys() and all(torch.equal(base[n], p) for n, p in params.items())
    for n, p in params.items():
        p.data = state[n].to(p.dtype)
    R.rotate_down_inputs(ref)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in got)


def test_float32_tolerance():
    model = _model(dtype=torch.float32)
    ref = _logits(model, X)
    R.rotate_model(model, *R.quarot_rotations(model, seed=0))
    A.install(model, A.ForwardQuant(rotated=True))
    assert (_logits(model, X) - ref).abs().max() < 1e-5 * ref.abs().max()


def test_rotations_are_orthogonal_random_hadamards():
    model = _model()
    Q1, Q2s = R.quarot_rotations(model, seed=3)
    for Q in [Q1, *Q2s]:
        n = Q.shape[0]
        assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=Q.dtype), atol=1e-12)
        assert torch.allclose(Q.abs(), torch.full_like(Q, 1 / math.sqrt(n)))  # a Hadamard, not e.g. the identity
    assert not torch.equal(Q2s[0], Q2s[1])  # one R2 per layer
    Q1b, _ = R.quarot_rotations(model, seed=3)
    assert torch.equal(Q1, Q1b)  # seeded
    assert not torch.equal(Q1, R.quarot_rotations(model, seed=4)[0])


def test_fold_norms_alone_keeps_logits():
    model = _model(tied=True)
    ref = _logits(model, X)
    R.fold_norms(model)
    assert (_logits(model, X) - ref).abs().max() < 1e-9 * ref.abs().max()


def test_unsupported_architecture_refused():
    with pytest.raises(UnsupportedArchitecture, match="gpt_neox"):
        R.rotate_model(tiny_model("gpt_neox"), torch.eye(64), [])
    with pytest.raises(UnsupportedArchitecture, match="gemma3_text.*sublayers"):
        R.rotate_model(tiny_model("gemma3_text"), torch.eye(64), [])
    with pytest.raises(UnsupportedArchitecture):
        A.install(tiny_model("gpt_neox"), A.ForwardQuant(act_bits=4))


def test_online_r3_keeps_scores_and_rotates_keys():
    fq = A.ForwardQuant(rotated=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q2, k2, v2 = A.attention_inputs(fq, q, k, v)
    assert torch.allclose(q2 @ k2.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-12)
    H = hadamard_matrix(16)
    assert torch.allclose(k2, k @ H.T, atol=1e-12) and torch.equal(v2, v)


def _brute_force(x, bits, sym, clip, group):
    """Each token's (group's) grid listed explicitly; every entry goes to its nearest grid point."""
    out = torch.empty_like(x)
    rows = x.reshape(-1, group)
    res = out.reshape(-1, group)
    for i, r in enumerate(rows):
        if sym:
            top = 2 ** (bits - 1) - 1
            scale = max(r.abs().max().item() * clip / top, 1e-8)
            grid = torch.arange(-top - 1, top + 1, dtype=x.dtype) * scale
        else:
            lo, hi = min(r.min().item(), 0.0) * clip, max(r.max().item(), 0.0) * clip
            scale = max((hi - lo) / (2 ** bits - 1), 1e-8)
            zero = round(-lo / scale)
            grid = (torch.arange(2 ** bits, dtype=x.dtype) - zero) * scale
        res[i] = grid[(r[:, None] - grid[None, :]).abs().argmin(1)]
    return out


@pytest.mark.parametrize("bits,sym,clip,group", [(4, False, 1.0, 0), (4, False, 0.9, 0), (4, True, 0.9, 0),
                                                 (8, False, 1.0, 0), (3, True, 1.0, 8), (4, False, 0.95, 16)])
def test_fake_quant_matches_brute_force(bits, sym, clip, group):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 7, 32, generator=g, dtype=torch.float64) * torch.rand(3, 7, 1, generator=g, dtype=torch.float64)
    x[0, 0] = x[0, 0].abs()  # a token with no negative entry: the asymmetric range still holds 0
    got = A.fake_quant(x, bits, sym, clip, group)
    ref = _brute_force(x, bits, sym, clip, group or 32)
    assert torch.allclose(got, ref, atol=1e-12)
    assert all(len(torch.unique(part)) <= 2 ** bits for part in got[1, 2].reshape(-1, group or 32))
    assert torch.equal(A.fake_quant(torch.zeros(2, 8), 4), torch.zeros(2, 8))  # zero tokens stay zero


def test_fake_quant_passes_gradients_straight_through():
    x = torch.randn(4, 16, requires_grad=True)
    A.fake_quant(x, 4).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_bad_settings_refused():
    with pytest.raises(ConfigError):
        A.ForwardQuant(act_bits=1)
    with pytest.raises(ConfigError):
        A.ForwardQuant(kv_clip=0)
    with pytest.raises(ConfigError, match="divide"):
        A.fake_quant(torch.randn(2, 10), 4, group=4)


@pytest.mark.parametrize("rotated,group", [(True, 0), (False, 8)])
def test_kv_quantized_attention_equals_dequantized_cache_reference(rotated, group):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _model()
    fq = A.install(model, A.ForwardQuant(kv_bits=4, kv_group=group, rotated=rotated))
    attn = model.model.layers[0].self_attn  # 4 heads sharing 2 KV heads
    g = torch.Generator().manual_seed(2)
    T = 6
    q = torch.randn(1, 4, T, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, T, 16, generator=g, dtype=torch.float64) for _ in range(2))
    out, _ = ALL_ATTENTION_FUNCTIONS["quantlib_sdpa"](attn, q, k, v, None, scaling=attn.scaling)
    # reference: the cache dequantized first (brute-force quantizer), R3 as a dense matrix, plain causal softmax
    H = hadamard_matrix(16) if rotated else torch.eye(16, dtype=torch.float64)
    kq = _brute_force(k @ H.T, 4, False, 1.0, group or 16)
    vq = _brute_force(v, 4, False, 1.0, group or 16)
    kq, vq = kq.repeat_interleave(2, dim=1), vq.repeat_interleave(2, dim=1)
    scores = (q @ H.T) @ kq.transpose(-1, -2) * attn.scaling
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    ref = (scores.softmax(-1) @ vq).transpose(1, 2)
    assert fq.kv_bits == 4
    assert torch.allclose(out, ref, atol=1e-10)
    # and the quantization is really applied: the unquantized cache gives another result
    plain = (((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * attn.scaling).masked_fill(
        torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1))
    assert (plain.transpose(1, 2) - out).abs().max() > 1e-3


def test_activation_quantized_linear_inputs():
    # every decoder linear sees its input fake-quantized per token (and down_proj its rotated input)
    model = _model()
    R.rotate_model(model, *R.quarot_rotations(model, seed=0))
    A.install(model, A.ForwardQuant(act_bits=4, rotated=True))
    seen = {}
    for name, lin in model.model.layers[0].named_modules():
        if isinstance(lin, torch.nn.Linear):
            lin.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
    _logits(model, X)
    assert len(seen) == 7
    for name, x in seen.items():
        per_token = [len(torch.unique(t)) for t in x.reshape(-1, x.shape[-1])]
        assert max(per_token) <= 16, name
