"""SLERP of two models, per tensor, as mergekit's `slerp` (https://github.com/arcee-ai/mergekit); Shoemake,
"Animating rotation with quaternion curves", SIGGRAPH 1985, https://doi.org/10.1145/325165.325242.

With v0 = the base's tensor and v1 = the other model's, flattened, and d = <v0/|v0|, v1/|v1|> (a norm <= 1e-8
counts as 1):

    |d| > 0.9995 (nearly colinear):  θ = (1 − t) v0 + t v1
    else, Ω = arccos d:             θ = sin((1 − t) Ω)/sin Ω · v0 + sin(t Ω)/sin Ω · v1

t = 0 gives the base, t = 1 the other model. Norms and the dot product are accumulated over the
whole tensor: float32 within a chunk, float64 across chunks (one statistic pass when a tensor is
streamed in chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from merging.base import FULL, METHODS, MergeMethod
from peft_lab.params import Checked, param

_DOT_THRESHOLD = 0.9995
_EPS = 1e-8


@dataclass(frozen=True)
class SlerpParams(Checked):
    """t in [0, 1]: 0 is the base model, 1 the other model."""

    t: float = param(0.5, within="[0, 1]", help="slerp interpolates from the base model (0) to the other model (1)")


@dataclass(frozen=True)
class NoModelParams(Checked):
    """slerp takes no per-model parameters."""


def slerp_coefficients(t: float, dot: float, n0: float, n1: float) -> tuple[float, float]:
    """(c0, c1) with θ = c0·v0 + c1·v1, from <v0, v1> and the squared norms."""
    a, b = math.sqrt(n0), math.sqrt(n1)
    a, b = (a if a > _EPS else 1.0), (b if b > _EPS else 1.0)
    d = min(max(dot / (a * b), -1.0), 1.0)
    if abs(d) > _DOT_THRESHOLD:
        return 1 - t, t
    omega = math.acos(d)
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s


@METHODS.register("slerp")
class Slerp(MergeMethod):
    name = "slerp"
    Params = SlerpParams
    ModelParams = NoModelParams
    needs_base = True
    uses_deltas = False
    min_models = max_models = 1
    streaming = True

    def raw_spec(self, job):
        return {"mode": "slerp", "t": self.at(job).t}

    def next_pass(self, job, index):
        return FULL if index == 0 and job.chunked else None

    def observe(self, job, pass_index, start, base, tensors):
        st = job.state.setdefault("dot", [0.0, 0.0, 0.0])
        v1 = tensors[0]
        st[0] += float(torch.dot(base, v1))
        st[1] += float(torch.dot(base, base))
        st[2] += float(torch.dot(v1, v1))

    def merge_chunk(self, job, start, base, tensors):
        v1 = tensors[0]
        if not job.chunked:
            self.observe(job, 0, start, base, tensors)
        dot, n0, n1 = job.state["dot"]
        c0, c1 = slerp_coefficients(self.at(job).t, dot, n0, n1)
        return base.mul_(c0).add_(v1, alpha=c1)
