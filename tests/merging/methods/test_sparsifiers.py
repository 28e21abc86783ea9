"""breadcrumbs, breadcrumbs_ties, della, della_linear, sce: the sparsifiers' own invariants (docs/methods.md) on small
tensors, whole and streamed in chunks (statistics passes), including magnitudes tied at the thresholds."""

from __future__ import annotations

import math

import pytest
import torch

from merging.methods._sparsifiers import della_keep, della_ranks, row_window_
from peft_lab.errors import UserError
from tests.helpers.merge import stream_merge
from tests.merging.methods.test_methods import make, rand


def _window_reference(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's rule by sorting: magnitude ranks [g, g + k) from the largest (ties: lowest index first)."""
    n = tau.numel()
    k = int(density * n)
    g = min(int(gamma * n), n - k)
    flat = tau.reshape(-1)
    order = sorted(range(n), key=lambda i: (-abs(float(flat[i])), i))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[g : g + k]] = True
    return (flat * keep).reshape(tau.shape)


@pytest.mark.parametrize("levels", [0, 7])  # 7: a handful of distinct magnitudes (long runs of ties)
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.05), (0.95, 0.2), (0.3, 0.0), (0.0, 0.1), (0.2, 0.8)])
@pytest.mark.parametrize("chunk", [1000, 7])
def test_breadcrumbs_keeps_exactly_the_rank_window(levels, density, gamma, chunk):
    tau = rand((11, 13), 3)
    if levels:
        tau = (tau * levels).round() / levels
    m, pm = make("breadcrumbs", {}, [{"density": density, "gamma": gamma}], 1)
    got = stream_merge(m, "w", torch.zeros_like(tau), [tau.clone()], pm, chunk)
    assert torch.equal(got, _window_reference(tau, density, gamma))


def test_breadcrumbs_at_density_1_is_task_arithmetic_and_ties_variant_elects_signs():
    base = rand((6, 9), 1)
    taus = [rand((6, 9), 2 + i, 0.1) for i in range(3)]
    m, pm = make("breadcrumbs", {}, [{"density": 1.0, "gamma": 0.3}] * 3, 3)
    ta, tpm = make("task_arithmetic", {}, None, 3)
    assert torch.equal(m.merge_tensor("w", base, [t.clone() for t in taus], pm), ta.merge_tensor("w", base, taus, tpm))
    bt, bpm = make("breadcrumbs_ties", {"normalize": True}, [{"density": 0.6, "gamma": 0.1}] * 3, 3)
    masked = [_window_reference(t, 0.6, 0.1) for t in taus]
    ties, tpm = make("ties", {"normalize": True}, [{"density": 1.0}] * 3, 3)
    got = bt.merge_tensor("w", base, [t.clone() for t in taus], bpm)
    assert torch.equal(got, ties.merge_tensor("w", base, masked, tpm))


def test_breadcrumbs_row_scope_is_the_papers_per_row_rule():
    """The breadcrumbs code drops the ⌊γ·L⌋ largest magnitudes of each row, then keeps the ⌊density·L⌋ largest."""
    tau = rand((5, 20), 4)
    m, pm = make("breadcrumbs", {"scope": "row"}, [{"density": 0.5, "gamma": 0.1}], 1)
    got = stream_merge(m, "w", torch.zeros_like(tau), [tau.clone()], pm, chunk=30)  # rounded down to whole rows
    want = torch.zeros_like(tau)
    for r in range(5):
        top = tau[r].abs().topk(2).indices  # ⌊0.1·20⌋ removed
        rest = tau[r].clone()
        rest[top] = 0
        keep = rest.abs().topk(10).indices  # ⌊0.5·20⌋ kept
        want[r, keep] = tau[r, keep]
    assert torch.equal(got, want)
    assert torch.equal(row_window_(tau.reshape(-1).clone(), 20, 0.5, 0.1), want.reshape(-1))


