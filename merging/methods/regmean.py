"""RegMean — Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
https://arxiv.org/abs/2212.09849; RegMean++ — Nguyen et al., https://arxiv.org/abs/2508.03121.

Each Linear layer's weight is the least-squares merge of the models' layers on their tasks' inputs; every other tensor
is the plain average of the models (per-task heads, `heads`, are not merged: the first model's are kept):

    W = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹,   G̃_i = diag(G_i) + α (G_i − diag(G_i)),   G_i = X_iᵀX_i / n_i

G_i is the Gram matrix of the layer's inputs X_i (n_i rows) when model i runs on its task's examples
(merging/datadriven/gram.py). The Grams come from a file per model (`models[i].parameters.gram: PATH`, a tree of
(in, in) matrices keyed by the Linear weights' names, written by `save_gram` or by a merge with `save_grams`), or are
computed before streaming from the examples of the recipe's `data` config: from each model itself (RegMean) or, with
`plusplus: true`, from the merged model block by block (RegMean++: merging/datadriven/regmean_data.py). A tensor is
merged from the Grams of its own layer only, so the merge holds one layer's Grams at a time.

Decisions where the official code and FusionBench are silent or differ: padding positions of a text batch are not
input rows (FusionBench counts them); the solve is in float64 (least squares when Σ G̃ is singular), not a float32
inverse; Linear layers without Grams in every model are averaged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.base import METHODS, MergeInputs, MergeMethod
from merging.datadriven.gram import regmean_solve
from peft_lab.errors import UserError
from peft_lab.params import Checked, param
from peft_lab.tree import Tree, load_tree, matches, save_tree
from peft_lab.tree.safetensors import TREE_KIND_KEY

__all__ = ["RegMean", "RegMeanParams", "regmean_merge", "save_gram", "GRAM_KIND"]

log = logging.getLogger(__name__)

GRAM_KIND = "gram"


@dataclass(frozen=True)
class RegMeanParams(Checked):
    """α (`alpha`) shrinks the Grams' off-diagonal entries; `plusplus` takes the inputs from the merged model
    (RegMean++); `num_examples` and `batch_size` size the Gram computation; `heads` are per-task heads (not merged);
    `save_grams`: a directory to write the computed Grams to (gram_<i>.safetensors, reusable as
    `models[i].parameters.gram`)."""

    alpha: float = param(0.95, within="[0, 1]", help="1 keeps the Grams whole; 0 keeps their diagonals only")
    plusplus: bool = False
    num_examples: int = param(256, within="[1, inf)")
    batch_size: int = param(16, within="[1, inf)")
    heads: tuple[str, ...] = param(("classifier.*", "score.*"), aliases={None: ()})
    save_grams: str | None = None


@dataclass(frozen=True)
class RegMeanModelParams(Checked):
    """Per-model `gram`: a saved Gram tree for this model (computed from `data` when absent)."""

    gram: str | None = None


def save_gram(grams: Mapping[str, torch.Tensor] | Tree, path, *, metadata: dict[str, str] | None = None) -> None:
    """Save a model's Grams (Linear weight name -> (in, in) matrix) as a safetensors tree, marked as Grams."""
    tree = grams if isinstance(grams, Tree) else Tree(dict(grams), source="grams")
    save_tree(tree, path, dtype=torch.float32, metadata={TREE_KIND_KEY: GRAM_KIND, **(metadata or {})})


