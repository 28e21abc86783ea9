"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
https://arxiv.org/abs/2111.09832).

Per parameter, a Fisher-weighted average of the models (official `model_merging/merging.py`):

    θ* = Σ_j c_j F̃_j ⊙ θ_j / Σ_j c_j F̃_j,    c_j = λ_j / ||F_j||₂ (normalize) or λ_j,   F̃_j = max(F_j, floor)

`F_j` is model j's diagonal Fisher (`merging.datadriven.fisher.diagonal_fisher`), given as a saved tree per model
(`models[i].parameters.fisher: PATH`, reusable across merges) or computed in `prepare` from the examples of a
`data` config. Decisions where the official code is silent or unsafe:
- the floor applies to every model (the official default floors only the first, "target" model; set
  `favor_target=true` for that), so a denominator is never 0: no NaN, even for all-zero Fishers;
- a model whose Fisher is all zero is not normalised (its norm is 0: the official code gives inf·0 = NaN);
- tensors no model has a Fisher for are merged as the plain weighted average (logged once);
- per-task heads (`heads` patterns) are not merged: the output keeps the first model's head, as the official
  code does (the heads of all models are written beside the output by the executor when it supports it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merging.base import METHODS, MergeInputs, MergeMethod
from peft_lab.errors import UserError
from peft_lab.params import Checked, param
from peft_lab.tree import Tree, load_tree, matches, save_tree
from peft_lab.tree.safetensors import TREE_KIND_KEY

__all__ = ["Fisher", "FisherParams", "FisherModelParams", "fisher_merge", "save_fisher", "fisher_norm"]

log = logging.getLogger(__name__)

FISHER_KIND = "fisher"


@dataclass(frozen=True)
class FisherParams(Checked):
    normalize: bool = True  # official: divide each model's weight by the L2 norm of its Fisher
    floor: float = param(1e-6, within="(0, inf)", help="the official minimum Fisher value; keeps denominators > 0")
    favor_target: bool = False  # floor only the first model's Fisher (official default for 2-model merges)
    # how the Fisher is computed when it is not given as a file (see merging/datadriven/fisher.py)
    labels: str = param("sample", choices=("sample", "expected", "empirical"))
    num_examples: int = param(256, within="[1, inf)")  # official 4096 (train split); 256 keeps a CPU merge to minutes
    batch_size: int = param(16, within="[1, inf)")
    chunk_size: int = param(16, within="[1, inf)")
    # how per-example gradients are formed (merging/datadriven/fisher.py)
    engine: str = param("auto", choices=("auto", "hooks", "vmap"))
    seed: int = 0
    # per-task heads: not merged, the first model's is kept (null = none)
    heads: tuple[str, ...] = param(("classifier.*", "score.*"), aliases={None: ()})


@dataclass(frozen=True)
class FisherModelParams(Checked):
    weight: float = param(1.0, within="[0, inf)")
    fisher: str | None = None  # a saved Fisher tree (safetensors) for this model; computed from `data` if absent


def fisher_merge(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor | None],
    coeffs: Sequence[float],
    *,
    floor: float = 1e-6,
    favor_target: bool = False,
) -> torch.Tensor:
    """Fisher-weighted average of one tensor.

    Args:
        tensors: T tensors θ_j of one shape.
        fishers: T Fishers of that shape (None: this model has none for the tensor, taken as 0 before the floor).
        coeffs: T non-negative per-model coefficients c_j (already divided by ||F_j|| when normalising).
        floor: F̃ = max(F, floor) for every model (or only model 0 with `favor_target`).
    Returns:
        Σ_j c_j F̃_j θ_j / Σ_j c_j F̃_j (float32). Where the denominator is 0 (only possible with
        favor_target and zero coefficients), the plain average of the tensors.
    """
    num = torch.zeros(tensors[0].shape, dtype=torch.float32)
    den = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for j, (theta, f, c) in enumerate(zip(tensors, fishers, coeffs, strict=True)):
        f = torch.zeros_like(num) if f is None else f.float()
        if j == 0 or not favor_target:
            f = f.clamp_min(floor)
        w = c * f
        num += w * theta.float()
        den += w
    safe = den > 0
    out = num / torch.where(safe, den, torch.ones_like(den))
    if not bool(safe.all()):
        out = torch.where(safe, out, torch.stack([t.float() for t in tensors]).mean(0))
    return out


def fisher_norm(fisher: Tree, names: Sequence[str] | None = None) -> float:
    """L2 norm of a Fisher tree over `names` (default all), reading one tensor at a time."""
    total = 0.0
    for n in names if names is not None else list(fisher):
        if n in fisher:
            total += float(fisher[n].dense(torch.float32).double().square().sum())
    return math.sqrt(total)


def save_fisher(fisher: dict[str, torch.Tensor] | Tree, path, *, metadata: dict[str, str] | None = None) -> None:
    """Save a Fisher as a safetensors tree (`load_tree` reads it back), marked as a Fisher in its header."""
    tree = fisher if isinstance(fisher, Tree) else Tree(fisher, source="fisher")
    save_tree(tree, path, dtype=torch.float32, metadata={TREE_KIND_KEY: FISHER_KIND, **(metadata or {})})


