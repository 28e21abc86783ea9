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

from merging import fused

__all__ = ["ram_masks", "ram_combine", "ram_counts"]


def ram_masks(taus: Sequence[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([|τ_t| > ε] per model (bool), c = how many models change each entry (uint8)) of flat chunks."""
    nonzero = [t.abs() > epsilon for t in taus]
    counts = nonzero[0].to(torch.uint8)
    for m in nonzero[1:]:
        counts.add_(m)
    return nonzero, counts


def ram_combine(
    base: torch.Tensor, taus: Sequence[torch.Tensor], epsilon: float, factors: Sequence[float] | None = None
) -> torch.Tensor:
    """θ_0 + the merged task vector (module docstring) of one chunk, in place on the chunks; `factors`: λ_t as float32
    values (None: 1 each). Each model's term is mergekit's `τz·[c = 1]·λ + τz·[c > 1] / max(c, 1)` with τz the
    changed entries, summed in model order: equal values (only the sign of an exact zero may differ). One fused pass
    when numba is available (`merging.fused.ram_combine`; these torch ops are its reference)."""
    if fused.available() and base.dtype == torch.float32 and base.is_contiguous():
        f = None if factors is None else [float(x) for x in factors]
        return fused.ram_combine(base, taus, epsilon, f)
    nonzero, counts = ram_masks(taus, epsilon)
    denom = counts.clamp(min=1).float()
    unique = counts == 1 if factors is not None else None
    acc = None
    for t, (tau, m) in enumerate(zip(taus, nonzero, strict=True)):
        term = tau.mul_(m)
        term = term.div(denom) if unique is None else torch.where(unique, term * factors[t], term.div(denom))
        acc = term if acc is None else acc.add_(term)
    return base.add_(acc)


def ram_counts(taus: Sequence[torch.Tensor], epsilon: float) -> tuple[list[int], list[int]]:
    """Per model, how many of its changed entries are shared with another model, and how many are its alone (one
    fused pass when numba is available)."""
    if fused.available() and all(t.dtype == torch.float32 for t in taus):
        return fused.ram_counts(taus, epsilon)
    nonzero, counts = ram_masks(taus, epsilon)
    shared, unique = counts > 1, counts == 1
    return [int((m & shared).sum()) for m in nonzero], [int((m & unique).sum()) for m in nonzero]
