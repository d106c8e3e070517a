"""The Hessian's capture and LDL factorisation made lean in memory (a 70B down projection's Hessian is 3.3 GB in
float32): the same bits as the plain expressions they replace."""

from __future__ import annotations

import pytest
import torch

from quantlib.stats import hessian
from quantlib.stats.hessian import HessianAccumulator, PreparedHessian, add_damping, gram, mean_float32


def _gram_hessian(d: int, seed: int) -> torch.Tensor:
    """A float32 Gram matrix as captures make it: not exactly symmetric below 512 columns (one matmul)."""
    x = torch.randn(d + 40, d, generator=torch.Generator().manual_seed(seed))
    return x.T @ x / d


@pytest.mark.parametrize("d", [5, 64, 513, 1100])
@pytest.mark.parametrize("act_order", [False, True])
def test_ldl_is_the_flipped_cholesky_bit_for_bit(d, act_order):
    H = _gram_hessian(d, d)
    prep = PreparedHessian(H, 0.01, act_order, "l")
    U, D = prep.ldl()
    L = torch.linalg.cholesky(add_damping(H[prep.perm][:, prep.perm], 0.01).flip(0, 1)).flip(0, 1)
    diag = torch.diagonal(L)
    assert torch.equal(U, L / diag) and torch.equal(D, diag * diag)
    assert U.stride() == L.stride()  # column-major, as before: products with U round by layout
    # slices of a few rows (odd, not dividing d): the gather, the reversal and the transpose's seams
    C, info = hessian._reversed_cholesky(H, prep.perm, 0.01, rows=7)
    assert int(info) == 0 and torch.equal(C, L)


def test_an_asymmetric_hessian_is_read_from_the_same_triangle():
    H = _gram_hessian(48, 1)
    H[3, 17] += 1e-3  # the factorisations read the lower triangle of the flipped matrix, as before
    prep = PreparedHessian(H, 0.01, True, "l")
    L = torch.linalg.cholesky(add_damping(H[prep.perm][:, prep.perm], 0.01).flip(0, 1)).flip(0, 1)
    assert torch.equal(prep.ldl()[0], L / torch.diagonal(L))


def test_a_failed_factorisation_is_rebuilt_with_more_damping():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    H = x.T @ x  # rank 16 of 32, then indefinite: 1 % damping is not enough
    H = H - 0.02 * torch.diagonal(H).mean() * torch.eye(32)
    prep = PreparedHessian(H, 0.01, False, "l")
    U, D = prep.ldl()
    assert prep.damp > 0.01
    L = torch.linalg.cholesky(add_damping(H, prep.damp).flip(0, 1)).flip(0, 1)
    assert torch.equal(U, L / torch.diagonal(L))


@pytest.mark.parametrize("d", [5, 512, 1100])
def test_capture_into_the_sum_equals_adding_the_product(d):
    acc, total = HessianAccumulator(d), torch.zeros(d, d, dtype=torch.float64)
    for c in range(3):
        x = torch.randn(64, d, generator=torch.Generator().manual_seed(10 * d + c))
        acc.add(x)
        total += gram(x)
    assert torch.equal(acc.sum, total)
    assert torch.equal(acc.result(), (total / 192).float())
    stacked = torch.randn(3, 20, 20, dtype=torch.float64)
    assert torch.equal(mean_float32(stacked, 7, rows=6), (stacked / 7).float())


def test_the_damping_sums_the_diagonal_as_the_permuted_matrix_did():
    """torch sums a contiguous vector in another order than a matrix's (strided) diagonal: the damping of a
    permuted Hessian must be mean(diag) as `add_damping` of the permuted matrix computes it, to the bit."""
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        d = int(torch.randint(2, 700, (1,), generator=g))
        H = torch.rand(d, d, generator=g) * 100
        perm = torch.randperm(d, generator=g)
        assert torch.equal(hessian._permuted_diagonal_mean(H, perm), torch.diagonal(H[perm][:, perm]).mean())