def test_breadcrumbs_l1_rescale_restores_the_norm_in_chunks():
    tau = rand((20, 30), 5, 0.1)
    m, pm = make("breadcrumbs", {"rescale": "l1"}, [{"density": 0.4, "gamma": 0.05}], 1)
    got = stream_merge(m, "w", torch.zeros_like(tau), [tau.clone()], pm, chunk=64)
    torch.testing.assert_close(got.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    assert int((got != 0).sum()) == int(0.4 * 600)


# ---------------------------------------------------------------------------------------------------------
# della
# ---------------------------------------------------------------------------------------------------------
def test_della_ranks_run_along_rows_from_the_smallest_magnitude():
    tau = torch.tensor([[0.3, -0.1, 0.2], [5.0, 4.0, -6.0]])
    assert della_ranks(tau.reshape(-1), (2, 3)).tolist() == [1.0, 0.0, 0.5, 0.5, 0.0, 1.0]
    assert della_ranks(torch.tensor([2.0, 1.0]), (2,)).tolist() == [1.0, 0.0]  # a 1-D tensor is one row


def test_della_keep_probability_follows_the_rank():
    """Keep rates per rank bucket match density − ε … density + ε; kept entries are rescaled by 1/p (keep_rate)."""
    rows, L, d, eps = 400, 50, 0.5, 0.3
    tau = rand((rows, L), 6, 0.1)
    m, pm = make("della_linear", {"rescale": "keep_rate", "seed": 3}, [{"density": d, "epsilon": eps}], 1)
    out = m.merge_tensor("w", torch.zeros_like(tau), [tau.clone()], pm)
    ranks = della_ranks(tau.reshape(-1), (rows, L)).reshape(rows, L)
    p = d - eps + 2 * eps * ranks
    kept = out != 0
    for lo, hi in [(0.0, 0.2), (0.4, 0.6), (0.8, 1.0)]:
        sel = (ranks >= lo) & (ranks <= hi)
        want = float(p[sel].mean())
        assert abs(float(kept[sel].float().mean()) - want) < 5 * math.sqrt(want * (1 - want) / int(sel.sum()))
    torch.testing.assert_close(out[kept], (tau / p.float())[kept])


def test_della_is_unbiased_seeded_and_independent_of_chunking():
    tau = rand((40, 16), 7, 0.1)
    pm_ = [{"density": 0.4, "epsilon": 0.2}]
    mean = torch.zeros_like(tau)
    for seed in range(200):
        m, pm = make("della_linear", {"rescale": "keep_rate", "seed": seed}, pm_, 1)
        mean += m.merge_tensor("w", torch.zeros_like(tau), [tau.clone()], pm) / 200
    assert ((mean - tau).abs() <= 0.6 * tau.abs() + 1e-7).float().mean() > 0.98  # E[τ̃] = τ
    m, pm = make("della", {"seed": 5}, pm_ * 2, 2)
    whole = m.merge_tensor("w", torch.zeros_like(tau), [tau.clone(), -0.5 * tau], pm)
    for chunk in (16, 50, 100):  # chunks hold whole rows (rounded down to multiples of 16)
        m2, _ = make("della", {"seed": 5}, pm_ * 2, 2)
        got = stream_merge(m2, "w", torch.zeros_like(tau), [tau.clone(), -0.5 * tau], pm, chunk)
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-8)  # the L1 factor is summed per chunk
    m3, _ = make("della", {"seed": 6}, pm_ * 2, 2)
    assert not torch.equal(m3.merge_tensor("w", torch.zeros_like(tau), [tau.clone(), -0.5 * tau], pm), whole)


def test_della_keep_draws_the_dare_stream():
    from merging.methods._gta import dare_generator, dare_keep

    p = torch.full((1001,), 0.37, dtype=torch.float64)
    assert torch.equal(della_keep(p, dare_generator(1, "w", 0)), dare_keep(1001, 0.37, dare_generator(1, "w", 0)))


def test_della_refuses_probabilities_outside_0_1():
    from merging.recipe import parse_recipe

    with pytest.raises(UserError, match=r"density=0.9 and epsilon=0.15 .* density \+ epsilon < 1"):
        parse_recipe({"merge_method": "della", "base_model": "b", "models": ["m"], "parameters": {"density": 0.9}})
    with pytest.raises(UserError, match=r"epsilon=1.5 is out of range: must be in \[0, 1\)"):
        parse_recipe({"merge_method": "della", "base_model": "b", "models": ["m"], "parameters": {"epsilon": 1.5}})


# ---------------------------------------------------------------------------------------------------------
# sce
# ---------------------------------------------------------------------------------------------------------
def _sce_reference(base, taus, topk):
    tv = torch.stack(taus)
    if topk < 1:
        var = tv.var(0, unbiased=False).reshape(-1)
        k = int(int((var != 0).sum()) * topk)
        order = sorted(range(var.numel()), key=lambda i: (-float(var[i]), i))
        mask = torch.zeros(var.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        tv = tv * mask.reshape(taus[0].shape)
    s = tv.square().reshape(len(taus), -1).mean(1).double()
    w = torch.full((len(taus),), 1 / len(taus), dtype=torch.float64) if s.sum() < 1e-6 else s / s.sum()
    gamma = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    e = (tv.sign() == gamma).double() * w.reshape(-1, *[1] * (tv.dim() - 1))
    return base + ((tv * e).sum(0) / e.sum(0).clamp(min=1e-6)).float()


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("levels", [0, 5])
def test_sce_selects_weights_and_erases(topk, levels):
    base = rand((9, 14), 1)
    taus = [rand((9, 14), 2 + i, 0.1 * (i + 1)) for i in range(3)]
    if levels:
        taus = [(t * 10 * levels).round() / (10 * levels) for t in taus]
    m, pm = make("sce", {"select_topk": topk}, None, 3)
    want = _sce_reference(base, taus, topk)
    torch.testing.assert_close(m.merge_tensor("w", base, [t.clone() for t in taus], pm), want, rtol=1e-6, atol=1e-7)
    m2, _ = make("sce", {"select_topk": topk}, None, 3)
    got = stream_merge(m2, "w", base, [t.clone() for t in taus], pm, chunk=10)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cap", [None, 0])
def test_sce_streamed_takes_its_weights_from_the_counting_pass(monkeypatch, cap):
    """A streamed tensor: a sample pass and one counting pass, whose squares give the weights (no weights pass);
    with too many undecided entries to keep (cap 0) a weights pass follows. Both give the reference merge."""
    from merging.methods import sce

    if cap is not None:
        monkeypatch.setattr(sce, "_FOLD_CAP", cap)
    base = rand((40, 50), 1)
    taus = [(rand((40, 50), 2 + i, 0.1 * (i + 1)) * 50).round() / 50 for i in range(3)]  # tied variances
    m, pm = make("sce", {"select_topk": 0.3}, None, 3)
    passes = []
    observe = m.observe
    monkeypatch.setattr(m, "observe", lambda job, i, *a: passes.append(i) or observe(job, i, *a))
    got = stream_merge(m, "w", base, [t.clone() for t in taus], pm, chunk=300)
    assert sorted(set(passes)) == ([0, 1] if cap is None else [0, 1, 2])
    torch.testing.assert_close(got, _sce_reference(base, taus, 0.3), rtol=1e-6, atol=1e-7)
