"""Passthrough: one model's tensor, copied (optionally scaled), as mergekit's `passthrough`
(https://github.com/arcee-ai/mergekit); stacking layer ranges is the depth up-scaling of Kim et al., "SOLAR 10.7B",
https://arxiv.org/abs/2312.15166.

    θ = scale · θ_1        (scale unset: θ_1 as it is)

With `slices:` it builds frankenmerges: each slice takes a layer range of one model, and the slices stack into a
model that may be deeper than its sources, repeat layers or mix models (`merging.plan`). `scale` is per model
(mergekit: per input); with filters (`[{filter: o_proj, value: 0.5}]`) it scales the tensors that feed the
residual stream in repeated layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from merging.base import METHODS, MergeMethod
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class PassthroughParams(Checked):
    """passthrough takes no shared parameters."""


@dataclass(frozen=True)
class PassthroughModelParams(Checked):
    scale: float | None = param(None, help="a factor the copied tensor is multiplied by (unset: copied as it is)")


@METHODS.register("passthrough")
class Passthrough(MergeMethod):
    name = "passthrough"
    Params = PassthroughParams
    ModelParams = PassthroughModelParams
    needs_base = False
    uses_deltas = False
    base_is_input = True  # as in mergekit, a base_model with `models:` is one more input: refused (one input only)
    min_models = max_models = 1
    streaming = True

    def merge_chunk(self, job, start, base, tensors):
        scale = job.model_params[0].scale
        return tensors[0] if scale is None else tensors[0].mul_(scale)
