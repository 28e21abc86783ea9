"""DoRA as a delta — Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353.

A DoRA layer's merged weight rescales each output's weights to a learned magnitude m:

    W' = m ⊙ (W + ΔW) / ‖W + ΔW‖,    ΔW = s · B A,    delta = W' − W

with the norm taken over everything but the output axis (a row of a Linear weight, an output channel of a Conv;
for an Embedding and a GPT-2 Conv1D, whose weights are stored transposed, a column), as PEFT's `DoraLinearLayer`,
`DoraEmbeddingLayer` and `_DoraConvNdLayer` merge it. The delta depends on W, so it is a `Thunk` over the base
leaf and the LoRA delta, computed (in float32) only when read.
"""

from __future__ import annotations

import torch

from peft_lab.tree.leaves import Leaf, Thunk

__all__ = ["dora_delta", "dora_weight"]


def dora_weight(W: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The merged DoRA weight `m ⊙ (W + ΔW) / ‖W + ΔW‖` (float32).

    Args:
        W: the base weight (out, in[, k…]) — (in, out) / (num, dim) when `transposed`.
        delta: ΔW = s·B A in the weight's layout.
        magnitude: m, one value per output (any shape holding that many values, e.g. PEFT's (1, out, 1, 1)).
        transposed: the output axis is 1 (Embedding, GPT-2 Conv1D) instead of 0.
    """
    V = W.float() + delta.float()
    out_axis = 1 if transposed else 0
    dims = tuple(d for d in range(V.dim()) if d != out_axis)
    norm = torch.linalg.vector_norm(V, dim=dims, keepdim=True)
    view = [1] * V.dim()
    view[out_axis] = -1
    return magnitude.float().reshape(view) * V / norm


def dora_delta(base: Leaf, lora: Leaf, magnitude: torch.Tensor, transposed: bool) -> Thunk:
    """The delta `W' − W` of a DoRA layer on the base weight `base`, from its LoRA delta and magnitude."""
    m = magnitude.detach().float().clone()

    def fn(W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        return dora_weight(W, D, m, transposed) - W

    return Thunk(fn, [base, lora], base.shape, torch.float32, name="dora")
