"""NearSwap: mergekit's `nearswap`, which takes the other model's value where it is near the base's and keeps the
base elsewhere (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; https://github.com/arcee-ai/mergekit).

Element-wise, with a = the base's value and b = the other model's:

    w = clamp(t / max(|a − b|, 1e-6), 0, 1),     θ = w·b + (1 − w)·a

Entries that differ by at most t take b; farther ones move toward b by t/|a − b| of the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.base import METHODS, MergeMethod
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class NearSwapParams(Checked):
    """t: the distance below which the other model's value is taken whole."""

    t: float = param(1e-4, within="[0, inf)", help="the closeness threshold; 0 keeps the base")


@dataclass(frozen=True)
class NoModelParams(Checked):
    """nearswap takes no per-model parameters."""


@METHODS.register("nearswap")
class NearSwap(MergeMethod):
    name = "nearswap"
    Params = NearSwapParams
    ModelParams = NoModelParams
    needs_base = True
    uses_deltas = False
    min_models = max_models = 1
    streaming = True

    def merge_chunk(self, job, start, base, tensors):
        b = tensors[0]
        absdiff = torch.sub(base, b).abs_().clamp_(min=1e-6)
        w = (self.at(job).t / absdiff).clamp_(0, 1)  # `scalar / tensor`, as mergekit writes it (a reciprocal)
        return b.mul_(w).add_(base.mul_(1 - w))
