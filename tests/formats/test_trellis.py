import itertools

import pytest
import torch

from quantlib.errors import ConfigError
from quantlib.formats.trellis import Trellis, code_1mad, code_3inst, tiles_to_weight, weight_to_tiles


def _paths(t: Trellis, n: int):
    """Every state path of n steps: a start state, then kV new bits per step."""
    S, kv = 2 ** t.L, t.kv
    for s0 in range(S):
        for news in itertools.product(range(2 ** kv), repeat=n - 1):
            path = [s0]
            for c in news:
                path.append(((path[-1] << kv) & (S - 1)) | c)
            yield path


def _brute_force(t: Trellis, x: torch.Tensor, overlap=None):
    vals = t.table().double()[:, 0]  # V = 1
    n, P = x.numel(), 2 ** (t.L - t.kv)
    best = float("inf")
    for path in _paths(t, n):
        if overlap is not None and ((path[0] >> t.kv) != overlap or (path[-1] & (P - 1)) != overlap):
            continue
        best = min(best, float((vals[path] - x).square().sum()))
    return best


@pytest.mark.parametrize("L,k,code", [(4, 1, "1mad"), (5, 2, "1mad"), (4, 2, "3inst"), (6, 3, "1mad")])
def test_viterbi_is_the_brute_force_minimum(L, k, code):
    t = Trellis(L, k, 1, code)
    n = 4 if k == 3 else 6
    X = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(L + k))
    states, cost = t.viterbi(X)
    overlap = torch.tensor([1, 2 ** (L - k) - 1, 0])
    cstates, ccost = t.viterbi(X, overlap)
    vals = t.table().double()[:, 0]
    for b in range(3):
        assert cost[b].item() == pytest.approx(_brute_force(t, X[b]), rel=1e-12)
        assert ccost[b].item() == pytest.approx(_brute_force(t, X[b], int(overlap[b])), rel=1e-12)
        for st, c in ((states[b], cost[b]), (cstates[b], ccost[b])):
            # the returned path is a path of the trellis and costs what the search says
            assert all((int(st[i]) & (2 ** (L - k) - 1)) == int(st[i + 1]) >> k for i in range(n - 1))
            assert float((vals[st] - X[b]).square().sum()) == pytest.approx(c.item(), rel=1e-12)
        assert int(cstates[b, 0]) >> k == overlap[b] and int(cstates[b, -1]) & (2 ** (L - k) - 1) == overlap[b]


@pytest.mark.parametrize("L,k,T", [(6, 1, 64), (8, 2, 64), (7, 3, 64), (12, 2, 256)])
def test_tail_biting_codes_decode_to_the_encoded_values(L, k, T):
    t = Trellis(L, k)
    X = torch.randn(20, T, generator=torch.Generator().manual_seed(L))
    symbols, X_hat = t.quantize(X)
    assert symbols.shape == (20, T) and int(symbols.max()) < 2 ** k  # k bits per weight, nothing else
    assert torch.equal(t.decode(symbols), X_hat)
    states = t.states(symbols)
    P = 2 ** (L - k)
    # the decoded path is a trellis path, and its end meets its start (tail-biting)
    assert torch.equal(states[:, :-1] & (P - 1), states[:, 1:] >> k)
    assert torch.equal(states[:, -1] & (P - 1), states[:, 0] >> k)
    # the constrained search can only be worse than the free one, and not by much
    _, free = t.viterbi(X)
    err = (X - X_hat).square().sum(1)
    assert (err >= free - 1e-5).all() and err.sum() < 1.2 * free.sum()


def test_more_state_bits_quantize_better():
    X = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    errs = [float((X - Trellis(L, 2).quantize(X)[1]).square().mean()) for L in (4, 8, 12)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.13  # 2 bits on a Gaussian: scalar Lloyd-Max is 0.1175, QTIP's L=16 about 0.069


def test_codes_are_near_gaussian_and_fixed():
    s = torch.arange(2 ** 16)
    for f in (code_1mad, code_3inst):
        v = f(s)
        assert abs(float(v.mean())) < 0.01 and 0.9 < float(v.std()) < 1.3
    # fixed values: a stored checkpoint decodes only if these never change
    # state 0: 76625530 = 0x0491367A, bytes 0x7A 0x36 0x91 0x04
    assert code_1mad(torch.tensor([0])).item() == pytest.approx((0x7A + 0x36 + 0x91 + 0x04 - 510) / 147.800537109375)
    # state 1: 34038481 + 76625530 = 0x0698994B: bytes 0x4B 0x99 0x98 0x06
    assert code_1mad(torch.tensor([1])).item() == pytest.approx((0x4B + 0x99 + 0x98 + 0x06 - 510) / 147.800537109375)


def test_tiles_round_trip():
    W = torch.arange(32 * 48.0).reshape(32, 48)
    tiles = weight_to_tiles(W, (16, 8))
    assert tiles.shape == (2 * 6, 128) and torch.equal(tiles[1, :8], W[0, 8:16])  # row-major within a tile
    assert torch.equal(tiles_to_weight(tiles, 32, 48, (16, 8)), W)


@pytest.mark.parametrize("L,k,V,code", [(16, 2, 2, "1mad"), (2, 2, 1, "1mad"), (16, 9, 1, "1mad"),
                                         (16, 2, 1, "hyb"), (9, 2, 2, "hyb"), (16, 2, 1, "2mad")])
def test_bad_trellis_is_refused(L, k, V, code):
    with pytest.raises(ConfigError):
        Trellis(L, k, V, code)  # HYB: V = 2 and L > Q = 9


def test_hyb_is_a_two_dimensional_code_from_its_small_table():
    t = Trellis(10, 2, 2, "hyb", Q=6)
    table, lut = t.table(), t.lut
    assert table.shape == (2 ** 10, 2) and lut.shape == (64, 2)
    assert torch.equal(lut.half().float(), lut)  # float16-exact: the stored table is what encoding used
    # every state's point is a table entry, up to the sign of its first coordinate
    points = {(abs(a), b) for a, b in lut.tolist()}
    assert {(abs(a), b) for a, b in table.tolist()} <= points
    assert len({(a, b) for a, b in table.tolist()}) > len(points)  # the sign bit adds points
    assert 0.85 < float(table.std()) < 1.05  # near unit variance, as the computed codes
    # Viterbi over V = 2 is still exact: a brute force check on a short sequence
    small = Trellis(5, 1, 2, "hyb", Q=3)
    X = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, cost = small.viterbi(X)
    vals = small.table().double()
    for b in range(2):
        best = min(float((vals[path] - X[b].view(3, 2)).square().sum()) for path in _paths(small, 3))
        assert cost[b].item() == pytest.approx(best, rel=1e-12)
    symbols, X_hat = small.quantize(X)
    assert torch.equal(small.decode(symbols), X_hat)
