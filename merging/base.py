"""The merge-operator interface.

A method is one file under `merging/methods/` (module name = registry key = `conf/method/<name>.yaml`): a
frozen parameters dataclass (its Hydra schema, validated in `__post_init__` with `UserError`), an optional
per-model parameters dataclass (mergekit's `models[i].parameters`: weight, density, ...), and a per-tensor
function computed in float32. Methods that need a view of the whole model first (a global TIES threshold,
Fisher information, AdaMerging's learned coefficients) implement `prepare`, whose result the per-tensor
function reads from `self`.

The executor (`merging.run`) validates inputs, calls `prepare(inputs)` once, then streams: for each tensor it
loads the base and the models' tensors (or task vectors), calls `merge_tensor`, casts, writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from peft_lab.registry import Registry
from peft_lab.tree import Tree

__all__ = ["METHODS", "MergeMethod", "MergeInputs", "ModelParams"]

METHODS: Registry[type["MergeMethod"]] = Registry("merge method", package="merging.methods")


@dataclass(frozen=True)
class ModelParams:
    """Per-model parameters (mergekit `models[i].parameters`). Methods extend this with their own fields."""

    weight: float = 1.0


@dataclass
class MergeInputs:
    """Everything `prepare` may look at. Trees are lazy: reading a leaf reads (or computes) one tensor.

    Attributes:
        base: the base model's tree (None for methods that take none, e.g. linear without base).
        models: each input model's full tree (a PEFT adapter input appears as base + its delta).
        deltas: each model's task vector `model − base`, keyed like `base` (structured leaves kept as they are).
        model_params: per-model parameters, one per model, already validated.
        labels: a readable name per model (its path), for messages.
        extra: method-specific inputs from the recipe (e.g. the `data` config of data-driven methods).
    """

    base: Tree | None
    models: list[Tree]
    deltas: list[Tree]
    model_params: list[Any]
    labels: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


class MergeMethod:
    """Base class. Subclasses set `name`, `Params` (and `ModelParams` if they take per-model parameters)."""

    name: ClassVar[str]
    Params: ClassVar[type] = type("NoParams", (), {})
    ModelParams: ClassVar[type] = ModelParams
    needs_base: ClassVar[bool] = True
    # True: merge_tensor receives task vectors τ_t = θ_t − θ_0; False: the models' tensors θ_t themselves
    uses_deltas: ClassVar[bool] = True
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()

    def prepare(self, inputs: MergeInputs) -> None:
        """Whole-model statistics before streaming (default: nothing)."""

    def merge_tensor(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        model_params: Sequence[Any],
    ) -> torch.Tensor:
        """Merge one tensor. All inputs are float32; returns the merged float32 tensor (the full parameter,
        not a delta: methods working on task vectors add the base back themselves)."""
        raise NotImplementedError

    @classmethod
    def param_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Params)] if dataclasses.is_dataclass(cls.Params) else []
