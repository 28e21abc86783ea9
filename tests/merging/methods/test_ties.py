"""TIES with the official code's options (global trim, majority sign for zero sums), streamed, against a direct
implementation of the paper's algorithm on the flattened model; and `merge_trees`, the in-memory entry point."""

from __future__ import annotations

import pytest
import torch

from merging.methods._gta import GTAModelParams
from merging.methods.ties import Ties, TiesParams
from merging.sources import merge_trees
from peft_lab.errors import UserError

SHAPES = {"a": (30, 20), "b": (7,), "c": (16, 16)}


def official_ties(base: dict, taus: list[dict], density: float, lam: float, normalize: bool) -> dict:
    """The paper's TIES on the whole flattened model: trim (keep |τ| >= kthvalue(|τ|, N − int(N·d))), elect
    (sign of the sum; 0 -> the sign of the sum of elected signs), disjoint mean or sum."""
    names = list(base)
    flat = torch.stack([torch.cat([t[n].reshape(-1) for n in names]) for t in taus])  # (T, N)
    N = flat.shape[1]
    kth = flat.abs().kthvalue(max(N - int(N * density), 1), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    merged = sel.sum(0)
    if normalize:
        merged = merged / (sel != 0).sum(0).clamp(min=1)
    out, at = {}, 0
    for n in names:
        k = base[n].numel()
        out[n] = base[n] + lam * merged[at : at + k].reshape(base[n].shape)
        at += k
    return out


def _setting(seed: int, negative_majority: bool):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    taus = [{n: torch.randn(s, generator=g) * 0.1 for n, s in SHAPES.items()} for _ in range(3)]
    # exact zero sums: model 1 cancels model 0 on a block of entries, model 2 is zero there
    for t in taus:
        t["a"][:5] = 0
    taus[0]["a"][:5] = torch.linspace(0.5, 1.0, 20).reshape(5, 4).repeat(1, 5)  # large: survive the trim
    taus[1]["a"][:5] = -taus[0]["a"][:5]
    if negative_majority:  # most elected signs negative
        for t in taus:
            for n in SHAPES:
                t[n] = -t[n].abs()
        taus[0]["a"][:5] = torch.linspace(0.5, 1.0, 20).reshape(5, 4).repeat(1, 5)
        taus[1]["a"][:5] = -taus[0]["a"][:5]
    return base, taus


@pytest.mark.parametrize("negative_majority", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("chunk", [1 << 22, 37])
def test_official_ties_streamed_equals_the_flattened_algorithm(negative_majority, normalize, chunk):
    base, taus = _setting(0, negative_majority)
    method = Ties(TiesParams(lambda_=0.7, normalize=normalize, trim_scope="global", zero_sign="majority"))
    got = merge_trees(method, base, taus, [GTAModelParams(density=0.3)] * 3, deltas=True, chunk_size=chunk)
    ref = official_ties(base, taus, 0.3, 0.7, normalize)
    for n in SHAPES:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7)
    zero_sum = got["a"][:5] - base["a"][:5]
    # on the cancelling block the majority sign decides which of the two opposite entries is kept
    kept = taus[1]["a"][:5] if negative_majority else taus[0]["a"][:5]
    torch.testing.assert_close(zero_sum, 0.7 * kept, rtol=1e-6, atol=1e-7)


def test_plus_rule_keeps_the_positive_entry_of_a_zero_sum():
    base, taus = _setting(1, negative_majority=True)
    plus = Ties(TiesParams(lambda_=1.0, normalize=False, trim_scope="global", zero_sign="plus"))
    got = merge_trees(plus, base, taus, [GTAModelParams(density=0.3)] * 3, deltas=True)
    torch.testing.assert_close(got["a"][:5] - base["a"][:5], taus[0]["a"][:5], rtol=1e-6, atol=1e-7)


def test_components_sum_to_the_dis_sum_merge():
    base, taus = _setting(2, negative_majority=False)
    params = TiesParams(lambda_=1.0, normalize=False, trim_scope="global", zero_sign="majority")
    merged = merge_trees(Ties(params), base, taus, [GTAModelParams(density=0.4)] * 3, deltas=True)
    from merging.methods.adamerging import ties_task_vectors
    from merging.sources import in_memory

    streams = in_memory(Ties(params), base, taus, [GTAModelParams()] * 3, deltas=True)
    comps = ties_task_vectors(streams.merge_inputs(), list(SHAPES), 0.4)
    for n in SHAPES:
        torch.testing.assert_close(base[n] + sum(c[n] for c in comps), merged[n], rtol=1e-6, atol=1e-7)


def test_majority_needs_the_global_scope():
    with pytest.raises(UserError, match="zero_sign=majority.*trim_scope=global"):
        TiesParams(trim_scope="tensor", zero_sign="majority")
    with pytest.raises(UserError, match="zero_sign"):
        TiesParams(zero_sign="minus")


@pytest.mark.parametrize("fused_on", [True, False])
@pytest.mark.parametrize("chunk", [1 << 22, 50, 7])
def test_tensor_scope_keeps_exactly_k_with_ties_broken_by_index(fused_on, chunk, monkeypatch):
    """Magnitudes tied at the threshold (as bfloat16 deltas have): exactly k = int(d·n) entries are kept, the
    tied ones with the lowest indices, whether the tensor arrives whole or in chunks, fused or not."""
    from merging import fused
    from merging.base import TensorJob
    from merging.stream import drive

    monkeypatch.setattr(fused, "ENABLED", fused_on)
    g = torch.Generator().manual_seed(3)
    tau = (torch.randint(-4, 5, (400,), generator=g) * 0.25).float()  # 9 levels: many ties
    base = torch.zeros(400)
    m = Ties(TiesParams(normalize=True))
    pm = [GTAModelParams(density=0.3)]
    k = int(0.3 * 400)
    job = TensorJob("w", (400,), pm, chunked=400 > chunk)
    out = torch.cat(
        list(
            drive(m, job, lambda s, e: (base[s:e].clone(), [tau[s:e].clone()]), chunk, sample_block=16, sample_every=4)
        )
    )
    kept = out != 0
    assert int(kept.sum()) == k
    thr = tau.abs().topk(k).values[-1]
    assert bool((out[tau.abs() > thr] == tau[tau.abs() > thr]).all())  # everything above the threshold kept
    tied = torch.nonzero(tau.abs() == thr).reshape(-1)
    n_tied_kept = k - int((tau.abs() > thr).sum())
    assert torch.equal(torch.nonzero(kept & (tau.abs() == thr)).reshape(-1), tied[:n_tied_kept])  # lowest indices
