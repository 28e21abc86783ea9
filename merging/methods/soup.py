"""Sparse model soup — Zimmer et al., "Sparse Model Soups", https://arxiv.org/abs/2306.16788.

    θ = Σ_i w_i θ_i / Σ_i w_i   over candidates retrained from one pruned model with one sparsity mask

The candidates must share their mask: every entry that is exactly 0 in one is 0 in all (checked per tensor
while streaming; a mismatch names the tensor and model and aborts the merge), so the soup keeps the mask.
A `base_model`, if given, is not averaged in: it supplies config, tokenizer and non-float tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging import fused
from merging.base import METHODS, MergeMethod
from merging.methods.linear import NonNegativeWeight, weighted_average
from peft_lab.errors import UserError
from peft_lab.params import Checked


def _words(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as int64 words when its length allows (torch.equal on them is about 2x faster than on bools)."""
    flat = mask.reshape(-1)
    return flat.view(torch.int64) if flat.numel() % 8 == 0 else flat


@dataclass(frozen=True)
class SoupParams(Checked):
    """`check_masks`: refuse candidates whose zero patterns differ (set false for dense soups)."""

    check_masks: bool = True


@METHODS.register("soup")
class Soup(MergeMethod):
    name = "soup"
    Params = SoupParams
    ModelParams = NonNegativeWeight
    needs_base = False
    uses_deltas = False
    streaming = True

    def check_models(self, model_params, labels) -> None:
        if sum(p.weight for p in model_params) == 0:
            raise UserError("The weights of the soup's models sum to 0; give at least one a positive weight.")

    def merge_chunk(self, job, start, base, tensors):
        if self.at(job).check_masks and len(tensors) > 1:
            if fused.available() and fused.first_mask_mismatch(tensors)[0] < 0:  # one pass when the masks agree
                return weighted_average(tensors, [p.weight for p in job.model_params], True)
            zero = _words(tensors[0] == 0)
            for i, x in enumerate(tensors[1:], 1):
                z = _words(x == 0)
                if not torch.equal(z, zero):
                    z, zero = z.view(torch.bool), zero.view(torch.bool)
                    n = int(torch.count_nonzero(z != zero))
                    at = start + int(torch.nonzero(z != zero)[0])
                    label = job.labels[i] if len(job.labels) > i else f"model {i}"
                    raise UserError(
                        f"soup: {label} and {job.labels[0] if job.labels else 'model 0'} have different sparsity "
                        f"masks in tensor {job.name} ({n} entries differ in this chunk, the first at flat index {at}). "
                        "A sparse soup averages candidates retrained with one shared mask; check the inputs, or pass "
                        "check_masks=false to average them anyway."
                    )
        return weighted_average(tensors, [p.weight for p in job.model_params], True)
