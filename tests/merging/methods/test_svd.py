"""tsv, iso_c, iso_cts: the SVD-based methods' invariants (docs/methods.md) on small matrices. Their results were
also cross-checked against FusionBench's implementations while they were written (agreement to float32 rounding)."""

from __future__ import annotations

import pytest
import torch

from merging.methods.iso_c import iso_c_merge
from merging.methods.iso_cts import iso_cts_merge, subspace_sizes
from merging.methods.tsv import tsv_merge
from tests.helpers.merge import stream_merge
from tests.merging.methods.test_methods import make, rand


def _low_rank(shape, rank, seed, rows=None, cols=None):
    """A rank-`rank` matrix supported on the given rows and columns."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(shape)
    rows = rows or slice(None)
    cols = cols or slice(None)
    block = m[rows, cols]
    block += torch.randn(block.shape[0], rank, generator=g) @ torch.randn(rank, block.shape[1], generator=g)
    return m


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_non_matrices_and_excluded_matrices_are_averaged(name):
    base = rand((10,), 1)
    taus = [rand((10,), 2 + i, 0.1) for i in range(3)]
    m, pm = make(name, {"alpha": 0.7}, None, 3)
    torch.testing.assert_close(m.merge_tensor("b", base, [t.clone() for t in taus], pm), base + 0.7 * sum(taus) / 3)
    base2, taus2 = rand((6, 5), 1), [rand((6, 5), 2 + i, 0.1) for i in range(3)]
    m, pm = make(name, {"exclude": ["embed*"]}, None, 3)
    torch.testing.assert_close(m.merge_tensor("embed.weight", base2, taus2, pm), base2 + sum(taus2) / 3)
    assert not torch.allclose(m.merge_tensor("proj.weight", base2, taus2, pm), base2 + sum(taus2) / 3)


def test_tsv_of_one_task_returns_it_and_of_disjoint_low_rank_tasks_their_sum():
    tau = rand((12, 9), 3)
    torch.testing.assert_close(tsv_merge([tau]), tau, rtol=1e-5, atol=1e-5)
    # rank-3 tasks on disjoint rows and columns: each keeps its k = 9 // 3 = 3 directions, the subspaces are already
    # orthogonal, so TSV adds them without interference
    taus = [_low_rank((12, 9), 3, 10 + i, slice(4 * i, 4 * i + 4), slice(3 * i, 3 * i + 3)) for i in range(3)]
    torch.testing.assert_close(tsv_merge(taus), sum(taus), rtol=1e-4, atol=1e-4)


def test_tsv_keeps_each_tasks_leading_directions_orthogonalised():
    taus = [rand((16, 12), 20 + i) for i in range(3)]
    merged = tsv_merge(taus)
    k = 12 // 3
    kept = torch.cat([torch.linalg.svdvals(t)[:k] for t in taus])
    # U⊥ and V⊥ have orthonormal columns/rows, so the merged singular values are exactly the kept ones
    torch.testing.assert_close(torch.linalg.svdvals(merged), kept.sort(descending=True).values, rtol=1e-4, atol=1e-5)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_matrix():
    taus = [rand((15, 10), 30 + i, 0.1 * (i + 1)) for i in range(3)]
    total = sum(taus)
    merged = iso_c_merge(taus)
    s = torch.linalg.svdvals(total)
    torch.testing.assert_close(torch.linalg.svdvals(merged), torch.full((10,), float(s.mean())), rtol=1e-5, atol=1e-6)
    # same singular directions: <merged, Σ τ> = mean(S) · Σ S
    torch.testing.assert_close((merged * total).sum(), s.mean() * s.sum(), rtol=1e-5, atol=1e-6)


def test_iso_cts_with_the_whole_space_common_is_iso_c_and_its_spectrum_is_flat():
    taus = [rand((14, 11), 40 + i, 0.1 * (i + 1)) for i in range(3)]
    torch.testing.assert_close(iso_cts_merge(taus, 1.0), iso_c_merge(taus), rtol=1e-4, atol=1e-5)
    merged = iso_cts_merge(taus, 0.5)
    s = torch.linalg.svdvals(merged)
    torch.testing.assert_close(s, torch.full_like(s, float(s[0])), rtol=1e-4, atol=1e-5)
    assert subspace_sizes(11, 3, 0.5) == (5, 2) and subspace_sizes(768, 8, 0.8) == (616, 19)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_alpha_scales_the_merged_task_vector_and_chunks_never_split_a_matrix(name):
    base = rand((9, 7), 1)
    taus = [rand((9, 7), 2 + i, 0.1) for i in range(3)]
    m1, pm = make(name, {"alpha": 1.0}, [{"weight": w} for w in (1.0, 0.5, 2.0)], 3)
    m2, _ = make(name, {"alpha": 0.4}, None, 3)
    one = m1.merge_tensor("w", base, [t.clone() for t in taus], pm)
    scaled = stream_merge(m2, "w", base, [t.clone() for t in taus], pm, chunk=4)  # one chunk of 63
    torch.testing.assert_close(scaled - base, 0.4 * (one - base), rtol=1e-5, atol=1e-6)
