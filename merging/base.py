"""The merge-operator interface.

A method is one file under `merging/methods/` (module name = registry key = `conf/method/<name>.yaml`): a
frozen parameters dataclass (its Hydra schema: a `peft_lab.params.Checked` whose annotations and `param(...)`
metadata say what each value takes; the recipe builds it with `peft_lab.params.build`), an optional
per-model parameters dataclass (mergekit's `models[i].parameters`: weight, density, ...), and a per-tensor
function computed in float32. Methods that need a view of the whole model first (a global TIES threshold,
Fisher information, AdaMerging's learned coefficients) implement `prepare`, whose result the per-tensor
function reads from `self`.

Two ways to write the per-tensor function:

- `merge_tensor(name, base, tensors, model_params)`: whole tensors in, merged tensor out. The executor loads
  each tensor whole (float32) for such methods. Simple; memory is a few copies of the largest tensor.
- the streaming protocol (`streaming = True`): the executor hands flat float32 *chunks* of each tensor to
  `merge_chunk`, after optional statistic passes (`next_pass` / `observe`) for methods whose per-tensor result
  depends on the whole tensor (a magnitude threshold, a norm). Peak memory is then a few chunks whatever the
  model, and `merge_tensor` comes for free (one chunk). Results must not depend on the chunking, except for
  float32 rounding in whole-tensor statistics accumulated chunk by chunk (slerp's norms, DARE's L1 rescale);
  the contract tests check it for every registered method.

The executor (`merging.run`) validates inputs, calls `prepare(inputs)` once, then streams: for each tensor it
reads the base and the models' tensors (or task vectors), calls the method, casts, writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from merging.stream import FULL, MERGE, SAMPLE, drive
from peft_lab.params import Checked, param_key
from peft_lab.registry import Registry
from peft_lab.tree import Tree

__all__ = ["METHODS", "MergeMethod", "MergeInputs", "ModelParams", "TensorJob", "SAMPLE", "FULL", "MERGE", "param_key"]

METHODS: Registry[type[MergeMethod]] = Registry("merge method", package="merging.methods")


@dataclass(frozen=True)
class ModelParams(Checked):
    """Per-model parameters (mergekit `models[i].parameters`). Methods extend this with their own fields."""

    weight: float = 1.0


@dataclass
class TensorJob:
    """What a streaming method knows about the tensor being merged.

    Attributes:
        name: the tensor's name (state-dict key).
        shape: its shape; chunks are flat slices of the row-major tensor.
        model_params: per-model parameters for this tensor, one per model.
        chunked: True when the tensor arrives in more than one chunk (statistic passes then re-read it).
        sample_rate: in a `SAMPLE` pass, the fraction of the tensor's elements that is delivered.
        state: the method's scratch space for this tensor (statistics between passes).
        labels: a readable name per model (its path), for messages.
        params: the method's parameters for this tensor (a recipe's per-layer gradients and filters make them
            differ from tensor to tensor); None: the method's own `params` (see `MergeMethod.at`).
    """

    name: str
    shape: tuple[int, ...]
    model_params: Sequence[Any]
    chunked: bool = False
    sample_rate: float = 1.0
    state: dict[str, Any] = field(default_factory=dict)
    labels: Sequence[str] = ()
    params: Any = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


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
        scan: set by the executor: `scan(fn, kind=FULL, names=None)` streams every float tensor (or those named)
            chunk by chunk and calls
            `fn(job, start, base_chunk, chunks)` with float32 flat chunks (task vectors when the method
            `uses_deltas`, else the models' tensors); `kind=SAMPLE` delivers a subset (`job.sample_rate`).
            Whole-model statistics (a global threshold) use it without ever holding the model in memory.
    """

    base: Tree | None
    models: list[Tree]
    deltas: list[Tree]
    model_params: list[Any]
    labels: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    scan: Callable[..., None] | None = None


