"""AdaMerging's learning loop: coefficients λ found by minimising the entropy of each task's predictions.

    θ^l(λ) = θ_0^l + Σ_k clamp(λ_k^l, 0, 1) · v_k^l       (task-wise: λ_k^l = λ_k for every tensor l)

v_k is task k's vector (its task vector τ_k, or its TIES-processed version for AdaMerging++). The loss is the
Shannon entropy of each task's predictions (its own frozen head on the merged body) on unlabeled examples of
that task, summed over tasks and batches, minimised with Adam. The merged parameters are formed functionally
every step (`torch.func.functional_call`), so memory is one model plus the task vectors, never one model per
task. `merging.methods.adamerging` is the merge method around it; `learn_from_data` runs it on the examples
a recipe's `data` block names.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call

from merging.datadriven.examples import (
    batches,
    load_classifier,
    load_examples,
    load_tokenizer,
    model_dir,
    name_map,
    parse_data,
)
from merging.datadriven.fisher import logits_of
from peft_lab.errors import UserError

if TYPE_CHECKING:
    from merging.base import MergeInputs
    from merging.methods.adamerging import AdaMergingParams

__all__ = ["AdaResult", "adamerge", "merged_params", "entropy", "learn_from_data", "shuffled_batches"]

Batch = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# The functional merge and the objective
# ---------------------------------------------------------------------------------------------------------
def merged_params(
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    lambdas: torch.Tensor,
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """θ^l = θ_0^l + Σ_k λ[l or 0, k] · τ_k^l for each name l (differentiable in `lambdas`).

    Args:
        base: name -> θ_0 tensor.
        deltas: T dicts name -> τ_k (names missing from a dict count as zero).
        lambdas: (1, T) task-wise or (len(names), T) layer-wise coefficients (already clamped).
    Returns:
        name -> merged tensor, for `names` only.
    """
    layerwise = lambdas.shape[0] > 1
    out = {}
    for i, n in enumerate(names):
        row = lambdas[i if layerwise else 0]
        t = base[n]
        for k, d in enumerate(deltas):
            if n in d:
                t = t + row[k] * d[n]
        out[n] = t
    return out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch: logits (B, C) -> scalar."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@dataclass
class AdaResult:
    lambdas: torch.Tensor  # (1 | L, T), clamped: the coefficients to merge with
    names: list[str]  # the L merged tensor names (rows of a layer-wise λ)
    losses: list[float] = field(default_factory=list)  # the entropy objective per step
    seconds: float = 0.0

    def to_json(self, tasks: Sequence[str], params: Any = None) -> str:
        """Plot-ready: one row of coefficients per tensor (layer-wise) or a single row (task-wise)."""
        return json.dumps(
            {
                "granularity": "layer" if self.lambdas.shape[0] > 1 else "task",
                "tasks": list(tasks),
                "tensors": self.names if self.lambdas.shape[0] > 1 else ["*"],
                "lambdas": self.lambdas.tolist(),
                "losses": self.losses,
                "params": asdict(params) if params is not None else None,
            },
            indent=1,
        )


def adamerge(
    module: torch.nn.Module,
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    heads: Sequence[Mapping[str, torch.Tensor]],
    samplers: Sequence[Callable[[], Batch]],
    params: AdaMergingParams,
    *,
    names: Sequence[str] | None = None,
    on_step: Callable[[int, float, torch.Tensor], None] | None = None,
) -> AdaResult:
    """Learn AdaMerging coefficients by entropy minimisation.

    Args:
        module: the model architecture (body + a head); run functionally, its own weights are never read for
            the names given here and never modified.
        base: θ_0 of the merged tensors (name -> tensor).
        deltas: per task, its task vector τ_k (name -> tensor; AdaMerging++ passes TIES-processed vectors).
        heads: per task, its frozen head tensors (name -> tensor), swapped in for that task's forward.
        samplers: per task, a callable returning one batch of unlabeled inputs (keyword tensors for `module`).
        params: hyperparameters (granularity, init, lr, steps, batches_per_step, ...).
        names: the merged tensors (default: the keys of `base`); rows of a layer-wise λ.
    Returns:
        AdaResult with the clamped λ ((1, T) or (L, T)), the names and the per-step losses.
    """
    T = len(deltas)
    if not (len(heads) == len(samplers) == T) or T == 0:
        raise UserError(
            f"adamerging: {T} task vectors, {len(heads)} heads and {len(samplers)} data sources must match "
            "(and be > 0)."
        )
    names = list(names if names is not None else base)
    _check_heads(module, heads, names)
    rows = len(names) if params.granularity == "layer" else 1
    lam = torch.full((rows, T), float(params.init), requires_grad=True)
    opt = torch.optim.Adam([lam], lr=params.lr, betas=(params.beta1, params.beta2), weight_decay=0.0)
    # leaves of the graph: only λ. Frozen tensors are detached so nothing else accumulates a gradient.
    base = {n: base[n].detach() for n in names}
    deltas = [{n: d[n].detach() for n in names if n in d} for d in deltas]
    heads = [{n: h.detach() for n, h in hd.items()} for hd in heads]
    losses = []
    t0 = time.perf_counter()
    was_training = module.training
    module.eval()
    try:
        for step in range(params.steps):
            opt.zero_grad(set_to_none=True)
            merged = merged_params(base, deltas, lam.clamp(params.clamp_min, params.clamp_max), names)
            # Backpropagate batch by batch into a detached copy of the merged tensors (its .grad adds up
            # dL/dθ over tasks and batches), then once through the merge into λ: the same gradient as one
            # backward of the summed loss, but only one batch's activations are alive at a time, so memory does
            # not grow with the number of tasks beyond their task vectors (+ one model-sized gradient).
            leaf = {n: t.detach().requires_grad_(True) for n, t in merged.items()}
            total = 0.0
            for k in range(T):
                p = {**leaf, **heads[k]}
                for _ in range(params.batches_per_step):
                    loss = entropy(logits_of(functional_call(module, p, args=(), kwargs=dict(samplers[k]()))))
                    loss.backward()
                    total += float(loss.detach())
            live = [n for n in names if merged[n].requires_grad and leaf[n].grad is not None]  # tensors some τ touches
            if live:
                torch.autograd.backward([merged[n] for n in live], [leaf[n].grad for n in live])
            del merged, leaf
            opt.step()
            losses.append(total)
            if on_step is not None:
                on_step(step, losses[-1], lam.detach())
    finally:
        module.train(was_training)
    return AdaResult(lam.detach().clamp(params.clamp_min, params.clamp_max), names, losses, time.perf_counter() - t0)


def _check_heads(module: torch.nn.Module, heads: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Every task's head names the same tensors, all of them the module's and none of them merged."""
    known = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    problems = []
    for k, hd in enumerate(heads):
        unknown = sorted(n for n in hd if n not in known)
        if unknown:
            problems.append(f"task {k}'s head names tensors the model does not have: {', '.join(unknown[:5])}")
        if set(hd) != set(heads[0]):
            problems.append(f"task {k}'s head has tensors {sorted(hd)} but task 0's has {sorted(heads[0])}")
        merged = sorted(set(hd) & set(names))
        if merged:
            problems.append(f"task {k}'s head tensors {merged[:5]} are also among the merged tensors")
    missing = [n for n in names if n not in known]
    if missing:
        problems.append(f"the merged tensors {missing[:5]} are not in the model")
    if problems:
        raise UserError("adamerging: the heads do not fit the model: " + "; ".join(problems) + ".")


