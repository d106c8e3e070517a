import pytest
import torch

from quantlib.errors import ConfigError
from quantlib.transforms.hadamard import RandomHadamard, hadamard, hadamard_matrix, hadamard_split

# layer sizes of the offline model (576, 1536), Gemma 3 270M (640), Llama-2 (4096, 11008), Llama-3 (14336), heads
SIZES = [1, 2, 4, 12, 20, 28, 36, 64, 576, 640, 1536, 11008, 14336]


@pytest.mark.parametrize("n", [2, 4, 12, 20, 28, 36, 64, 576, 640, 1536])
def test_matrix_is_an_orthonormal_hadamard_matrix(n):
    H = hadamard_matrix(n)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(H.abs(), torch.full_like(H, n ** -0.5), atol=1e-12)  # every entry +-1/sqrt(n)


@pytest.mark.parametrize("n", SIZES)
def test_split_covers_llm_sizes(n):
    m, p = hadamard_split(n)
    assert m * p == n and p & (p - 1) == 0 and (m <= 2 or m % 4 == 0)


@pytest.mark.parametrize("n", [12, 64, 576, 1536])
def test_fast_transform_equals_the_dense_matrix_and_is_undone(n):
    x = torch.randn(5, 3, n, dtype=torch.float64)
    H = hadamard_matrix(n)
    y = hadamard(x)
    assert torch.allclose(y, x @ H.T, atol=1e-10)
    assert torch.allclose(hadamard(x, transpose=True), x @ H, atol=1e-10)
    assert torch.allclose(hadamard(y, transpose=True), x, atol=1e-10)
    # along another dimension
    assert torch.allclose(hadamard(x.transpose(1, 2), dim=1).transpose(1, 2), y, atol=1e-10)


def test_random_hadamard_is_seeded_orthogonal_and_inverted():
    R = RandomHadamard(576, seed=3)
    x = torch.randn(4, 576, dtype=torch.float64)
    assert torch.allclose(R(x), x @ R.matrix().T, atol=1e-10)
    assert torch.allclose(R.inverse(R(x)), x, atol=1e-10)
    assert torch.equal(R.signs, RandomHadamard(576, seed=3).signs)
    assert not torch.equal(R.signs, RandomHadamard(576, seed=4).signs)


def test_impossible_size_is_refused_naming_it():
    with pytest.raises(ConfigError, match="order 172"):
        hadamard_split(172)  # 172 = 43 x 4: neither 172 - 1 = 171 nor 172 / 2 - 1 = 85 is prime