@METHODS.register("regmean")
class RegMean(MergeMethod):
    name = "regmean"
    Params = RegMeanParams
    ModelParams = RegMeanModelParams
    needs_base = False
    uses_deltas = False
    streaming = True
    per_tensor_params = False
    needs_data = True

    def __init__(self, params: RegMeanParams | None = None):
        super().__init__(params)
        self.grams: list[Tree | None] = []

    # -- prepare ------------------------------------------------------------------------------------
    def prepare(self, inputs: MergeInputs) -> None:
        T = len(inputs.models)
        given = list(inputs.extra.get("grams") or [None] * T)
        if len(given) != T:
            raise UserError(f"regmean: {len(given)} Gram trees were given for {T} models.")
        grams: list[Tree | None] = []
        for j, mp in enumerate(inputs.model_params):
            g = given[j]
            if g is None and getattr(mp, "gram", None):
                g = load_tree(mp.gram)
            grams.append(
                g if g is None or isinstance(g, Tree) else Tree(dict(g), source=f"grams of {inputs.labels[j]}")
            )
        need = [j for j, g in enumerate(grams) if g is None]
        if need:
            grams = self._computed(inputs, grams, need)
        for j, g in enumerate(grams):
            self._check(g, inputs.models[j], inputs.labels[j])
        self.grams = grams

    def _computed(self, inputs: MergeInputs, grams: list, need: list[int]) -> list[Tree]:
        p: RegMeanParams = self.params
        if inputs.extra.get("data") is None:
            raise UserError(
                "regmean needs each model's Gram matrices: give `models[i].parameters.gram: PATH` (a saved Gram tree) "
                "or a `data` config naming the examples of each model's task "
                f"(missing for: {', '.join(inputs.labels[j] for j in need)})."
            )
        from merging.datadriven import regmean_data  # lazy: needs transformers/datasets

        if p.plusplus:
            if len(need) != len(grams):
                raise UserError(
                    "regmean with plusplus=true computes every model's Grams from the merged model: give a `data` "
                    "config for all models and no `gram` files (or give Gram files for all of them)."
                )
            computed = regmean_data.grams_plus_plus(inputs, p)
        else:
            computed = regmean_data.grams_from_data(inputs, p, need)
        for j, g in zip(need, computed, strict=True):
            grams[j] = g
            if p.save_grams:
                out = Path(p.save_grams)
                out.mkdir(parents=True, exist_ok=True)
                save_gram(g, out / f"gram_{j}.safetensors", metadata={"model": inputs.labels[j]})
                log.info("regmean: wrote the Grams of %s to %s", inputs.labels[j], out / f"gram_{j}.safetensors")
        return grams

    @staticmethod
    def _check(g: Tree, model: Tree, label: str) -> None:
        bad = []
        for n in g:
            if n not in model:
                bad.append(f"{n} (not in the model)")
                continue
            shape = tuple(model[n].shape)
            if len(shape) != 2 or tuple(g[n].shape) != (shape[1], shape[1]):
                bad.append(f"{n}: Gram {tuple(g[n].shape)} for a weight {shape} (expected {(shape[-1],) * 2})")
        if bad:
            raise UserError(
                f"regmean: the Grams given for {label} ({g.source}) do not fit the model: "
                + "; ".join(bad[:5])
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                + ". Recompute them for this model."
            )

    # -- per tensor ---------------------------------------------------------------------------------
    def _is_head(self, name: str) -> bool:
        return bool(self.params.heads) and matches(name, list(self.params.heads))

    def _solved(self, name: str) -> bool:
        return bool(self.grams) and all(g is not None and name in g for g in self.grams) and not self._is_head(name)

    def chunk_unit(self, job) -> int:
        return max(job.numel, 1) if self._solved(job.name) else 1  # a Linear weight is solved whole

    def merge_chunk(self, job, start, base, tensors):
        if self._is_head(job.name):
            return tensors[0]
        if self._solved(job.name):
            weights = [t.view(job.shape) for t in tensors]
            grams = [g[job.name].dense(torch.float32) for g in self.grams]
            return regmean_solve(weights, grams, self.params.alpha).reshape(-1)
        out = tensors[0]
        for t in tensors[1:]:
            out.add_(t)
        return out.div_(len(tensors))


def regmean_merge(
    models: Sequence[Mapping[str, torch.Tensor]],
    grams: Sequence[Mapping[str, torch.Tensor]],
    *,
    alpha: float = 0.95,
    heads: Sequence[str] = (),
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """RegMean over in-memory models (name -> tensor) with their Grams (Linear weight name -> (in, in)), for benchmarks
    and notebooks: the executor's code path (`merging.sources.merge_trees`), no files. `compute_grams` in
    merging/datadriven/gram.py computes Grams from a module and batches."""
    from merging.sources import merge_trees

    method = RegMean(RegMeanParams(alpha=alpha, heads=tuple(heads)))
    return merge_trees(method, None, models, names=names, extra={"grams": list(grams)})
