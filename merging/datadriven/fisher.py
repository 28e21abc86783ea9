"""Diagonal Fisher information of a model's predictive distribution, from per-example gradients.

Fisher merging (Matena & Raffel, https://arxiv.org/abs/2111.09832) weights each parameter of each model by

    F_j = 1/N Σ_n E_{y ~ p_θj(y|x_n)} [ (∇_θ log p_θj(y | x_n))² ]          (element-wise square)

The square is of a *per-example* gradient (squaring a batch-mean gradient gives a different, much smaller
quantity), so the per-example gradients are computed with `torch.func.vmap(torch.func.grad(...))` over
chunks of examples, with the module run functionally (`torch.func.functional_call`). Label choices:

- ``"sample"``: one y ~ p_θ(y|x) per example: an unbiased estimate of the true Fisher, any label space;
- ``"expected"``: the exact expectation Σ_y p(y|x)·g_y², as the official code does (C gradients per example);
- ``"empirical"``: the gold label (the "empirical Fisher", a different estimator).

Two engines compute the same quantity:

- ``"vmap"``: `vmap(grad)` as above, for any module that `torch.func` can run;
- ``"hooks"`` (merging/datadriven/fisher_hooks.py): one batched forward and backward, with every example's gradient of
  each Linear / LayerNorm / RMSNorm / Embedding parameter formed from the layer's input and output gradient and squared
  block by block. On MiniLM on a CPU, `vmap(grad)` is no faster than a loop of per-example backwards, because
  it writes all B per-example gradients to memory, squares and sums them; the hooks engine never holds them.
- ``"auto"`` (default) uses hooks when every selected parameter is of those layers and a per-example backward
  on two examples agrees with it, else vmap (said in the log).

Everything is accumulated in float32 (squares of half-precision gradients underflow).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch.func import functional_call, grad, vmap

from merging.datadriven.fisher_hooks import HooksUnsupported, SquaredGradHooks
from peft_lab.errors import UserError

__all__ = ["ENGINES", "LABEL_MODES", "diagonal_fisher", "diagonal_fisher_loop", "eager_attention", "logits_of"]

log = logging.getLogger(__name__)

LabelMode = Literal["sample", "expected", "empirical"]
LABEL_MODES = ("sample", "expected", "empirical")
Engine = Literal["auto", "hooks", "vmap"]
ENGINES = ("auto", "hooks", "vmap")
Batch = Mapping[str, torch.Tensor]


def logits_of(out) -> torch.Tensor:
    """The logits of a model output: a tensor, or an HF `ModelOutput` with `.logits`."""
    return out if isinstance(out, torch.Tensor) else out.logits


def _check(mode: str) -> None:
    if mode not in LABEL_MODES:
        raise UserError(f"Fisher labels={mode!r} is not one of {', '.join(LABEL_MODES)}.")


def _log_prob_fn(module: torch.nn.Module, frozen: dict[str, torch.Tensor]) -> Callable:
    """`(params, example, y) -> log p(y | example)` for ONE example (vmapped by the caller)."""

    def log_prob(params: dict[str, torch.Tensor], example: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        batch = {k: v.unsqueeze(0) for k, v in example.items()}  # (1, ...) inside vmap
        logits = logits_of(functional_call(module, {**frozen, **params}, args=(), kwargs=batch))  # (1, C)
        # gather, not [0, y]: indexing with a vmapped tensor is data-dependent control flow for vmap
        return torch.log_softmax(logits.float(), dim=-1)[0].gather(0, y.reshape(1)).squeeze(0)

    return log_prob


def _length_groups(batch: dict[str, torch.Tensor], rows: torch.Tensor):
    """Split a padded text batch into groups of equal length with the padding cut off and no attention mask.

    Inside `vmap` a model may not look at the values of its attention mask (transformers checks
    `mask.all()` to skip it: data-dependent control flow). Without padding no mask is needed, so examples
    are grouped by their length and trimmed; this is exact (padding is never attended) and skips the padding's
    compute. Batches without a 2-D `attention_mask` form one group.

    Yields:
        (positions into `rows` of this group (K,), the batch trimmed to the group's length without the mask).
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        yield torch.arange(len(rows)), batch
        return
    L = mask.shape[1]
    lengths = mask.long().sum(1)
    if not bool((mask.long() == (torch.arange(L) < lengths[:, None]).long()).all()):
        raise UserError("Fisher: the attention mask is not right-padded (ones then zeros); pad on the right.")
    per_row = lengths[rows]
    for n in per_row.unique().tolist():
        sub = {
            k: (v[:, :n] if v.dim() >= 2 and v.shape[1] == L else v) for k, v in batch.items() if k != "attention_mask"
        }
        yield (per_row == n).nonzero().squeeze(1), sub


@contextlib.contextmanager
def eager_attention(module: torch.nn.Module) -> Iterator[None]:
    """Run a transformers model with its "eager" attention while inside: `vmap` has no batching rule for the
    CPU fused attention kernel (SDPA) and falls back to a slow per-example loop for it."""
    cfg = getattr(module, "config", None)
    old = getattr(cfg, "_attn_implementation", None)
    if old in (None, "eager") or not hasattr(module, "set_attn_implementation"):
        yield
        return
    module.set_attn_implementation("eager")
    try:
        yield
    finally:
        module.set_attn_implementation(old)


def _labels(logits: torch.Tensor, mode: str, gold: torch.Tensor | None, gen: torch.Generator | None):
    """Per-example labels and their weights: (labels (B*K,), weights (B*K,), example index (B*K,))."""
    B, C = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # (B, C)
    rows = torch.arange(B)
    if mode == "empirical":
        if gold is None:
            raise UserError("Fisher labels='empirical' needs gold labels, but the examples have none.")
        return gold.long(), torch.ones(B), rows
    if mode == "sample":
        y = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B,)
        return y, torch.ones(B), rows
    # expected: every (example, class) pair, weighted by p(class | example)
    return torch.arange(C).repeat(B), probs.reshape(-1), rows.repeat_interleave(C)