@METHODS.register("fisher")
class Fisher(MergeMethod):
    """Fisher-weighted averaging of full models (or of base + adapter deltas)."""

    name = "fisher"
    Params = FisherParams
    ModelParams = FisherModelParams
    needs_base = False
    uses_deltas = False
    min_models = 1
    streaming = True
    per_tensor_params = False
    needs_data = True

    def __init__(self, params: FisherParams | None = None):
        super().__init__(params)
        self.fishers: list[Tree | None] = []
        self.coeffs: list[float] = []
        self._warned: set[str] = set()
        self.fallback: list[str] = []

    # -- prepare ------------------------------------------------------------------------------------
    def prepare(self, inputs: MergeInputs) -> None:
        p: FisherParams = self.params
        T = len(inputs.models)
        given = list(inputs.extra.get("fishers") or [None] * T)
        if len(given) != T:
            raise UserError(f"fisher: {len(given)} Fisher trees were given for {T} models.")
        fishers: list[Tree | None] = []
        need_data = []
        for j, mp in enumerate(inputs.model_params):
            path = getattr(mp, "fisher", None)
            if given[j] is not None:
                f = given[j] if isinstance(given[j], Tree) else Tree(given[j], source=f"fisher of {inputs.labels[j]}")
            elif path:
                f = load_tree(path)
            else:
                f = None
                need_data.append(j)
            fishers.append(f)
        if need_data:
            if inputs.extra.get("data") is None:
                raise UserError(
                    "fisher needs each model's Fisher information: give `models[i].parameters.fisher: PATH` (a saved "
                    "Fisher tree) or a `data` config naming the examples of each model's task "
                    f"(missing for: {', '.join(inputs.labels[j] for j in need_data)})."
                )
            from merging.datadriven.examples import fishers_from_data  # lazy: needs transformers/datasets

            computed = fishers_from_data(inputs, p, need_data)
            for j, f in zip(need_data, computed, strict=True):
                fishers[j] = f
        names = [n for n in (inputs.models[0] if inputs.models else []) if not self._is_head(n)]
        for j, f in enumerate(fishers):
            if f is not None:
                self._check_fisher(f, inputs.models[j], inputs.labels[j])
        weights = [float(getattr(mp, "weight", 1.0)) for mp in inputs.model_params]
        if sum(weights) <= 0:
            raise UserError("fisher: the model weights sum to 0; give at least one model a positive weight.")
        coeffs = []
        for j, f in enumerate(fishers):
            norm = fisher_norm(f, names) if (p.normalize and f is not None) else 0.0
            if p.normalize and f is not None and norm == 0.0:
                log.warning(
                    "fisher: the Fisher of %s is zero everywhere; its weight is not normalised.", inputs.labels[j]
                )
            coeffs.append(weights[j] / norm if norm > 0 else weights[j])
        self.fishers, self.coeffs = fishers, coeffs
        self.fallback = [n for n in names if all(f is None or n not in f for f in fishers)]
        if self.fallback:
            log.info(
                "fisher: %d tensor(s) have no Fisher in any model and are merged as the plain weighted average: %s%s",
                len(self.fallback),
                ", ".join(self.fallback[:8]),
                " ..." if len(self.fallback) > 8 else "",
            )

    def _is_head(self, name: str) -> bool:
        return bool(self.params.heads) and matches(name, list(self.params.heads))

    @staticmethod
    def _check_fisher(f: Tree, model: Tree, label: str) -> None:
        bad = [
            f"{n} {tuple(f[n].shape)} vs model {tuple(model[n].shape)}"
            for n in f
            if n in model and tuple(f[n].shape) != tuple(model[n].shape)
        ]
        unknown = [n for n in f if n not in model]
        if bad or unknown:
            raise UserError(
                f"fisher: the Fisher given for {label} ({f.source}) does not fit the model: "
                + "; ".join(bad[:5] + [f"{n} (not in the model)" for n in unknown[:5]])
                + ". Recompute it for this model."
            )

    # -- per tensor ---------------------------------------------------------------------------------
    def merge_chunk(self, job, start: int, base: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Element-wise, on the matching flat slice of each model's Fisher (read once per tensor)."""
        if self._is_head(job.name):
            return tensors[0]
        if "fishers" not in job.state:
            fishers = self.fishers or [None] * len(tensors)  # not prepared: no Fisher anywhere
            job.state["fishers"] = [
                None if (f is None or job.name not in f) else f[job.name].dense(torch.float32).reshape(-1)
                for f in fishers
            ]
        fs = [None if x is None else x[start : start + tensors[0].numel()] for x in job.state["fishers"]]
        if all(x is None for x in fs):
            w = self.coeffs_raw(job.model_params)
            return sum(wj * t for wj, t in zip(w, tensors, strict=True)) / sum(w)
        return fisher_merge(tensors, fs, self.coeffs, floor=self.params.floor, favor_target=self.params.favor_target)

    @staticmethod
    def coeffs_raw(model_params: Sequence[Any]) -> list[float]:
        return [float(getattr(mp, "weight", 1.0)) for mp in model_params]