class MergeMethod:
    """Base class. Subclasses set `name`, `Params` (and `ModelParams` if they take per-model parameters)."""

    name: ClassVar[str]
    Params: ClassVar[type] = type("NoParams", (), {})
    ModelParams: ClassVar[type] = ModelParams
    needs_base: ClassVar[bool] = True
    # a base is optional and, when given, is the origin (never one of the models: a `models` entry equal to it is
    # the base, as for methods that need one); e.g. nuslerp, multislerp
    optional_base: ClassVar[bool] = False
    # True: merge_tensor receives task vectors τ_t = θ_t − θ_0; False: the models' tensors θ_t themselves
    uses_deltas: ClassVar[bool] = True
    # mergekit adds `base_model` to the inputs when a method that does not treat it specially (linear) gets one
    base_is_input: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    # the executor feeds chunks through next_pass/observe/merge_chunk instead of calling merge_tensor
    streaming: ClassVar[bool] = False
    # its parameters may vary per tensor (mergekit's gradients and filters); data-driven methods learn or
    # compute model-wide quantities from one set of parameters and refuse them
    per_tensor_params: ClassVar[bool] = True
    # data-driven: `prepare` needs examples of each task (a recipe's `data` block) or statistics computed from them
    # (Fisher, AdaMerging, RegMean); the benchmark runs these with its own data loops, every other method as is
    needs_data: ClassVar[bool] = False

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()

    def prepare(self, inputs: MergeInputs) -> None:
        """Whole-model statistics before streaming (default: nothing)."""

    def at(self, job: TensorJob) -> Any:
        """The method's parameters for the tensor of `job`: per-tensor code reads these, never `self.params`
        (which holds the values outside any gradient or filter: what `prepare` sees)."""
        return job.params if job.params is not None else self.params

    def check_settings(self, shared_scopes: Sequence[Mapping[str, Any]], model_scopes: Sequence[Any]) -> None:
        """Refuse per-tensor settings (gradients, filters) the method cannot honour, e.g. a per-layer density with
        a model-wide trim; raise UserError. The scopes are `merging.settings` scopes, most specific first."""

    def check_models(self, model_params: Sequence[Any], labels: Sequence[str]) -> None:
        """Validate the per-model parameters together (e.g. weights that must not sum to 0); raise UserError."""

    # ----------------------------------------------------------------------------------------------
    # Whole-tensor form
    # ----------------------------------------------------------------------------------------------
    def merge_tensor(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        model_params: Sequence[Any],
    ) -> torch.Tensor:
        """Merge one tensor. All inputs are float32; returns the merged float32 tensor (the full parameter,
        not a delta: methods working on task vectors add the base back themselves). Inputs are not modified.

        Streaming methods get this for free: the whole tensor is one chunk of `merging.stream.drive`."""
        if not self.streaming:
            raise NotImplementedError(f"{type(self).__name__} must implement merge_tensor or the streaming protocol")
        ref = base if base is not None else tensors[0]
        if ref.numel() == 0:
            return ref.float().clone()
        b = None if base is None else base.reshape(-1)
        flat = [t.reshape(-1) for t in tensors]

        def read(s: int, e: int):
            return None if b is None else b[s:e].clone(), [t[s:e].clone() for t in flat]

        job = TensorJob(name, tuple(ref.shape), model_params)
        return next(drive(self, job, read, ref.numel())).reshape(ref.shape)

    # ----------------------------------------------------------------------------------------------
    # Streaming form
    # ----------------------------------------------------------------------------------------------
    def next_pass(self, job: TensorJob, index: int) -> str | None:
        """Called before statistic pass `index` (0, 1, ...): its kind, `SAMPLE` or `FULL`, or None when the
        method is ready to merge (default: no passes). Deciding one pass at a time lets a method ask for
        another round when its statistics need it. When the tensor is a single chunk (`job.chunked` False)
        the executor reads it once and every pass sees that whole chunk."""
        return None

    def raw_ok(self, job: TensorJob, kind: str) -> bool:
        """Whether this pass (`FULL`, or `MERGE` for the merge pass) of a streamed tensor may receive task vectors
        undecoded (`merging.fused.RawDelta`: raw bfloat16 bits and the base, which the fused loops decode a block
        at a time) instead of float32 tensors. Default: no."""
        return False

    def chunk_unit(self, job: TensorJob) -> int:
        """Chunks of this tensor hold a whole multiple of this many elements (default 1: any split). A method whose
        statistics are per row (`shape[-1]` elements) returns the row length, so that no row straddles two chunks;
        the pass driver then rounds the chunk size down to a multiple of it (at least one unit)."""
        return 1

    def observe(
        self,
        job: TensorJob,
        pass_index: int,
        start: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
    ) -> None:
        """Accumulate statistics of one chunk (flat float32 slices starting at element `start`) into
        `job.state`. Must not modify the chunks."""

    def merge_chunk(
        self,
        job: TensorJob,
        start: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Merge the flat slice `[start, start + len)` of the tensor; returns float32 of the same length.
        The chunks are the executor's scratch: the method may modify them in place."""
        raise NotImplementedError

    def artifacts(self) -> dict[str, str]:
        """Files to write beside the merged model after `prepare` (file name -> text), e.g. AdaMerging's learned
        coefficients. Default: none."""
        return {}

    def raw_spec(self, job: TensorJob) -> dict | None:
        """For methods with a fused pass over raw bfloat16 bits (`merging.fused`): its arguments for this tensor,
        {"mode": "linear" | "task_arithmetic", "weights", "normalize", "lam"} (`raw_merge`, bit-identical to
        `merge_chunk`) or {"mode": "slerp", "t"} (`raw_dot3` + `raw_lerp`: norms summed in float64, so equal to
        `merge_chunk` up to float32 rounding). The executor then merges bfloat16 files without float32 copies
        of the inputs. None (the default): `merge_chunk`."""
        return None

    @classmethod
    def param_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Params)] if dataclasses.is_dataclass(cls.Params) else []
