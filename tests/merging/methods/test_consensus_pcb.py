"""consensus (TALL masks) and pcb (parameter competition balancing): their formulas (docs/methods.md) against direct
in-memory references over flattened vectors, per tensor and over a whole model streamed tensor by tensor."""

from __future__ import annotations

import pytest
import torch

from merging.sources import merge_trees
from tests.helpers.merge import stream_merge
from tests.merging.methods.test_methods import make, rand


# ---------------------------------------------------------------------------------------------------------
# consensus
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_consensus_keeps_entries_that_matter_to_k_tasks(k):
    base = rand((8, 9), 1)
    taus = [rand((8, 9), 2 + i, 0.1) for i in range(3)]
    lams = [0.3, 0.5, 0.8]
    per = [{"lambda": x, "weight": w} for x, w in zip(lams, (1, 2, 1), strict=True)]
    m, pm = make("consensus", {"k": k, "alpha": 0.7}, per, 3)
    got = stream_merge(m, "w", base, [t.clone() for t in taus], pm, chunk=10)
    mtl = taus[0] + 2 * taus[1] + taus[2]
    count = sum((t.abs() > lam * (mtl - t).abs()).int() for t, lam in zip(taus, lams, strict=True))
    torch.testing.assert_close(got, base + 0.7 * mtl * (count >= k))
    assert 0 < int((count >= 2).sum()) < count.numel()  # the masks do select


def test_consensus_over_ties_masks_the_ties_merge():
    base = rand((10, 10), 1)
    taus = [rand((10, 10), 5 + i, 0.1) for i in range(3)]
    per = [{"density": 0.5, "lambda": 0.4}] * 3
    m, pm = make("consensus", {"aggregate": "ties", "k": 2}, per, 3)
    got = m.merge_tensor("w", base, [t.clone() for t in taus], pm)
    ties, tpm = make("ties", {"normalize": False}, [{"density": 0.5}] * 3, 3)
    mtl = ties.merge_tensor("w", torch.zeros(10, 10), [t.clone() for t in taus], tpm)
    count = sum((t.abs() > 0.4 * (mtl - t).abs()).int() for t in taus)
    torch.testing.assert_close(got, base + mtl * (count >= 2))


# ---------------------------------------------------------------------------------------------------------
# pcb
# ---------------------------------------------------------------------------------------------------------
def _normalize(x):
    mn, mx = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    return (x - mn) / (mx - mn)


def _clamp(x, lo_ratio, hi_ratio):
    d = x.shape[1]
    s = x.sort(1).values
    return x.clamp(s[:, int(d * lo_ratio)].unsqueeze(1), s[:, int(d * (1 - hi_ratio) - 1)].unsqueeze(1))


def _pcb_reference(flat: torch.Tensor, ratio: float, weights) -> torch.Tensor:
    """The official code's steps on (T, n) flattened task vectors, written out directly."""
    T = flat.shape[0]
    a = _clamp(flat.abs(), 1e-4, 1e-4)
    score = torch.exp(T * _normalize(a) ** 2) * torch.tanh(flat * flat.sum(0))
    scale = _normalize(_clamp(score, 1 - ratio, 0))
    tvs = torch.sign(flat) * a * torch.tensor(weights).unsqueeze(1)
    return (tvs * scale).sum(0) / scale.sum(0).clamp(min=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.6, 1.0])  # 0.6, 1.0: the drop threshold is a negative score
@pytest.mark.parametrize("chunk", [100000, 97])
@pytest.mark.parametrize("zeros", [False, True])  # exact zeros: scores of ±0.0
def test_pcb_tensor_scope_matches_the_official_steps(ratio, chunk, zeros):
    base = rand((60, 45), 1)
    taus = [rand((60, 45), 2 + i, 0.1 * (i + 1)) for i in range(3)]
    if zeros:
        taus[2] = taus[2] * (rand((60, 45), 9) > 0.5)
    w = [1.0, 0.8, 1.2]
    m, pm = make("pcb", {"ratio": ratio, "scope": "tensor", "lambda": 0.9}, [{"weight": x} for x in w], 3)
    got = stream_merge(m, "w", base, [t.clone() for t in taus], pm, chunk)
    want = base + 0.9 * _pcb_reference(torch.stack([t.reshape(-1) for t in taus]), ratio, w).reshape(60, 45)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pcb_global_scope_ranks_over_the_whole_model():
    shapes = {"a": (40, 30), "b": (7,), "c": (25, 25)}
    base = {k: rand(s, i) for i, (k, s) in enumerate(shapes.items())}
    models = [
        {k: base[k] + rand(s, 10 * j + i, 0.05 * (j + 1)) for i, (k, s) in enumerate(shapes.items())} for j in range(3)
    ]
    m, pm = make("pcb", {"ratio": 0.2}, None, 3)
    got = merge_trees(m, base, models, pm, chunk_size=64)
    flat = torch.stack([torch.cat([(mm[k] - base[k]).reshape(-1) for k in shapes]) for mm in models])
    merged = _pcb_reference(flat, 0.2, [1.0] * 3)
    start = 0
    for k, s in shapes.items():
        n = base[k].numel()
        torch.testing.assert_close(got[k], base[k] + merged[start : start + n].reshape(s), rtol=1e-5, atol=1e-6)
        start += n
    tensor_scope, _ = make("pcb", {"ratio": 0.2, "scope": "tensor"}, None, 3)
    assert not torch.allclose(merge_trees(tensor_scope, base, models, pm)["a"], got["a"])
