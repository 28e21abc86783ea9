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


_BLOCK = 1 << 20  # elements per block of rows: the softmax temporaries stay a few MB, not a few times the tensor


def importance(p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|p − b| times the row's KL divergence between the softmaxes (module docstring), computed a block of rows at a
    time (each row's arithmetic is the same as on the whole tensor)."""
    if p.dim() == 0:
        return _importance(p, b)
    rows, cols = p.reshape(-1, p.shape[-1]), b.reshape(-1, p.shape[-1])
    out = torch.empty_like(rows)
    step = max(1, _BLOCK // max(p.shape[-1], 1))
    for r in range(0, rows.shape[0], step):
        out[r : r + step] = _importance(rows[r : r + step], cols[r : r + step])
    return out.reshape(p.shape)


def _importance(p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    diff = (p - b).abs_()
    pp = F.softmax(p, dim=-1).add_(_EPS)
    qq = F.softmax(b, dim=-1).add_(_EPS)
    kl = torch.sum(pp * torch.log(pp / qq), dim=-1, keepdim=True)
    return diff.mul_(kl)


def sorted_at(x: torch.Tensor, positions: list[int]) -> list[float]:
    """The values the ascending sort of `x` holds at `positions` (0-based), exactly, without sorting it all."""
    flat = x.reshape(-1)
    n = flat.numel()
    if float(flat.min()) >= 0:  # the usual case: the exact streaming k-th largest is several times faster
        # (x >= 0 but maybe -0: the fused count of |x| compares the same; a -0 quantile comes back as +0, which
        # compares equal)
        return [kth_largest(flat, n - i, absolute=True) for i in positions]
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
        keep = s >= threshold
        del s
        return (p - b).mul_(keep).add_(b)  # b + (p − b)·[s >= τ], without a temporary per step
