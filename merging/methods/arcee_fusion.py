"""Arcee Fusion: mergekit's `arcee_fusion`, which takes the other model's value only where its change is large and
shifts the row's output distribution (https://arcee.ai, https://github.com/arcee-ai/mergekit).

Per tensor, with b = the base and p = the other model, along the last dimension (a 1-D tensor is one row):

    KL_row = Σ (softmax(p) + ε) · log((softmax(p) + ε) / (softmax(b) + ε))      (ε = 1e-8, per row)
    s      = |p − b| · KL_row                                                 (each entry's importance)
    τ      = median(s) + 1.5 · (q3(s) − q1(s))                                 (quantiles: the sorted value at
                                                                                index ⌊q·(n − 1)⌋)
    θ      = b + (p − b) · [s >= τ]

mergekit estimates the quantiles of tensors above 1,000,000 entries from a random sample of 1,000,000; peft-lab
takes them exactly for every tensor (so on larger tensors mergekit's own output varies from run to run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from merging.base import METHODS, MergeMethod
from merging.methods._kth_largest import kth_largest
from peft_lab.params import Checked

_EPS = 1e-8
_QUANTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class NoParams(Checked):
    """arcee_fusion takes no parameters."""


@dataclass(frozen=True)
class NoModelParams(Checked):
    """arcee_fusion takes no per-model parameters."""


def importance(p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|p − b| times the row's KL divergence between the softmaxes (module docstring)."""
    diff = (p - b).abs()
    pp = F.softmax(p, dim=-1) + _EPS
    qq = F.softmax(b, dim=-1) + _EPS
    kl = torch.sum(pp * torch.log(pp / qq), dim=-1, keepdim=True)
    return diff * kl


def sorted_at(x: torch.Tensor, positions: list[int]) -> list[float]:
    """The values the ascending sort of `x` holds at `positions` (0-based), exactly, without sorting it all."""
    flat = x.reshape(-1)
    n = flat.numel()
    if float(flat.min()) >= 0:  # the usual case: the exact streaming k-th largest is several times faster
        return [kth_largest(flat, n - i) for i in positions]
    return [float(torch.kthvalue(flat, i + 1).values) for i in positions]


@METHODS.register("arcee_fusion")
class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    Params = NoParams
    ModelParams = NoModelParams
    needs_base = True
    uses_deltas = False
    min_models = max_models = 1

    def merge_tensor(self, name, base, tensors, model_params):
        b, p = base.float(), tensors[0].float()
        if b.numel() == 0:
            return b.clone()
        s = importance(p, b)
        idx = (torch.tensor(_QUANTILES) * (s.numel() - 1)).long().tolist()  # float32, as mergekit indexes
        q1, median, q3 = (torch.tensor(v, dtype=torch.float32) for v in sorted_at(s, idx))
        threshold = median + 1.5 * (q3 - q1)
        return b + (p - b) * (s >= threshold).float()
