"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
https://arxiv.org/abs/2310.02575), task-wise and layer-wise, and AdaMerging++ (on TIES-processed vectors).

    θ^l(λ) = θ_0^l + Σ_k clamp(λ_k^l, 0, 1) · v_k^l        (task-wise: λ_k^l = λ_k for every tensor l)

v_k = τ_k (AdaMerging) or TIES(τ)_k (AdaMerging++: the official TIES with global top-`density` trim per task,
the elected sign with the model-wide majority for zero sums, the sign-agreeing entries kept, "dis-sum"), computed
by the same streamed TIES as `peft-lab merge` (`merging.methods._gta`). λ is learned in `prepare` by minimising
the entropy of each task's predictions on unlabeled examples (`merging.datadriven.adamerging`); official defaults
(EnnengYang/AdaMerging): λ init 0.3, clamp [0, 1], Adam lr 1e-3, betas (0.9, 0.999), 500 steps, 2 batches of 16
per task per step, drawn as the official loop does: a fresh shuffle of the task's examples every step, its first
batches (`data.batch_size`, when the data config sets it, overrides `batch_size`, as for Fisher). The merge
itself then streams: every operation is element-wise once λ is known.
Per-task heads (`heads` patterns) are not merged: the output keeps the first model's head.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.base import METHODS, MergeInputs, MergeMethod, TensorJob
from merging.datadriven.adamerging import AdaResult, learn_from_data
from merging.methods._gta import GTAModelParams
from merging.methods.ties import Ties, TiesParams
from peft_lab.errors import UserError
from peft_lab.params import Checked, param
from peft_lab.tree import matches

