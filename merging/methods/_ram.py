"""The shared step of `ram` and `ramplus_tl` (Reinforced Agent Merging, https://arxiv.org/abs/2601.13572, as
mergekit 0.1.5 implements it).

Per element, with the task vectors τ_t and ε:

    n_t = [|τ_t| > ε],   c = Σ_t n_t                       which models change the entry, and how many
    unique entries (c = 1):  the changing model's τ_t, times its factor λ_t (1 for ram)
    shared entries (c > 1):  the mean of the changing models' τ_t
    θ = θ_0 + Σ_t n_t τ_t (λ_t [c = 1] + [c > 1] / c)

Entries no model changes by more than ε keep the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ram_masks", "ram_combine", "ram_counts"]


def ram_masks(taus: Sequence[torch.Tensor], epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(nonzero (T, n) bool, counts (1, n) int64) of flat chunks."""
    nonzero = torch.stack([t.reshape(-1) for t in taus]).abs_() > epsilon
    return nonzero, nonzero.sum(dim=0, keepdim=True)


def ram_combine(
    base: torch.Tensor, taus: Sequence[torch.Tensor], epsilon: float, factors: torch.Tensor | None = None
) -> torch.Tensor:
    """θ_0 + the merged task vector (module docstring) of one chunk; `factors`: λ_t, float32 (None: 1 each)."""
    tv = torch.stack([t.reshape(-1) for t in taus])
    nonzero, counts = ram_masks(taus, epsilon)
    overlap, unique = counts > 1, counts == 1
    tvz = tv * nonzero
    uniq = tvz * unique
    if factors is not None:
        uniq = uniq * factors.unsqueeze(-1)
    merged = (uniq + tvz * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape)


def ram_counts(taus: Sequence[torch.Tensor], epsilon: float) -> tuple[list[int], list[int]]:
    """Per model, how many of its changed entries are shared with another model, and how many are its alone."""
    nonzero, counts = ram_masks(taus, epsilon)
    shared = (nonzero & (counts > 1)).sum(dim=1)
    unique = (nonzero & (counts == 1)).sum(dim=1)
    return shared.tolist(), unique.tolist()
