"""Shared pieces of the SVD-based methods (tsv, iso_c, iso_cts): which tensors are decomposed, the per-model
weights, the polar factor, and `MatrixMethod`, their streaming form: each tensor arrives whole as one chunk
(`chunk_unit` = its size), so one matrix at a time is in memory with the T task vectors and their factors; other
tensors are averaged. Parameters are read per tensor (`self.at(job)`), so they may follow a recipe's gradients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.base import MergeMethod, ModelParams, TensorJob
from peft_lab.tree import matches

__all__ = ["SvdModelParams", "MatrixMethod", "is_matrix", "weighted", "polar", "svd", "mean"]


@dataclass(frozen=True)
class SvdModelParams(ModelParams):
    """Per-model `weight`: each task vector is scaled by it before the merge."""

    weight: float = 1.0


def is_matrix(name: str, t: torch.Tensor, exclude: Sequence[str]) -> bool:
    """A 2-D tensor not matched by the `exclude` patterns: decomposed; anything else is averaged."""
    return t.dim() == 2 and min(t.shape) > 0 and not (exclude and matches(name, list(exclude)))


def weighted(tensors: Sequence[torch.Tensor], model_params: Sequence) -> list[torch.Tensor]:
    return [t if p.weight == 1 else t * p.weight for t, p in zip(tensors, model_params, strict=True)]


def mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out.div_(len(tensors))


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, float32."""
    return torch.linalg.svd(x.float(), full_matrices=False)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U·Vᵀ of x = U S Vᵀ: the closest matrix with orthonormal columns (or rows)."""
    u, _, vh = svd(x)
    return u @ vh


class MatrixMethod(MergeMethod):
    """θ = θ_0 + α · merge_matrix(τ_1..τ_T) for a 2-D tensor (not excluded), θ_0 + α · mean τ_t otherwise. Subclasses
    implement `merge_matrix(taus, params)`; their `Params` have `alpha` and `exclude`."""

    ModelParams = SvdModelParams
    needs_base = True
    uses_deltas = True
    streaming = True

    def chunk_unit(self, job: TensorJob) -> int:
        return max(job.numel, 1)  # the whole tensor in one chunk

    def merge_matrix(self, taus: list[torch.Tensor], params) -> torch.Tensor:
        raise NotImplementedError

    def merge_chunk(self, job, start, base, tensors):
        p = self.at(job)
        b = base.view(job.shape)
        taus = weighted([t.view(job.shape) for t in tensors], job.model_params)
        merged = self.merge_matrix(taus, p) if is_matrix(job.name, b, p.exclude) else mean(taus)
        return b.add_(merged, alpha=p.alpha).reshape(-1)
