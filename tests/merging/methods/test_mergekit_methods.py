"""model_stock, nuslerp, multislerp, karcher, nearswap, ram, ramplus_tl, arcee_fusion: each method's own invariants
(docs/methods.md), on small random tensors, streamed in chunks as the executor does."""

from __future__ import annotations

import math

import pytest
import torch

from peft_lab.errors import UserError
from tests.helpers.merge import stream_merge
from tests.merging.methods.test_methods import make, rand


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def _slerp(t, a, b):
    m, pm = make("slerp", {"t": t}, None, 1)
    return m.merge_tensor("w", a.clone(), [b.clone()], pm)


# ---------------------------------------------------------------------------------------------------------
# model_stock
# ---------------------------------------------------------------------------------------------------------
def test_model_stock_two_identical_fine_tunes_return_that_fine_tune():
    base = rand((12, 9), 1)
    ft = base + rand((12, 9), 2, 0.1)
    for fw in (False, True):
        m, pm = make("model_stock", {"filter_wise": fw}, None, 2)
        torch.testing.assert_close(m.merge_tensor("w", base, [ft.clone(), ft.clone()], pm), ft, rtol=1e-6, atol=1e-7)


def test_model_stock_ratio_follows_the_angle():
    """Orthogonal offsets (cos 0) keep the base; offsets at 60° (cos 1/2, N = 2) give t = 2/3."""
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    m, pm = make("model_stock", {}, None, 2)
    torch.testing.assert_close(m.merge_tensor("w", base, [a, b], pm), base)
    c = torch.tensor([0.5, math.sqrt(3) / 2, 0, 0])
    got = m.merge_tensor("w", base, [a.clone(), c.clone()], pm)
    torch.testing.assert_close(got, (2 / 3) * (a + c) / 2)


def test_model_stock_filter_wise_is_per_row():
    base = rand((3, 8), 1)
    offs = [rand((3, 8), 2 + i, 0.1) for i in range(3)]
    m, pm = make("model_stock", {"filter_wise": True}, None, 3)
    got = stream_merge(m, "w", base, [base + o for o in offs], pm, chunk=5)  # rounded to whole rows of 8
    for r in range(3):
        mr, pmr = make("model_stock", {}, None, 3)
        want = mr.merge_tensor("w", base[r].clone(), [(base + o)[r].clone() for o in offs], pmr)
        torch.testing.assert_close(got[r], want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# nuslerp, multislerp, karcher
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 0.7), (2.0, 0.5)])
def test_nuslerp_without_base_is_slerp_at_the_weights_ratio(weights):
    a, b = rand((6, 7), 1), rand((6, 7), 2)
    m, pm = make("nuslerp", {}, [{"weight": w} for w in weights], 2)
    got = m.merge_tensor("w", None, [a.clone(), b.clone()], pm)
    torch.testing.assert_close(got, _slerp(weights[1] / sum(weights), a, b), rtol=1e-5, atol=1e-6)


def test_nuslerp_with_base_interpolates_task_vectors_per_row_and_column():
    base, a, b = rand((5, 6), 1), rand((5, 6), 2), rand((5, 6), 3)
    for flatten, row_wise, vectors in [(False, False, lambda x: x), (False, True, lambda x: x.T)]:
        m, pm = make("nuslerp", {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}, None, 2)
        got = stream_merge(m, "w", base, [a, b], pm, chunk=8)
        want = torch.stack([_slerp(0.5, u, v) for u, v in zip(vectors(a - base), vectors(b - base), strict=True)])
        torch.testing.assert_close(vectors(got - base), want, rtol=1e-5, atol=1e-6)


def test_nuslerp_weight_0_returns_the_first_model():
    base, a, b = rand((4, 4), 1), rand((4, 4), 2), rand((4, 4), 3)
    m, pm = make("nuslerp", {}, [{"weight": 1.0}, {"weight": 0.0}], 2)
    torch.testing.assert_close(m.merge_tensor("w", base, [a.clone(), b.clone()], pm), a, rtol=1e-6, atol=1e-6)


def test_multislerp_of_two_equal_norm_tensors_is_their_geodesic_midpoint():
    a, b = rand((9, 5), 1), rand((9, 5), 2)
    b = b * a.norm() / b.norm()
    m, pm = make("multislerp", {}, None, 2)
    got = m.merge_tensor("w", None, [a.clone(), b.clone()], pm)
    torch.testing.assert_close(got, _slerp(0.5, a, b), rtol=1e-5, atol=1e-6)
    one, pm1 = make("multislerp", {}, None, 1)
    assert torch.equal(one.merge_tensor("w", None, [a.clone()], pm1), a)


def test_multislerp_zero_task_vectors_merge_to_the_base_and_cancelling_ones_are_refused():
    base = rand((3, 4), 1)
    m, pm = make("multislerp", {}, None, 3)
    assert torch.equal(m.merge_tensor("w", base, [base.clone()] * 3, pm), base)  # a tensor no model changed
    v, zero = rand((3, 4), 2, 0.1), torch.zeros(3, 4)
    with pytest.raises(UserError, match="weighted sum of the models' unit vectors is zero"):
        m.merge_tensor("w", zero, [v, -v, zero.clone()], pm)