# ---------------------------------------------------------------------------------------------------------
# From a recipe's `data` block
# ---------------------------------------------------------------------------------------------------------
def learn_from_data(
    inputs: MergeInputs,
    params: AdaMergingParams,
    vectors: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str],
    heads: Sequence[str],
) -> AdaResult:
    """Learn the coefficients on unlabeled examples of each task (default split: test, as the paper).

    Args:
        inputs: the merge's inputs (the base must be an HF model dir with a tokenizer).
        params: AdaMerging's parameters.
        vectors: per task, name -> the vector λ multiplies (τ_k or its TIES version), float32.
        names: the merged tensors (tree names).
        heads: the tree names of the per-task heads (frozen, each task's own).
    """
    data = parse_data(inputs.extra.get("data"), len(inputs.labels))
    model, tok, nmap = _load_module_base(inputs, names)
    base = {nmap[n]: inputs.base[n].dense(torch.float32) for n in names}
    vecs = [{nmap[n]: v[n] for n in names if n in v} for v in vectors]
    head_params, samplers = [], []
    gen = torch.Generator().manual_seed(int(params.seed))
    batch_size = data.batch_size or params.batch_size  # the data config's batch size wins, as for Fisher
    for j in range(len(inputs.deltas)):
        delta = inputs.deltas[j]
        head_params.append(
            {
                nmap[n]: inputs.base[n].dense(torch.float32) + delta[n].dense(torch.float32)
                for n in heads
                if n in nmap and n in delta
            }
        )
        texts, _ = load_examples(data.tasks[j], "test")
        texts = texts[: data.num_examples] if data.num_examples else texts
        where = data.tasks[j].dataset or data.tasks[j].path
        pool = list(batches(tok, texts, None, len(texts), data.max_length, model.config.num_labels, where))[0]
        samplers.append(shuffled_batches(pool, batch_size, params.batches_per_step, gen))
    res = adamerge(model, base, vecs, head_params, samplers, params, names=list(base))
    inv = {m: t for t, m in nmap.items()}
    res.names = [inv[n] for n in res.names]
    return res


