"""ALTERNATING on groups whose sign planes coincide (a constant group; one outlier among equal weights, as in a row
of Gemma 3 270M's down_proj): its least-squares systems are singular but for the ridge, which must survive."""

import pytest
import torch

from quantlib.solvers.alternating import fit, to_bcq


@pytest.mark.parametrize("x", [torch.full((1, 64), 0.02), torch.tensor([[-0.3] + [0.01] * 63]),
                               torch.tensor([[-0.3] + [0.01, 0.012] * 31 + [0.01]])],
                         ids=["constant", "outlier", "outlier-two-values"])
def test_degenerate_groups_are_fitted(x):
    alphas, index, o = fit(x, 3, 15, True)
    x_hat = to_bcq(alphas, index, o, 1, 64).dequantize().float()
    assert torch.isfinite(x_hat).all()
    assert (x_hat - x).abs().max() < 0.01  # these take at most three distinct values: near exact at 3 bits