def test_karcher_of_two_points_is_slerp_at_one_half_up_to_the_norm():
    """The Karcher mean of two points on the unit sphere is their geodesic midpoint, slerp at 1/2. karcher projects its
    inputs onto the sphere and scales the mean to their mean norm; slerp interpolates the tensors as they are, so the
    two agree on unit inputs scaled by (|a| + |b|)/2, and on inputs of equal norm."""
    a, b = rand((8, 6), 1), 2.0 * rand((8, 6), 2)
    m, pm = make("karcher", {"max_iter": 50, "tol": 1e-9}, None, 2)
    got = stream_merge(m, "w", None, [a, b], pm, chunk=11)
    want = (a.norm() + b.norm()) / 2 * _slerp(0.5, _unit(a), _unit(b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    b = b * a.norm() / b.norm()
    got = m.merge_tensor("w", None, [a.clone(), b.clone()], pm)
    torch.testing.assert_close(got, _slerp(0.5, a, b), rtol=1e-5, atol=1e-6)


def test_karcher_of_points_with_one_direction_keeps_it():
    a = rand((5, 5), 1)
    m, pm = make("karcher", {}, None, 3)
    got = m.merge_tensor("w", None, [a.clone(), 2 * a, 3 * a], pm)
    torch.testing.assert_close(got, 2 * a, rtol=1e-5, atol=1e-6)
    zero, pmz = make("karcher", {}, None, 2)
    assert torch.equal(zero.merge_tensor("w", None, [torch.zeros(4), torch.zeros(4)], pmz), torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------
# nearswap, ram, ramplus_tl
# ---------------------------------------------------------------------------------------------------------
def test_nearswap_takes_near_values_and_moves_toward_far_ones():
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.05, -0.1, 0.4, 1.0])
    m, pm = make("nearswap", {"t": 0.1}, None, 1)
    got = m.merge_tensor("w", a.clone(), [b.clone()], pm)
    torch.testing.assert_close(got, torch.tensor([0.05, -0.1, 0.1, 1.0]))  # |a − b| <= t: b; else a + t·sign
    m0, pm0 = make("nearswap", {"t": 0.0}, None, 1)
    assert torch.equal(m0.merge_tensor("w", a.clone(), [b.clone()], pm0), a)


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = torch.zeros(5)
    taus = [torch.tensor([0.3, 0.2, 0.0, 1e-6, 0.4]), torch.tensor([0.0, 0.4, 0.0, 0.0, -0.2])]
    m, pm = make("ram", {"epsilon": 1e-5}, None, 2)
    got = m.merge_tensor("w", base, [t.clone() for t in taus], pm)
    torch.testing.assert_close(got, torch.tensor([0.3, 0.3, 0.0, 0.0, 0.1]))


def test_ramplus_tl_boosts_unique_changes_by_the_shared_ratio():
    """Model 0 changes entries 0-3, shares 2 (ρ = 2/2 = 1, capped at α = 0.5: λ = 1 + 0.2·0.5); model 1 changes
    entries 2-3 only, both shared (ρ = 2/ε: capped, but it has no unique entry)."""
    base = torch.zeros(4)
    taus = [torch.tensor([1.0, 2.0, 0.4, 0.6]), torch.tensor([0.0, 0.0, 0.2, 0.2])]
    m, pm = make("ramplus_tl", {"r": 0.2, "alpha": 0.5}, None, 2)
    got = stream_merge(m, "w", base, [t.clone() for t in taus], pm, chunk=2)
    torch.testing.assert_close(got, torch.tensor([1.1, 2.2, 0.3, 0.4]))


# ---------------------------------------------------------------------------------------------------------
# arcee_fusion
# ---------------------------------------------------------------------------------------------------------
def test_arcee_fusion_takes_the_upper_outliers_of_importance():
    b = rand((20, 16), 1)
    p = b + rand((20, 16), 2, 0.05)
    p[3] += 2.0  # one row moves a lot: its entries are the outliers
    m, pm = make("arcee_fusion", {}, None, 1)
    got = m.merge_tensor("w", b.clone(), [p.clone()], pm)
    pp, qq = torch.softmax(p, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    s = (p - b).abs() * (pp * (pp / qq).log()).sum(-1, keepdim=True)
    srt = s.reshape(-1).sort().values
    q = [srt[int(f * (s.numel() - 1))] for f in (0.25, 0.5, 0.75)]
    take = s >= q[1] + 1.5 * (q[2] - q[0])
    assert take[3].all() and 0 < int(take.sum()) < s.numel()
    torch.testing.assert_close(got, torch.where(take, p, b), rtol=0, atol=1e-7)
    assert torch.equal(m.merge_tensor("w", b.clone(), [b.clone()], pm), b)


@pytest.mark.parametrize("shape", [(37, 16), (5, 3, 8), (50,)])
def test_arcee_fusion_importance_in_row_blocks_is_the_whole_tensor_formula(monkeypatch, shape):
    """The importance is computed a block of rows at a time: the same bits as the formula on the whole tensor."""
    from merging.methods import arcee_fusion

    b = rand(shape, 1)
    p = b + rand(shape, 2, 0.1)
    diff = (p - b).abs()
    pp, qq = torch.softmax(p, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    whole = diff * torch.sum(pp * torch.log(pp / qq), dim=-1, keepdim=True)
    monkeypatch.setattr(arcee_fusion, "_BLOCK", 40)  # blocks of 2 or 5 rows (one row when a row is longer)
    got = arcee_fusion.importance(p, b)
    assert got.shape == whole.shape
    assert torch.equal(got.view(torch.int32), whole.view(torch.int32))
