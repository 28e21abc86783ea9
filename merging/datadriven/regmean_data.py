"""RegMean's Gram matrices from the examples of a `data` config (merging/datadriven/examples.py), and RegMean++'s.

RegMean (https://arxiv.org/abs/2212.09849) takes each model's Grams from the model itself run on its task's
examples (`grams_from_data`). RegMean++ (Nguyen et al., https://arxiv.org/abs/2508.03121) takes the inputs of each
block from the *merged* model instead, block by block (`grams_plus_plus`):

    h_i = the merged model's input to block 0 on task i's examples (embeddings: averaged)
    for each block l:  G_i^l = Grams of model i's block l run on h_i;  merge block l (RegMean on its Linears, the mean
                       of its other parameters);  h_i = the merged block l applied to h_i
    Linears outside the blocks (a pooler): Grams of their inputs in the merged model, after every block is merged

Blocks are found as the longest `nn.ModuleList` of identical modules holding Linears (`bert.encoder.layer`,
`model.layers`, ...); the inputs of block 0 (hidden states and keyword arguments such as the attention mask) are
captured with a forward pre-hook and each block is called with them directly, so any transformers encoder or decoder
whose blocks take the hidden states first works.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from merging.datadriven.gram import GramHooks, compute_grams, regmean_solve
from peft_lab.errors import UserError
from peft_lab.tree import Tree, matches

__all__ = ["grams_from_data", "grams_plus_plus", "find_blocks"]

log = logging.getLogger(__name__)


def _linears(module: nn.Module, heads: Sequence[str], prefix: str = "") -> list[str]:
    """Names of the Linear modules whose weight is not a head's."""
    out = []
    for n, m in module.named_modules():
        full = f"{prefix}{n}"
        if isinstance(m, nn.Linear) and not (heads and matches(f"{full}.weight", list(heads))):
            out.append(n)
    return out


def _task_batches(inputs, params, j: int, data, tok, num_labels: int) -> list[dict]:
    from merging.datadriven.examples import batches, load_examples

    texts, _ = load_examples(data.tasks[j], "train")
    n = min(len(texts), data.num_examples or params.num_examples)
    where = data.tasks[j].dataset or data.tasks[j].path
    return list(batches(tok, texts[:n], None, data.batch_size or params.batch_size, data.max_length, num_labels, where))


def grams_from_data(inputs, params, which: Sequence[int]) -> list[Tree]:
    """Each model's Grams (keyed by the tree name of the Linear's weight) on its task's examples (split: train)."""
    from merging.datadriven.examples import _load_module, parse_data

    data = parse_data(inputs.extra.get("data"), len(inputs.labels))
    out = []
    for j in which:
        model, tok, names = _load_module(inputs, j)
        inv = {m: t for t, m in names.items()}
        lin = [n for n in _linears(model, params.heads) if f"{n}.weight" in inv]
        stream = _task_batches(inputs, params, j, data, tok, model.config.num_labels)
        grams = compute_grams(model, lin, stream)
        out.append(Tree({inv[f"{n}.weight"]: g for n, g in grams.items()}, source=f"grams of {inputs.labels[j]}"))
        log.info("regmean: computed the Grams of %s (%d Linear layers)", inputs.labels[j], len(grams))
    return out


