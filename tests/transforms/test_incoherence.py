import pytest
import torch

from quantlib.errors import ConfigError
from quantlib.transforms.incoherence import Incoherence, layer_seed


def _problem(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize("m,n", [(48, 64), (12, 36)])
def test_transform_is_orthogonal_and_undone_exactly(m, n):
    W, _ = _problem(m, n)
    inc = Incoherence.seeded(m, n, seed=5)
    Wt = inc.weight(W)
    assert torch.allclose(inc.unweight(Wt), W, atol=1e-12)
    assert torch.allclose(Wt.norm(), W.norm())  # Frobenius norm kept: orthogonal on both sides
    # both sides are genuinely mixed, not just sign flips
    assert not torch.allclose(Wt.abs(), W.abs())
    # y = W x = A^T (W' x')
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(x @ W.T, inc._out.inverse(inc.inputs(x) @ Wt.T, dim=-1), atol=1e-12)


def test_layer_objective_is_invariant():
    W, H = _problem(48, 64, seed=1)
    inc = Incoherence.seeded(48, 64, seed=2)
    Wt, Ht = inc.weight(W), inc.hessian(H)
    Et = torch.randn_like(Wt) * 0.1  # any error in the transformed domain
    E = W - inc.unweight(Wt - Et)
    assert torch.allclose(torch.trace(E @ H @ E.T), torch.trace(Et @ Ht @ Et.T), rtol=1e-10)
    assert torch.allclose(torch.trace(Ht), torch.trace(H))  # so a relative damping is unchanged too


def test_incoherence_spreads_an_outlier():
    W = torch.zeros(64, 64, dtype=torch.float64)
    W[3, 7] = 100.0
    Wt = Incoherence.seeded(64, 64, 0).weight(W)
    assert Wt.abs().max() == pytest.approx(100.0 / 64)  # one entry becomes 64 x 64 entries of equal size


def test_seeds_give_independent_signs_and_sizes_are_checked():
    a, b = Incoherence.seeded(64, 64, 0), Incoherence.seeded(64, 64, 1)
    assert not torch.equal(a._in.signs, b._in.signs) and not torch.equal(a._in.signs, a._out.signs)
    assert layer_seed("model.layers.0.q_proj", 0) != layer_seed("model.layers.1.q_proj", 0)
    with pytest.raises(ConfigError):
        Incoherence.seeded(48, 64, 0).weight(torch.zeros(64, 48))
    with pytest.raises(ConfigError):
        Incoherence.seeded(48, 52, 0)  # 52 = 13 x 4: no Hadamard construction here
