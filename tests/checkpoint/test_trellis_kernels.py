"""quantlib.kernels for the `trellis` format (QTIP): the torch reference against TrellisQuantized.dequantize (bit for
bit), the Triton kernel against the torch reference (bit for bit in the transformed domain, hence for the whole
weight; the GEMV within float32 round-off), for every (L, k, V, code) the format offers on small shapes; the
dispatcher's checks; trellis layers of a loaded checkpoint computing through `matmul_trellis`.

Triton runs in its interpreter without CUDA: like test_kernels.py, this module sets TRITON_INTERPRET before anything
imports triton and clears it after (run it on its own or after test_kernels.py; an earlier import of triton without
the variable makes the Triton tests skip, saying why).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

from quantlib.formats.trellis import Trellis, TrellisQuantized, code_table, hyb_table
from quantlib.formats.uniform import pack_codes
from quantlib.kernels import (
    dequant_trellis,
    gemv_trellis,
    matmul_trellis,
    torch_ops,
    triton_ops,
    triton_trellis,
)

if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]

TILE = (4, 8)  # 32 weights per sequence: k T >= L for every L <= 24 at k >= 1 (with V = 2: 16 steps)
SEGMENTS = (8, 4)  # two segments (a stacked solve), 3 row tiles
D_IN = 16  # 2 column tiles


def _q(L: int) -> int:
    return min(9, L - 2)  # HYB's table size: QTIP's Q = 9 where L allows


def _table(Q: int, seed: int = 0) -> torch.Tensor:
    """A float16-exact (2^Q, 2) table (any table decodes; the default's k-means would cost seconds per Q)."""
    return torch.randn(2 ** Q, 2, generator=torch.Generator().manual_seed(seed)).half().float()


# Every (L, k, code) the format offers at L in {8, 10, 12, 16}, k in {1..4}: 1MAD and 3INST with V = 1, HYB with
# V = 2 (k V <= 8 and k V < L).
COMBOS = [(L, k, code) for L, k, code in itertools.product((8, 10, 12, 16), (1, 2, 3, 4), ("1mad", "3inst", "hyb"))
          if k * (2 if code == "hyb" else 1) < L]


def make_rep(L, k, code, segments=SEGMENTS, d_in=D_IN, tile=TILE, seed=0) -> TrellisQuantized:
    """A layer of random symbols: every symbol stream is a valid tail-biting path (each window is a state)."""
    gen = torch.Generator().manual_seed(seed + 100 * L + 10 * k)
    V = 2 if code == "hyb" else 1
    trellis = Trellis(L, k, V, code, _q(L), _table(_q(L), seed) if code == "hyb" else None)
    n_seq = sum(segments) // tile[0] * (d_in // tile[1])
    symbols = torch.randint(0, 2 ** (k * V), (n_seq, tile[0] * tile[1] // V), generator=gen).to(torch.uint8)
    scales = torch.rand(len(segments), generator=gen) + 0.25
    seeds = torch.randint(0, 2 ** 31 - 1, (len(segments), 2), generator=gen)
    return TrellisQuantized(symbols, scales, seeds, torch.tensor(segments), d_in, trellis, tile)


def args_of(rep: TrellisQuantized) -> tuple[tuple, dict]:
    """(positional kernel arguments without d_in, keyword arguments) from the checkpoint's tensors and metadata."""
    t, m = rep.to_tensors(), rep.meta()
    return (t["trellis"], t["scales"], t["seeds"], t["segments"], m["bits"], m["L"], m["V"], m["code"],
            tuple(m["tile"])), {"tlut": t.get("tlut")}


@pytest.fixture
def device(monkeypatch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not triton_ops.LIBRARY_INTERPRETED:
        pytest.skip("no CUDA, and Triton's interpreter is off: TRITON_INTERPRET was not 1 when triton was imported "
                    "(Triton reads it at import); run this file on its own, or export TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def _reference(rep, pos, kw, d_in, device):
    """The torch reference's weight on `device`: TrellisQuantized.dequantize() bit for bit on the CPU; on CUDA the
    float64 transform runs on the GPU (another summation order: within 1e-6)."""
    ref = dequant_trellis(*pos, d_in, **kw, backend="torch")
    if device.type == "cpu":
        assert torch.equal(ref, rep.dequantize())
    else:
        torch.testing.assert_close(ref.cpu(), rep.dequantize(), rtol=1e-6, atol=1e-6)
    return ref


def _to(pos, kw, device):
    pos = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in pos)
    return pos, {k: None if v is None else v.to(device) for k, v in kw.items()}


# ---------------------------------------------------------------------------------------------------------------- #
# The torch reference against the format


@pytest.mark.parametrize("L", [8, 10, 12, 16])
def test_reference_codes_are_the_formats(L):
    s = torch.arange(2 ** L)
    assert torch.equal(torch_ops.trellis_code_1mad(s), code_table("1mad", L)[:, 0])
    assert torch.equal(torch_ops.trellis_code_3inst(s), code_table("3inst", L)[:, 0])
    lut = _table(_q(L)).half()
    assert torch.equal(torch_ops.trellis_code_hyb(s, L, lut), hyb_table(L, _q(L), lut.float()))


@pytest.mark.parametrize("L,k,code", COMBOS)
def test_reference_is_the_formats_dequantize_bit_for_bit(L, k, code):
    rep = make_rep(L, k, code)
    pos, kw = args_of(rep)
    assert torch.equal(torch_ops.trellis_states(pos[0], L, k * rep.trellis.V, rep.symbols.shape[1]),
                       rep.trellis.states(rep.symbols))
    ref = rep.dequantize()
    w = dequant_trellis(*pos, D_IN, **kw, backend="torch")
    assert w.dtype == torch.float32 and torch.equal(w, ref)
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gemv_trellis(x, *pos, **kw, backend="torch"), x @ ref.T, rtol=1e-5, atol=1e-5)


def test_reference_on_a_viterbi_encoded_layer_with_qtips_tile():
    """A layer as the solver writes it: 16 x 16 tiles of Viterbi-encoded sequences, read back from its tensors."""
    tr = Trellis(8, 2, 1, "1mad")
    W = torch.randn(32, 32, generator=torch.Generator().manual_seed(3))
    symbols, _ = tr.quantize(W.reshape(-1, 256))
    rep = TrellisQuantized(symbols, torch.tensor([0.9]), torch.tensor([[11, 12]]), torch.tensor([32]), 32, tr, (16, 16))
    rep = TrellisQuantized.from_tensors(rep.meta(), rep.to_tensors())
    pos, kw = args_of(rep)
    assert torch.equal(dequant_trellis(*pos, 32, **kw, backend="torch"), rep.dequantize())


# ---------------------------------------------------------------------------------------------------------------- #
# Triton against the torch reference


@pytest.mark.parametrize("L,k,code", COMBOS)
def test_triton_is_the_reference(L, k, code, device):
    rep = make_rep(L, k, code)
    pos, kw = _to(*args_of(rep), device)
    wt_ref = dequant_trellis(*pos, D_IN, **kw, backend="torch", transformed=True)
    wt = dequant_trellis(*pos, D_IN, **kw, backend="triton", transformed=True)
    assert torch.equal(wt, wt_ref)  # the transformed-domain weight: bit for bit
    ref = _reference(rep, pos, kw, D_IN, device)
    assert torch.equal(dequant_trellis(*pos, D_IN, **kw, backend="triton"), ref)
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(2)).to(device)
    y = gemv_trellis(x, *pos, **kw, backend="triton")  # A^T (W_t (B x)) in float32
    torch.testing.assert_close(y, (x.double() @ ref.double().T).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("L,k", [(20, 1), (24, 1), (24, 3)])
def test_triton_long_states(L, k, device):
    """The widest windows the format allows (M k V up to 31 bits): kernel against the torch reference, built
    directly from packed symbols (the format's state tables would hold 2^L entries)."""
    gen = torch.Generator().manual_seed(L + k)
    symbols = torch.randint(0, 2 ** k, (4, 32), generator=gen)
    pos = (pack_codes(symbols, k), torch.tensor([0.5]), torch.tensor([[1, 2]]), torch.tensor([8]), k, L, 1, "3inst",
           TILE)
    pos, _ = _to(pos, {}, device)
    for code in ("1mad", "3inst"):
        p = pos[:7] + (code,) + pos[8:]
        assert torch.equal(dequant_trellis(*p, D_IN, backend="triton", transformed=True),
                           dequant_trellis(*p, D_IN, backend="torch", transformed=True))


def test_triton_small_blocks_and_float16(device):
    """Many programs, several d_in iterations, partial blocks; float16 activations."""
    rep = make_rep(12, 2, "hyb", segments=(12, 8), d_in=48)
    pos, kw = _to(*args_of(rep), device)
    t = torch_ops.trellis_transforms(pos[2].tolist(), [12, 8], 48)
    wt = triton_trellis.dequant_trellis_transformed(pos[0], pos[1].float(), [12, 8], 2, 12, 2, "hyb", TILE, 48,
                                                kw["tlut"], block_r=8, block_k=16)
    assert torch.equal(wt, dequant_trellis(*pos, 48, **kw, backend="torch", transformed=True))
    ref = _reference(rep, pos, kw, 48, device)
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(4)).to(device)
    y = triton_trellis.gemv_trellis(x, pos[0], pos[1].float(), t, [12, 8], 2, 12, 2, "hyb", TILE, kw["tlut"],
                                block_r=8, block_k=16)
    torch.testing.assert_close(y, x @ ref.T, rtol=1e-5, atol=1e-5)
    xh = x.half()
    yh = gemv_trellis(xh, *pos, **kw, backend="triton")
    assert yh.dtype == torch.float16
    torch.testing.assert_close(yh.float(), xh.float() @ ref.T, rtol=1e-2, atol=1e-2)


def test_matmul_routes(device):
    rep = make_rep(10, 2, "1mad")
    pos, kw = _to(*args_of(rep), device)
    ref = _reference(rep, pos, kw, D_IN, device)
    gen = torch.Generator().manual_seed(5)
    many = torch.randn(3, 5, D_IN, generator=gen).to(device)  # 15 rows: dequantize, then x @ w.T
    assert torch.equal(matmul_trellis(many, *pos, **kw, backend="triton"), many @ ref.T)
    few = torch.randn(2, 3, D_IN, generator=gen).to(device)  # 6 rows: the GEMV
    y = matmul_trellis(few, *pos, **kw, backend="triton")
    assert y.shape == (2, 3, sum(SEGMENTS))
    assert torch.equal(y.reshape(6, -1), gemv_trellis(few.reshape(6, D_IN), *pos, **kw, backend="triton"))
    torch.testing.assert_close(y, few @ ref.T, rtol=1e-5, atol=1e-5)


def test_matmul_torch_is_dequant_then_matmul():
    rep = make_rep(8, 1, "3inst")
    pos, kw = args_of(rep)
    x = torch.randn(2, 9, D_IN, generator=torch.Generator().manual_seed(6))
    assert torch.equal(matmul_trellis(x, *pos, **kw, backend="torch"), x @ rep.dequantize().T)
    assert matmul_trellis(torch.zeros(0, D_IN), *pos, **kw, backend="torch").shape == (0, sum(SEGMENTS))


# ---------------------------------------------------------------------------------------------------------------- #
# Bad inputs: ValueError naming the tensor or argument, before any work

_REP = make_rep(10, 2, "hyb")
_POS, _KW = args_of(_REP)
_X = torch.randn(2, D_IN)


def _call(fn=dequant_trellis, **change):
    names = ("trellis", "scales", "seeds", "segments", "bits", "L", "V", "code", "tile")
    a = dict(zip(names, _POS), **_KW)
    a.update(change)
    x = a.pop("x", _X)
    pos = [a.pop(n) for n in names]
    if fn is dequant_trellis:
        return lambda: fn(*pos, a.pop("d_in", D_IN), **a)
    return lambda: fn(x, *pos, **a)


_BAD = [
    ("trellis must be an int32", _call(trellis=_POS[0].long())),
    (r"trellis must have shape \(6, 2\)", _call(trellis=_POS[0][:, :1])),
    ("trellis must have shape", _call(trellis=_POS[0][:-1])),
    ("scales must be a floating", _call(scales=_POS[1].int())),
    (r"scales must have shape \(2,\)", _call(scales=_POS[1][:1])),
    ("seeds must be an integer", _call(seeds=_POS[2].float())),
    ("seeds must have shape", _call(seeds=_POS[2][:, :1])),
    ("segments must be an integer", _call(segments=_POS[3].float())),
    ("segments .* multiples of the tile's rows 4", _call(segments=torch.tensor([6, 6]))),
    ("segments: 92 has no Hadamard", _call(segments=torch.tensor([92]), scales=_POS[1][:1], seeds=_POS[2][:1])),
    ("d_in: 184 has no Hadamard", _call(d_in=184)),
    ("tlut .* required", _call(tlut=None)),
    (r"tlut must have shape \(2\^Q, 2\)", _call(tlut=_KW["tlut"][:100])),
    ("tlut is only for the code 'hyb'", _call(code="1mad", V=1)),
    ("code must be one of", _call(code="e8p")),
    ("V must be 2", _call(V=1)),
    ("bits must be an integer in 1..4", _call(bits=5)),
    ("L .* above k V = 4", _call(L=4)),
    ("L .* at most 24", _call(L=25)),
    ("tile must be two positive integers", _call(tile=(4,))),
    ("tile 2x2 holds 4 weights", _call(tile=(2, 2))),
    ("d_in 12 is not a multiple", _call(d_in=12)),
    ("d_in must be a positive", _call(d_in=0)),
    ("x has 9 rows", _call(gemv_trellis, x=torch.randn(9, D_IN))),
    ("x must be 2-D", _call(gemv_trellis, x=torch.randn(1, 2, D_IN))),
    ("x must be a floating", _call(matmul_trellis, x=_X.int())),
    ("trellis must have shape", _call(matmul_trellis, x=torch.randn(2, 32))),
    ("unknown backend", _call(backend="cuda")),
    ("scales on meta", _call(scales=_POS[1].to("meta"))),
]


@pytest.mark.parametrize("match,call", _BAD, ids=[f"{i}-{m[:24]}" for i, (m, _) in enumerate(_BAD)])
def test_bad_inputs(match, call):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------- #
# Trellis layers of a model computing through the kernels


def test_trellis_layers_through_packed_linear(device):
    from quantlib.checkpoint.pack.load import PackedLinear, use_trellis_kernels

    rep = make_rep(12, 2, "hyb")
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, sum(SEGMENTS)))
    with torch.no_grad():
        model[0].weight.copy_(rep.dequantize())
    model = model.to(device)
    bias = model[0].bias.detach().clone()
    assert use_trellis_kernels(model, {"0": rep}, backend="triton") == ["0"]
    layer = model[0]
    assert isinstance(layer, PackedLinear) and layer.kind == "trellis"
    ref = _reference(rep, *_to(*args_of(rep), device), D_IN, device)
    assert torch.equal(layer.dequantize(), ref)
    x = torch.randn(1, 3, D_IN, generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ ref.T + bias, rtol=1e-5, atol=1e-5)
    # the scales and HYB's table are kept as raw bits: casting the model does not round them
    model.to(torch.bfloat16)
    assert torch.equal(layer.dequantize(), ref)
    assert "kind=trellis" in repr(layer)


def test_load_quantized_with_trellis_kernels(tmp_path):
    """A QTIP-quantized tiny model saved and loaded with `trellis_backend`: every decoder linear is a PackedLinear
    of kind trellis, and the logits are the dequantized model's."""
    from conftest import build_tokenizer, calib_tokens, tiny_model

    from quantlib.catalog.spec import QuantSpec
    from quantlib.checkpoint.pack.load import PackedLinear
    from quantlib.checkpoint.reader import load_quantized
    from quantlib.checkpoint.writer import save_quantized
    from quantlib.runner.walk import quantize_model

    build_tokenizer(tmp_path / "tok")
    spec = QuantSpec.parse("m.c4.n8.L32.qtip.w2.1mad.tl8")
    model = tiny_model("llama")
    report = quantize_model(model, spec, calib_tokens(8), progress=False)
    save_quantized(model, spec, report, tmp_path / "q", tmp_path / "tok")
    plain = load_quantized(tmp_path / "q")
    fast = load_quantized(tmp_path / "q", trellis_backend="torch")
    packed = [m for m in fast.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.kind == "trellis" for m in packed)
    assert len(packed) == len(report.reps)
    x = calib_tokens(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, plain(x).logits, rtol=1e-5, atol=1e-5)
