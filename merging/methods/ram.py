"""RAM (Reinforced Agent Merging) — https://arxiv.org/abs/2601.13572, as mergekit 0.1.5's `ram`.

Per element: entries only one model changes (|τ_t| > ε) keep that model's change whole; entries several models
change take the mean of their changes (not the sum, not the mean over every model):

    θ = θ_0 + Σ_t [|τ_t| > ε] τ_t · ([c = 1] + [c > 1] / c),     c = #{t : |τ_t| > ε}

so a change no other model makes is never diluted by the models that left the entry alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from merging.base import METHODS, MergeMethod
from merging.methods._ram import ram_combine
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class RamParams(Checked):
    """epsilon: a task-vector entry counts as changed when |τ_t| > epsilon."""

    epsilon: float = param(1e-5, within="[0, inf)")


@dataclass(frozen=True)
class NoModelParams(Checked):
    """ram takes no per-model parameters."""


@METHODS.register("ram")
class Ram(MergeMethod):
    name = "ram"
    Params = RamParams
    ModelParams = NoModelParams
    needs_base = True
    uses_deltas = True
    streaming = True

    def merge_chunk(self, job, start, base, tensors):
        return ram_combine(base, tensors, self.at(job).epsilon)
