"""DELLA's MagPrune with a linear merge — https://arxiv.org/abs/2406.11617 (mergekit's `della_linear`).

τ̃_t as in `della` (rank-dependent random keep, rescale), then θ = θ_0 + λ · Σ_t w_t τ̃_t  (/ Σ_t w_t with
`normalize`)
"""

from __future__ import annotations

from merging.base import METHODS
from merging.methods._della import DellaLinearParams
from merging.methods._sparsifiers import DellaModelParams, SparsifyingGTA


@METHODS.register("della_linear")
class DellaLinear(SparsifyingGTA):
    name = "della_linear"
    Params = DellaLinearParams
    ModelParams = DellaModelParams
    sparsify = "della"
    consensus = False
