"""Model Stock — Jang et al., "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522 (mergekit's `model_stock`).

With the base θ_0 and N >= 2 fine-tunes θ_1..θ_N of it, per tensor (or per row with `filter_wise`), d_i = θ_i − θ_0:

    cos = mean over the pairs i < j of  <d_i, d_j> / max(|d_i|·|d_j|, 1e-6)     (each clamped to [−1, 1])
    t   = N·cos / (1 + (N − 1)·cos)          (0 where |1 + (N − 1)·cos| < 1e-6)
    θ   = t · (Σ_i θ_i / N) + (1 − t) · θ_0

The paper's interpolation ratio toward the fine-tunes' average; with two identical fine-tunes cos = 1 and t = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.base import FULL, METHODS, MergeMethod
from merging.methods._groups import Grams, per_element, unit
from peft_lab.params import Checked


@dataclass(frozen=True)
class ModelStockParams(Checked):
    """`filter_wise`: one ratio per row (the last dimension) instead of one per tensor."""

    filter_wise: bool = False


@dataclass(frozen=True)
class NoModelParams(Checked):
    """model_stock takes no per-model parameters."""


def stock_ratio(G: torch.Tensor) -> torch.Tensor:
    """t per vector from the Gram matrices (groups, N, N) of the offsets d_i."""
    n = G.shape[-1]
    norms = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append((G[:, i, j] / (norms[:, i] * norms[:, j]).clamp_min(1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))


@METHODS.register("model_stock")
class ModelStock(MergeMethod):
    name = "model_stock"
    Params = ModelStockParams
    ModelParams = NoModelParams
    needs_base = True
    uses_deltas = False
    min_models = 2
    streaming = True

    def _grouping(self, job) -> str:
        return "rows" if self.at(job).filter_wise else "tensor"

    def chunk_unit(self, job) -> int:
        return unit(job.shape, self._grouping(job))

    def next_pass(self, job, index):
        return FULL if index == 0 and job.chunked else None

    def observe(self, job, pass_index, start, base, tensors):
        grams = job.state.get("grams")
        if grams is None:
            grams = job.state["grams"] = Grams(job.shape, self._grouping(job), len(tensors))
        grams.add(start, [x - base for x in tensors])

    def merge_chunk(self, job, start, base, tensors):
        if not job.chunked:
            self.observe(job, 0, start, base, tensors)
        if "t" not in job.state:
            job.state["t"] = stock_ratio(job.state["grams"].G)
        t = per_element(job.state["t"], job.shape, self._grouping(job), start, base.numel())
        avg = tensors[0]
        for x in tensors[1:]:
            avg.add_(x)
        avg.div_(len(tensors))
        return avg.mul_(t).add_(base * (1 - t))
