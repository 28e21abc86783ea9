"""DARE with TIES sign election — Yu et al., https://arxiv.org/abs/2311.03099 (+ TIES, arXiv 2306.01708).

    τ̃_t = m_t ⊙ τ_t · r_t (random drop + rescale, as in dare_linear), then TIES' elect + disjoint merge:
    γ = sign(Σ_t w_t τ̃_t),  θ = θ_0 + λ · Σ_t [sign(w_t τ̃_t) = γ] w_t τ̃_t  (/ Σ agreeing w_t if `normalize`)

mergekit's `dare_ties` (normalize false, L1 rescale by default). At density 1 it is TIES without trimming.
"""

from __future__ import annotations

from merging.base import METHODS
from merging.methods._gta import DareParams, GTAMethod


@METHODS.register("dare_ties")
class DareTies(GTAMethod):
    name = "dare_ties"
    Params = DareParams
    sparsify = "random"
    consensus = True
