"""DELLA-Merging — Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", https://arxiv.org/abs/2406.11617 (mergekit's `della`).

    MagPrune   p_i = density − ε + 2ε · (rank_i − 1)/(L − 1)      (rank of |τ_t| within its row of L, from the
               smallest), m_i ~ Bernoulli(p_i),  τ̃_t = m ⊙ τ_t · r   (r: L1 norm ratio, or 1/p_i: `rescale`)
    elect      γ = sign(Σ_t w_t τ̃_t)
    merge      θ = θ_0 + λ · Σ_t [sign(w_t τ̃_t) = γ] w_t τ̃_t / Σ_t [sign(w_t τ̃_t) = γ] w_t   (`normalize`)
"""

from __future__ import annotations

from merging.base import METHODS
from merging.methods._della import DellaParams
from merging.methods._sparsifiers import DellaModelParams, SparsifyingGTA


@METHODS.register("della")
class Della(SparsifyingGTA):
    name = "della"
    Params = DellaParams
    ModelParams = DellaModelParams
    sparsify = "della"
    consensus = True