__all__ = ["AdaMerging", "AdaMergingParams", "official_ties", "ties_task_vectors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaMergingParams(Checked):
    # "task": one λ per task; "layer": one λ per (tensor, task)
    granularity: str = param("layer", choices=("task", "layer"))
    init: float = 0.3
    clamp_min: float = 0.0
    clamp_max: float = 1.0
    lr: float = param(1e-3, within="(0, inf)")
    beta1: float = param(0.9, within="[0, 1)")
    beta2: float = param(0.999, within="[0, 1)")
    steps: int = param(500, within="[0, inf)")
    batch_size: int = param(16, within="[1, inf)")
    # per task: the official loop takes 2 batches of 16 per task per step
    batches_per_step: int = param(2, within="[1, inf)")
    ties: bool = False  # AdaMerging++: learn λ over TIES-processed task vectors
    # TIES trim: keep the top 20% magnitudes of each task vector (global over the model)
    density: float = param(0.2, within="(0, 1]")
    seed: int = 0
    # per-task heads: frozen, never merged (null = none)
    heads: tuple[str, ...] = param(("classifier.*", "score.*"), aliases={None: ()})

    def __post_init__(self):
        super().__post_init__()
        if not self.clamp_min <= self.init <= self.clamp_max:
            raise UserError(
                f"adamerging: init={self.init} must lie in [clamp_min, clamp_max] = "
                f"[{self.clamp_min}, {self.clamp_max}]."
            )


def official_ties(density: float, n_models: int) -> tuple[Ties, list[GTAModelParams]]:
    """The official TIES as AdaMerging++ uses it: global trim, majority sign, dis-sum, weights 1."""
    ties = Ties(TiesParams(lambda_=1.0, normalize=False, trim_scope="global", zero_sign="majority"))
    return ties, [GTAModelParams(density=density)] * n_models


def ties_task_vectors(inputs: MergeInputs, names: Sequence[str], density: float) -> list[dict[str, torch.Tensor]]:
    """AdaMerging++'s task vectors: per task, name -> TIES(τ)_k (float32), with thresholds and the majority sign
    computed over `names` by the streamed TIES (their plain sum is TIES's dis-sum)."""
    ties, mp = official_ties(density, len(inputs.deltas))
    ties.prepare(dataclasses.replace(inputs, model_params=mp), names=names)
    out: list[dict[str, torch.Tensor]] = [{} for _ in inputs.deltas]
    for n in names:
        shape = tuple(inputs.base[n].shape)
        taus = [
            d[n].dense(torch.float32).reshape(-1) if n in d else torch.zeros(math.prod(shape)) for d in inputs.deltas
        ]
        for k, c in enumerate(ties.components(TensorJob(n, shape, mp), 0, taus)):
            out[k][n] = c.reshape(shape)
    return out


@METHODS.register("adamerging")
class AdaMerging(MergeMethod):
    """Learns λ in `prepare` (from `data`: unlabeled examples of each model's task), then merges per chunk."""

    name = "adamerging"
    Params = AdaMergingParams
    needs_base = True
    uses_deltas = True
    min_models = 1
    streaming = True
    per_tensor_params = False
    needs_data = True

    def __init__(self, params: AdaMergingParams | None = None):
        super().__init__(params)
        self.result: AdaResult | None = None
        self.row: dict[str, int] = {}
        self.tasks: list[str] = []
        self._ties: Ties | None = None
        self._ties_params: list[GTAModelParams] = []

    def is_head(self, name: str) -> bool:
        return bool(self.params.heads) and matches(name, list(self.params.heads))

    def prepare(self, inputs: MergeInputs) -> None:
        p: AdaMergingParams = self.params
        if inputs.base is None:
            raise UserError("adamerging needs a base model (the pretrained model the others were fine-tuned from).")
        self.tasks = list(inputs.labels)
        floats = [n for n, leaf in inputs.base.items() if leaf.dtype.is_floating_point]
        names = [n for n in floats if not self.is_head(n)]
        if p.ties:
            self._ties, self._ties_params = official_ties(p.density, len(inputs.deltas))
            self._ties.prepare(dataclasses.replace(inputs, model_params=self._ties_params), names=names)
        if "lambdas" in inputs.extra:  # coefficients given (e.g. learned before): no training
            lam = torch.as_tensor(inputs.extra["lambdas"], dtype=torch.float32)
            self.result = AdaResult(lam.clamp(p.clamp_min, p.clamp_max), names)
        else:
            vectors = self._vectors(inputs, names)
            self.result = learn_from_data(inputs, p, vectors, names, [n for n in floats if self.is_head(n)])
        lam = self.result.lambdas
        if lam.shape[1] != len(inputs.deltas) or lam.shape[0] not in (1, len(names)):
            raise UserError(
                f"adamerging: coefficients of shape {tuple(lam.shape)} do not fit {len(names)} tensors x "
                f"{len(inputs.deltas)} models."
            )
        self.row = {n: i for i, n in enumerate(self.result.names)} if lam.shape[0] > 1 else {}
        log.info("adamerging: learned %s coefficients: %s", p.granularity, _summary(lam))

    def _vectors(self, inputs: MergeInputs, names: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Per task, the vectors λ multiplies, whole tensors in memory (the learning loop needs the model)."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in inputs.deltas]
        for n in names:
            shape = tuple(inputs.base[n].shape)
            taus = [
                d[n].dense(torch.float32).reshape(-1) if n in d else torch.zeros(math.prod(shape))
                for d in inputs.deltas
            ]
            for k, v in enumerate(self.task_vectors(TensorJob(n, shape, []), 0, taus)):
                out[k][n] = v.reshape(shape)
        return out

    def task_vectors(self, job: TensorJob, start: int, taus: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The vectors λ multiplies for one chunk: τ_k, or their TIES versions (AdaMerging++)."""
        if self._ties is None:
            return list(taus)
        return self._ties.components(TensorJob(job.name, job.shape, self._ties_params), start, taus)

    def merge_chunk(
        self, job: TensorJob, start: int, base: torch.Tensor | None, tensors: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        if self.is_head(job.name):
            return base.add_(tensors[0])  # the first model's head, as Fisher merging does
        if self.result is None:  # not prepared (no data): the coefficients stay at their init, i.e. task arithmetic
            row = [float(self.params.init)] * len(tensors)
        else:
            lam = self.result.lambdas
            row = (lam[self.row[job.name]] if self.row else lam[0]).tolist()
        out = base
        for c, v in zip(row, self.task_vectors(job, start, tensors), strict=True):
            out += c * v
        return out

    def artifacts(self) -> dict[str, str]:
        """The learned coefficients (JSON, plot-ready) beside the merged model."""
        if self.result is None:
            return {}
        return {"adamerging_coefficients.json": self.result.to_json(self.tasks, self.params)}


def _summary(lam: torch.Tensor) -> str:
    if lam.shape[0] == 1:
        return ", ".join(f"{x:.3f}" for x in lam[0].tolist())
    m = lam.mean(0)
    return "mean per task " + ", ".join(f"{x:.3f}" for x in m.tolist())
