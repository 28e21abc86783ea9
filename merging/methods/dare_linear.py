"""DARE with a linear merge — Yu et al., "Language Models are Super Mario", https://arxiv.org/abs/2311.03099.

    τ̃_t = m_t ⊙ τ_t · r_t,   m_t ~ Bernoulli(density_t) i.i.d.,   θ = θ_0 + λ · Σ_t w_t τ̃_t

with r_t = 1/density (`rescale: keep_rate`, the paper), 1/q (`rescale: q`, DAREx-q), the factor that restores
the tensor's L1 norm (`rescale: l1`, mergekit's `rescale: true`, the default for mergekit recipes) or 1
(`none`). Masks come from per-(seed, tensor, model) CPU generators: the same on any device or tensor order.
"""

from __future__ import annotations

from merging.base import METHODS
from merging.methods._gta import DareParams, GTAMethod


@METHODS.register("dare_linear")
class DareLinear(GTAMethod):
    name = "dare_linear"
    Params = DareParams
    sparsify = "random"
    consensus = False
