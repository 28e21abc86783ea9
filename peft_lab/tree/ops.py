"""Small, composable functions over trees. All of them are lazy: they return trees of `Thunk` leaves and
read nothing until a leaf's `dense()` is called (which is what lets a merge stream tensor by tensor)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

import torch

from peft_lab.errors import UserError
from peft_lab.tree.core import Tree
from peft_lab.tree.leaves import Dense, Leaf, Thunk

__all__ = [
    "tree_map",
    "zip_map",
    "select",
    "exclude",
    "matches",
    "delta",
    "apply",
    "apply_to_module",
    "materialize",
    "is_float",
]


def is_float(leaf: Leaf) -> bool:
    """Only floating tensors are merged/applied; int buffers (position ids, counters, masks) pass through."""
    return leaf.dtype.is_floating_point


def tree_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    tree: Tree,
    *,
    dtype: torch.dtype | None = None,
    floats_only: bool = True,
) -> Tree:
    """`fn` over every leaf (given its float32 dense value). Non-float leaves pass through unchanged."""
    out = {}
    for name, leaf in tree.items():
        if floats_only and not is_float(leaf):
            out[name] = leaf
        else:
            out[name] = Thunk(fn, [leaf], leaf.shape, dtype or leaf.dtype, name=name)
    return tree.replace(out)


def zip_map(
    fn: Callable[..., torch.Tensor],
    *trees: Tree,
    dtype: torch.dtype | None = None,
    names: Iterable[str] | None = None,
) -> Tree:
    """`fn(t1[name], t2[name], ...)` for every name of the first tree (or `names`); leaves must line up
    (run `check_compatible` first for a full report)."""
    first = trees[0]
    out = {}
    for name in names if names is not None else first:
        leaves = [t[name] for t in trees]
        lead = leaves[0]
        if not is_float(lead):
            out[name] = lead
            continue
        out[name] = Thunk(fn, leaves, lead.shape, dtype or lead.dtype, name=name)
    return first.replace(out)


def _compile(patterns: str | Sequence[str]) -> list[Callable[[str], bool]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    tests = []
    for p in patterns:
        if p.startswith("re:"):
            rx = re.compile(p[3:])
            tests.append(lambda n, rx=rx: rx.search(n) is not None)
        else:
            tests.append(lambda n, p=p: fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, f"*.{p}") or n == p)
    return tests


def matches(name: str, patterns: str | Sequence[str]) -> bool:
    """True if `name` matches any pattern: a glob on the full dotted name (`*.query.weight`), a glob on a
    dotted suffix (`query.weight` matches `bert.layer.0.query.weight`), or a regex with the prefix `re:`."""
    return any(t(name) for t in _compile(patterns))


def select(tree: Tree, patterns: str | Sequence[str]) -> Tree:
    tests = _compile(patterns)
    return tree.replace((n, leaf) for n, leaf in tree.items() if any(t(n) for t in tests))


def exclude(tree: Tree, patterns: str | Sequence[str]) -> Tree:
    tests = _compile(patterns)
    return tree.replace((n, leaf) for n, leaf in tree.items() if not any(t(n) for t in tests))


def _sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a - b


def delta(finetuned: Tree, base: Tree) -> Tree:
    """Task vector `finetuned − base` on the float leaves of `finetuned` (names must exist in `base`).
    Leaves are float32 thunks: a delta is never rounded to a half type before it is used."""
    missing = [n for n in finetuned if n not in base]
    if missing:
        raise UserError(
            f"{finetuned.source}: {len(missing)} tensor(s) have no counterpart in the base {base.source}: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}."
        )
    out = {}
    for name, leaf in finetuned.items():
        if is_float(leaf):
            out[name] = Thunk(_sub, [leaf, base[name]], leaf.shape, torch.float32, name=name)
    return finetuned.replace(out)


def apply(base: Tree, delta_tree: Tree, alpha: float = 1.0) -> Tree:
    """`base + alpha · delta` (lazily, float32 arithmetic, cast back to each base leaf's dtype). Names of the
    delta must exist in the base with the same shape; base names without a delta pass through."""
    problems = []
    for name, d in delta_tree.items():
        if name not in base:
            problems.append(f"{name} (not in base)")
        elif tuple(base[name].shape) != tuple(d.shape):
            problems.append(f"{name} (delta {tuple(d.shape)} vs base {tuple(base[name].shape)})")
    if problems:
        raise UserError(
            f"The delta {delta_tree.source} does not fit the base {base.source}: {'; '.join(problems[:20])}"
            f"{' ...' if len(problems) > 20 else ''}."
        )
    out = {}
    for name, leaf in base.items():
        if name in delta_tree and is_float(leaf):
            d = delta_tree[name]
            # clone: a Dense float32 leaf hands out its own tensor, which must never be modified
            out[name] = Thunk(lambda w, _d=d: _d.add_to(w.clone(), alpha), [leaf], leaf.shape, leaf.dtype, name=name)
        else:
            out[name] = leaf
    return base.replace(out)


@torch.no_grad()
def apply_to_module(module: torch.nn.Module, delta_tree: Tree, alpha: float = 1.0) -> None:
    """`param += alpha · delta` in place on a module's parameters/buffers (structured leaves add themselves
    without building the dense delta when they can, e.g. a sparse scatter)."""
    sd = module.state_dict(keep_vars=True)
    missing = [n for n in delta_tree if n not in sd]
    if missing:
        raise UserError(
            f"The delta {delta_tree.source} names tensors the model does not have: {', '.join(missing[:10])}."
        )
    for name, d in delta_tree.items():
        t = sd[name]
        d.add_to(t.data if isinstance(t, torch.nn.Parameter) else t, alpha)


def materialize(tree: Tree, dtype: torch.dtype | None = None) -> Tree:
    """Every leaf computed into memory as `Dense` (in its own dtype unless `dtype` is given)."""
    return tree.replace((n, Dense(leaf.dense(dtype or leaf.dtype))) for n, leaf in tree.items())
