"""Truncated SVD of deltas (peft_lab.tree.lowrank): Eckart–Young optimal, randomized within 1e-3 of the optimum,
rank rules (fixed, energy with a cap), factored inputs, numerical rank, degenerate inputs."""

import math

import pytest
import torch

from peft_lab.tree.lowrank import RankRule, SVDConfig, factored_svd, numerical_rank, seed_for, truncated_svd


def _decaying(m: int, n: int, k: int = 64, noise: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """A fine-tune-like delta: a decaying spectrum of `k` directions plus a little full-rank noise."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.logspace(0, -2, k)
    return (U * s) @ V.T + noise * torch.randn(m, n, generator=g)


def _optimal_error(M: torch.Tensor, k: int) -> float:
    S = torch.linalg.svdvals(M.double())
    return math.sqrt(float((S[k:] ** 2).sum() / (S**2).sum()))


def _measured(M: torch.Tensor, f) -> float:
    return float(
        torch.linalg.norm(M.double() - (f.U.double() * f.S.double()) @ f.Vh.double()) / torch.linalg.norm(M.double())
    )


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_error_is_the_eckart_young_optimum(method):
    M = _decaying(300, 700)
    f = truncated_svd(M, RankRule(rank=16), SVDConfig(method=method), seed=seed_for("w"))
    opt = _optimal_error(M, 16)
    assert f.rank == 16 and f.method == method
    assert _measured(M, f) <= opt * (1 + 1e-3)
    assert f.error == pytest.approx(_measured(M, f), rel=1e-4)  # the report measures, it does not estimate
    assert f.energy == pytest.approx(1 - opt**2, rel=1e-4)
    B, A = f.balanced()
    torch.testing.assert_close(B @ A, (f.U * f.S) @ f.Vh, rtol=1e-5, atol=1e-6)


def test_auto_uses_exact_for_small_matrices_and_randomized_for_large_ones():
    assert truncated_svd(_decaying(200, 300), RankRule(rank=8)).method == "exact"
    big = _decaying(1100, 1200, noise=1e-3)
    f = truncated_svd(big, RankRule(rank=8), seed=1)
    assert f.method == "randomized" and f.iters >= 2
    assert _measured(big, f) <= _optimal_error(big, 8) * (1 + 1e-3)


def test_randomized_falls_back_to_exact_when_it_does_not_converge():
    M = _decaying(400, 500)
    f = truncated_svd(M, RankRule(rank=8), SVDConfig(method="randomized", min_iters=0, max_iters=0, tol=0.0))
    assert f.method == "exact (randomized did not converge)"
    assert f.error == pytest.approx(_optimal_error(M, 8), rel=1e-5)


def test_energy_picks_the_smallest_rank_and_max_rank_caps_it():
    M = _decaying(120, 90, k=40, noise=0.0)
    S = torch.linalg.svdvals(M.double())
    cum = torch.cumsum(S**2, 0) / (S**2).sum()
    want = int((cum < 0.9).sum()) + 1
    f = truncated_svd(M, RankRule(energy=0.9))
    assert f.rank == want and f.energy >= 0.9 and float(cum[want - 2]) < 0.9
    assert truncated_svd(M, RankRule(energy=0.9, max_rank=3)).rank == 3
    assert truncated_svd(M, RankRule(energy=1.0)).rank == 40  # the numerical rank, not min(m, n)


def test_rank_above_the_matrix_is_capped_and_exact():
    M = torch.randn(5, 30)
    f = truncated_svd(M, RankRule(rank=16))
    assert f.rank == 5 and f.capped and f.error < 1e-6


def test_factored_svd_of_a_product_never_forms_it():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(500, 12, generator=g), torch.randn(12, 400, generator=g)
    f = factored_svd(B, A, RankRule(rank=5), scale=0.5)
    M = 0.5 * B @ A
    assert f.method == "factored" and f.rank == 5
    assert _measured(M, f) == pytest.approx(_optimal_error(M, 5), rel=1e-4)
    assert f.error == pytest.approx(_optimal_error(M, 5), rel=1e-4)
    assert factored_svd(B, A, RankRule(rank=50)).rank == 12  # never above the product's rank


def test_zero_and_nonfinite_matrices():
    f = truncated_svd(torch.zeros(10, 7), RankRule(rank=3))
    assert f.rank == 0 and f.error == 0.0
    assert numerical_rank(torch.tensor([1.0, 1e-9]), (10, 10)) == 1
    with pytest.raises(ValueError, match="NaN"):
        truncated_svd(torch.full((3, 3), float("nan")), RankRule(rank=1))