def find_blocks(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's blocks: the longest ModuleList of modules of one class that hold Linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            if any(isinstance(x, nn.Linear) for x in m[0].modules()) and (best is None or len(m) > len(best[1])):
                best = (name, m)
    if best is None:
        raise UserError(
            "regmean with plusplus=true runs the merged model block by block, but this model has no list of blocks "
            "holding Linear layers (a transformers encoder or decoder has one); use plusplus=false."
        )
    return best


class _Stop(Exception):
    """Raised by the pre-hook once block 0's inputs are captured (the rest of the forward is not needed)."""


def _block_inputs(model: nn.Module, block: nn.Module, batches: list[dict]) -> list[tuple[tuple, dict, Any]]:
    """(args, kwargs, attention mask) of block 0 for each batch, from a forward of `model` stopped at the block."""
    got: list = []

    def pre(mod, args, kwargs):
        got.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    out = []
    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(**{k: v for k, v in b.items() if k != "labels"})
            except _Stop:
                pass
            args, kwargs = got.pop()
            out.append((args, kwargs, b.get("attention_mask")))
    finally:
        handle.remove()
    return out


def _call_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _next_inputs(block: nn.Module, args: tuple, kwargs: dict, mask) -> tuple[tuple, dict, Any]:
    """The inputs of the next block: this block's output in place of the hidden states."""
    h = _call_block(block, args, kwargs)
    if args:
        return (h, *args[1:]), kwargs, mask
    return args, {**kwargs, "hidden_states": h}, mask


def _merge_block(blocks: list[nn.Module], target: nn.Module, grams: list[dict[str, torch.Tensor]], alpha: float):
    """Load into `target` the RegMean merge of the blocks' Linear weights that have Grams and the mean of the rest."""
    states = [b.state_dict() for b in blocks]
    merged = {}
    for k, v in states[0].items():
        if not v.dtype.is_floating_point:
            merged[k] = v
            continue
        lin = k[: -len(".weight")] if k.endswith(".weight") else None
        if lin is not None and all(lin in g for g in grams):
            merged[k] = regmean_solve([s[k].float() for s in states], [g[lin] for g in grams], alpha).to(v.dtype)
        else:
            merged[k] = torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
    target.load_state_dict(merged)


def grams_plus_plus(inputs, params) -> list[Tree]:
    """RegMean++'s Grams of every model (module docstring), keyed by the tree names of the Linear weights."""
    from merging.datadriven.examples import _load_module, parse_data

    T = len(inputs.labels)
    data = parse_data(inputs.extra.get("data"), T)
    loaded = [_load_module(inputs, j) for j in range(T)]
    models = [m for m, _, _ in loaded]
    for m in models:
        m.config.use_cache = False  # blocks are called repeatedly: no key/value cache
    inv = {m: t for t, m in loaded[0][2].items()}
    task_batches = [_task_batches(inputs, params, j, data, loaded[j][1], models[j].config.num_labels) for j in range(T)]
    merged = copy.deepcopy(models[0]).eval()
    heads = list(params.heads)
    avg = {}
    for k, v in merged.state_dict().items():
        if v.dtype.is_floating_point and not (heads and matches(inv.get(k, k), heads)):
            avg[k] = torch.stack([m.state_dict()[k].float() for m in models]).mean(0).to(v.dtype)
    merged.load_state_dict(avg, strict=False)
    prefix, merged_blocks = find_blocks(merged)
    blocks = [find_blocks(m)[1] for m in models]
    grams: list[dict[str, torch.Tensor]] = [{} for _ in range(T)]
    with torch.no_grad():
        states = [_block_inputs(merged, merged_blocks[0], task_batches[j]) for j in range(T)]
        for li, target in enumerate(merged_blocks):
            lin = _linears(blocks[0][li], heads, f"{prefix}.{li}.")
            block_grams = []
            for j in range(T):
                with GramHooks(blocks[j][li], lin) as hooks:
                    for args, kwargs, mask in states[j]:
                        hooks.mask = None if mask is None else mask.bool()
                        _call_block(blocks[j][li], args, kwargs)
                block_grams.append(hooks.grams())
                grams[j].update({f"{prefix}.{li}.{n}": g for n, g in block_grams[-1].items()})
            _merge_block([b[li] for b in blocks], target, block_grams, params.alpha)
            states = [[_next_inputs(target, a, kw, mask) for a, kw, mask in s] for s in states]
        outside = [n for n in _linears(merged, heads) if not n.startswith(f"{prefix}.")]
        for j in range(T):
            grams[j].update(compute_grams(merged, outside, task_batches[j]))
    return [
        Tree({inv[f"{n}.weight"]: g for n, g in gj.items() if f"{n}.weight" in inv}, source=f"regmean++ grams of {lab}")
        for gj, lab in zip(grams, inputs.labels, strict=True)
    ]