def diagonal_fisher(
    module: torch.nn.Module,
    names: Sequence[str],
    batches: Iterable[Batch],
    *,
    labels: LabelMode = "sample",
    gold_key: str = "labels",
    num_examples: int | None = None,
    chunk_size: int = 32,
    generator: torch.Generator | None = None,
    engine: Engine = "auto",
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of `module` w.r.t. the parameters `names`, averaged over examples.

    Args:
        module: maps keyword inputs (the batch's tensors except `gold_key`) to logits (B, C) or an output
            with `.logits`. It must not depend on the batch composition (eval mode: no dropout, no batch norm
            statistics): the Fisher is of one example at a time.
        names: parameter names (as in `module.named_parameters()`) to compute the Fisher of; the rest stay fixed.
        batches: dicts of batched tensors (B, ...); `gold_key` holds the gold labels (B,) when present.
        labels: "sample" | "expected" | "empirical" (see the module docstring).
        num_examples: stop after this many examples (default: all of `batches`).
        chunk_size: examples (times classes for "expected") per vmapped gradient call; bounds memory to
            `chunk_size` gradients of the selected parameters. The hooks engine runs at most `chunk_size`
            examples per forward+backward.
        generator: for the sampled labels.
        engine: "auto" | "hooks" | "vmap" (see the module docstring). "hooks" raises a UserError for a
            model it does not cover; "auto" falls back to vmap then.
    Returns:
        name -> Fisher (float32, the parameter's shape), the mean over the examples seen.
    """
    _check(labels)
    all_params = dict(module.named_parameters())
    missing = [n for n in names if n not in all_params]
    if missing:
        raise UserError(f"Fisher: the model has no parameters named {', '.join(missing[:5])}.")
    if engine not in ENGINES:
        raise UserError(f"Fisher engine={engine!r} is not one of {', '.join(ENGINES)}.")
    batches = iter(batches)
    first = next(batches, None)
    total, seen = {}, 0
    if first is not None:
        batches = _chain(first, batches)
        use_hooks = False
        if engine != "vmap":
            why = _verify_hooks(module, names, first, gold_key)
            if why is not None and engine == "hooks":
                raise UserError(
                    f"Fisher engine='hooks' cannot compute this model's Fisher: {why}; use engine=vmap or auto."
                )
            if why is not None:
                log.info(
                    "fisher: per-example gradients through torch.func vmap (the hooks engine does not apply: %s)", why
                )
            use_hooks = why is None
        args = (module, names, batches, labels, gold_key, num_examples, chunk_size, generator)
        try:
            total, seen = _accumulate_hooks(*args) if use_hooks else _accumulate_vmap(*args)
        except HooksUnsupported as e:  # a later batch differs from the verified one
            raise UserError(f"Fisher: the hooks engine stopped: {e}; use engine=vmap.") from e
    if seen == 0:
        raise UserError("Fisher: no examples were given (the task's data is empty); give at least one example.")
    return {n: t / seen for n, t in total.items()}


def _limited(batches: Iterable[Batch], gold_key: str, num_examples: int | None):
    """(batch without its gold labels, gold labels or None, batch size) for each batch, the last one cut so that
    at most `num_examples` examples are given."""
    seen = 0
    for batch in batches:
        batch = dict(batch)
        gold = batch.pop(gold_key, None)
        B = next(iter(batch.values())).shape[0]
        if num_examples is not None:
            B = min(B, num_examples - seen)
            batch = {k: v[:B] for k, v in batch.items()}
            gold = None if gold is None else gold[:B]
        if B <= 0:
            return
        yield batch, gold, B
        seen += B
        if num_examples is not None and seen >= num_examples:
            return


def _chain(first, rest):
    yield first
    yield from rest


@contextlib.contextmanager
def _grad_only_for(module: torch.nn.Module, names: Sequence[str] = ()) -> Iterator[None]:
    """Only the parameters `names` require a gradient while inside (none: the hooks engine needs only the
    layers' output gradients, not the weights')."""
    keep = set(names)
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for n, p in module.named_parameters():
        p.requires_grad_(n in keep)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _hooks_pass(hooks: SquaredGradHooks, module, ex: dict, pick: Callable) -> None:
    """Forward `ex` (B examples) and backpropagate Σ_i sqrt(w_i) log p(y_i | x_i), with `pick(logits)` giving
    (labels, weights, classes): labels/weights per example, or per (example, class) pair when `classes` is set."""
    B = next(iter(ex.values())).shape[0]
    hooks.start_batch(B)
    with torch.enable_grad():
        logits = logits_of(module(**ex))
        ys, ws, classes = pick(logits.detach())
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, C)
        if not logp.requires_grad:  # no selected parameter feeds the output: its Fisher is 0
            return
        if classes is None:
            (logp.gather(1, ys.reshape(-1, 1)).squeeze(1) * ws.sqrt()).sum().backward()
            return
        for c in range(classes):  # "expected": one backward per class, weighted by sqrt p(c | x)
            (logp[:, c] * ws.reshape(B, classes)[:, c].sqrt()).sum().backward(retain_graph=c < classes - 1)


def _accumulate_hooks(module, names, batches, labels, gold_key, num_examples, chunk_size, generator):
    seen = 0
    with SquaredGradHooks(module, names) as hooks, _grad_only_for(module):
        for batch, gold, B in _limited(batches, gold_key, num_examples):

            def pick_all(logits):
                ys, ws, _ = _labels(logits, labels, gold, generator)
                return ys, ws, logits.shape[-1] if labels == "expected" else None

            if B <= chunk_size:  # one pass: the labels come from this forward's own logits
                _hooks_pass(hooks, module, batch, pick_all)
            else:  # the labels of the whole batch first (same draws as the vmap engine), then chunks
                with torch.no_grad():
                    ys, ws, C = pick_all(logits_of(module(**batch)))
                per = C or 1
                for s in range(0, B, chunk_size):
                    e = min(B, s + chunk_size)
                    ex = {k: v[s:e] for k, v in batch.items()}
                    _hooks_pass(
                        hooks, module, ex, lambda _, s=s, e=e: (ys[s * per : e * per], ws[s * per : e * per], C)
                    )
            seen += B
    return hooks.total, seen


def _verify_hooks(module, names, batch: Batch, gold_key: str) -> str | None:
    """None when the hooks engine covers the model's layers (`hooks_supported`) and matches per-example
    backwards on (up to) two examples of `batch`, with each example's argmax label; else why not. The second
    check guards what the first cannot see: a parameter used outside its module, a module run twice per
    forward, inputs that are not batch-first."""
    try:
        hooks = SquaredGradHooks(module, names)
    except HooksUnsupported as e:
        return str(e)
    ex = {k: v[:2] for k, v in batch.items() if k != gold_key}
    with torch.no_grad():
        y = logits_of(module(**ex)).argmax(-1)
    try:
        with hooks, _grad_only_for(module):
            _hooks_pass(hooks, module, ex, lambda _: (y, torch.ones(len(y)), None))
    except (HooksUnsupported, RuntimeError) as e:  # RuntimeError: e.g. an expanded view written in place
        return str(e)
    with _grad_only_for(module, names):
        ref = diagonal_fisher_loop(module, names, [{**ex, gold_key: y}], labels="empirical", gold_key=gold_key)
    num = sum(float((hooks.total[n] - ref[n] * len(y)).double().square().sum()) for n in names)
    den = sum(float((ref[n] * len(y)).double().square().sum()) for n in names)
    if num > 1e-6 * den + 1e-30:
        rel = (num / max(den, 1e-300)) ** 0.5
        return f"its per-example gradients differ from a per-example backward (relative error {rel:.1e})"
    return None


def _accumulate_vmap(module, names, batches, labels, gold_key, num_examples, chunk_size, generator):
    all_params = dict(module.named_parameters())
    params = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in params}
    grad_fn = grad(_log_prob_fn(module, frozen))

    def weighted_square(p, ex, y, w):  # w·g² per example, squared inside vmap: one pass less over B·|θ| floats
        return {n: w * g.float().square() for n, g in grad_fn(p, ex, y).items()}

    per_example = vmap(weighted_square, in_dims=(None, 0, 0, 0))
    total = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    seen = 0
    with eager_attention(module):
        for batch, gold, B in _limited(batches, gold_key, num_examples):
            with torch.no_grad():
                logits = logits_of(module(**batch))
            ys, ws, rows = _labels(logits, labels, gold, generator)
            for group, sub in _length_groups(batch, rows):
                for s in range(0, len(group), chunk_size):
                    sel = group[s : s + chunk_size]  # positions in (ys, ws, rows)
                    ex = {k: v[rows[sel]] for k, v in sub.items()}
                    sq = per_example(params, ex, ys[sel], ws[sel])  # name -> (chunk, *shape): w_i g_i²
                    for n, v in sq.items():
                        total[n] += v.sum(0)
            seen += B
    return total, seen


def diagonal_fisher_loop(
    module: torch.nn.Module,
    names: Sequence[str],
    batches: Iterable[Batch],
    *,
    labels: LabelMode = "sample",
    gold_key: str = "labels",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Reference: the same Fisher with one autograd backward per (example, label) in a Python loop.
    Used by the tests (equality) and the benchmark (speed); same label draws as `diagonal_fisher` for the
    same generator state."""
    _check(labels)
    params = dict(module.named_parameters())
    total = {n: torch.zeros(params[n].shape) for n in names}
    seen = 0
    for batch in batches:
        batch = dict(batch)
        gold = batch.pop(gold_key, None)
        with torch.no_grad():
            logits = logits_of(module(**batch))
        ys, ws, rows = _labels(logits, labels, gold, generator)
        for y, w, r in zip(ys.tolist(), ws.tolist(), rows.tolist(), strict=True):
            ex = {k: v[r : r + 1] for k, v in batch.items()}
            lp = torch.log_softmax(logits_of(module(**ex)).float(), -1)[0, y]
            gs = torch.autograd.grad(lp, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, gs, strict=True):
                if g is not None:
                    total[n] += w * g.float().square()
        seen += logits.shape[0]
    return {n: t / max(seen, 1) for n, t in total.items()}