def _load_module_base(inputs: MergeInputs, names: Sequence[str]):
    """The base model as an HF sequence classifier, its tokenizer and the tree-name -> module-name map; refused
    when the checkpoint has merged tensors the model class lacks (no coefficient could be learned for them)."""
    src = model_dir(inputs.base)
    if src is None:
        raise UserError(f"adamerging: the base {inputs.base.source} is not a model dir with a config.json.")
    model = load_classifier(src, "adamerging")
    tokenizer, _ = load_tokenizer([src], "adamerging")
    nmap = name_map(model, list(inputs.base))
    missing = [n for n in names if n not in nmap]
    if missing:
        raise UserError(
            f"adamerging: {src} holds {len(missing)} tensor(s) that {type(model).__name__} (from its config.json) "
            f"does not have: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. "
            "AdaMerging runs the model to "
            "learn a coefficient per tensor; remove those tensors, or name them in `heads` to keep the first "
            "model's copy unmerged."
        )
    return model, tokenizer, nmap


def shuffled_batches(
    pool: Mapping[str, torch.Tensor], batch_size: int, per_step: int, gen: torch.Generator
) -> Callable[[], dict]:
    """A sampler drawing batches the way the official AdaMerging loop does: every step starts a fresh shuffle of
    the task's examples and takes its first `per_step` batches (no repeats within a step, a new order each step).
    When the examples run out within a step, another shuffle continues it (the official loader would stop).

    Args:
        pool: name -> (N, ...) tensors of the task's encoded examples.
        batch_size: examples per batch (the last batch of a shuffle may be smaller).
        per_step: calls per optimisation step (`batches_per_step`).
    Returns:
        draw() -> one batch (name -> tensor).
    """
    n = next(iter(pool.values())).shape[0]
    state = {"perm": torch.empty(0, dtype=torch.long), "at": 0, "calls": 0}

    def draw() -> dict:
        if state["calls"] % per_step == 0 or state["at"] >= n:
            state["perm"], state["at"] = torch.randperm(n, generator=gen), 0
        state["calls"] += 1
        idx = state["perm"][state["at"] : state["at"] + batch_size]
        state["at"] += batch_size
        return {k: v[idx] for k, v in pool.items()}

    return draw
