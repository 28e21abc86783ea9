"""Which input tensors, which parameters and which layer position make each output tensor.

A merge is planned as groups of output tensors that share their inputs: the `models:` form is one group (every
tensor of the base, each input's tensor of the same name); a `slices:` recipe is one group per slice (the first
also holds the tensors before the layers, the last those after them). Within a group every input is a tree keyed
by the *output* names whose leaves are the input's own tensors (output layer k of a slice is the source's layer
start + k; `Tree` leaves are references, so renaming reads nothing). The executor (`merging.run`) runs one
`merging.sources.MergeStreams` per group, unchanged: it never sees a slice.

    slice s, sources (M_j, [a_j, b_j)):   out "model.layers.{o_s + k}.x" <- M_j "model.layers.{a_j + k}.x",
                                           t = k / (L_s − 1) (1 when L_s = 1); pre/post tensors: t = 0

Parameters resolve as in mergekit: per-model ones from the source's own settings, then the slice's, the module's,
the recipe's; shared ones from the slice, the module, the recipe. Per-model filters match the *source* tensor
name, shared filters the output name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.architecture import layer_positions, sides, stacks_of
from merging.base import MergeMethod
from merging.grammar import ModelRef, Module, Slice
from merging.recipe import Recipe
from merging.settings import Resolver
from merging.sources import Input
from peft_lab.errors import UserError
from peft_lab.params import specs
from peft_lab.tree import Tree, apply, is_delta, load_peft_dir, load_tree

__all__ = ["Opened", "Group", "Plan", "open_models", "plan_merge", "warn_unmatched_filters"]

log = logging.getLogger(__name__)


@dataclass
class Opened:
    """One model of the recipe, opened (headers only)."""

    ref: ModelRef
    tree: Tree
    is_delta: bool
    role: str  # "base" | "model"

    @property
    def dir(self) -> Path | None:
        p = Path(self.ref.path)
        return p if p.is_dir() else None


@dataclass
class Group:
    """Output tensors that share their inputs (module docstring).

    Attributes:
        label: where it comes from in the recipe (`models`, `slices[2]`, `modules.encoder.slices[0]`).
        base: the base, keyed by output names (None when the method takes none).
        inputs: the inputs, keyed by output names.
        refs: the model of each input (and `base_ref` of the base), for the tokenizer's rows.
        resolver: the parameters of each tensor.
        positions: output name -> layer position t.
        source_names: output name -> each input's own tensor name (None: the same names).
        names: the output tensors of the group, in output order.
    """

    label: str
    base: Tree | None
    inputs: list[Input]
    refs: list[ModelRef]
    base_ref: ModelRef | None
    resolver: Resolver
    positions: dict[str, float]
    source_names: dict[str, tuple[str, ...]] | None
    names: list[str]


@dataclass
class Plan:
    """Every group of a merge, the opened models, and where each output layer comes from (for config.json)."""

    groups: list[Group]
    models: dict[tuple, Opened]
    layers: dict[str, list[tuple[ModelRef, int]]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------------------------------------
def _open(ref: ModelRef, base: Tree | None, allow_pickle: bool) -> Tree:
    tree = load_tree(ref.path, base=base, allow_pickle=allow_pickle)
    if ref.lora is None:
        return tree
    if is_delta(tree):
        raise UserError(f"{ref}: {ref.path} is an adapter; a LoRA can only be applied to a full model.")
    if not (Path(ref.lora) / "adapter_config.json").is_file():
        raise UserError(f"{ref}: {ref.lora} is not a PEFT adapter dir (no adapter_config.json).")
    lora = load_peft_dir(ref.lora, base=tree, allow_pickle=allow_pickle)
    return apply(tree, lora)  # lazily: each touched tensor is base + scale·B·A when it is read


def open_models(recipe: Recipe) -> dict[tuple, Opened]:
    """Every model of the recipe, opened once (the base first: adapter inputs resolve their names against it)."""
    refs: list[tuple[ModelRef, str]] = [(recipe.base_ref, "base")] if recipe.base_ref is not None else []
    if recipe.layout is None:
        refs += [(m.ref, "model") for m in recipe.models]
    else:
        bases = [sl.base for mod in recipe.layout.modules for sl in mod.slices if sl.base is not None]
        refs += [(r, "base" if any(r.same(b) for b in bases) else "model") for r in recipe.layout.refs()]
    paths = [p for r, _ in refs for p in (r.path, r.lora) if p is not None]
    missing = list(dict.fromkeys(p for p in paths if not Path(p).exists()))
    if missing:
        raise UserError(f"No such file or directory: {', '.join(missing)}. Check the paths in the recipe.")
    allow = recipe.options.allow_pickle
    out: dict[tuple, Opened] = {}
    base_tree = None
    for ref, role in refs:
        if ref.key in out:
            continue
        tree = _open(ref, base_tree, allow)
        if role == "base" and ref is recipe.base_ref:
            if is_delta(tree):
                raise UserError(f"base_model {ref} is an adapter (a set of changes); base_model must be a full model.")
            base_tree = tree
        if is_delta(tree) and (base_tree is None or recipe.layout is not None):
            raise UserError(
                f"{ref} is an adapter (changes to a base model); "
                + ("give base_model, the model it was trained on." if recipe.layout is None else
                   "slices and modules take full models: give `MODEL+ADAPTER_DIR` to apply a LoRA to its model.")
            )  # fmt: skip
        out[ref.key] = Opened(ref, tree, is_delta(tree), role)
    return out


# ---------------------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------------------
def _split(cls: type[MergeMethod], settings: Mapping[str, Any]) -> tuple[dict, dict]:
    shared = specs(cls.Params)
    return {k: v for k, v in settings.items() if k in shared}, {k: v for k, v in settings.items() if k not in shared}


def _models_group(recipe: Recipe, models: dict[tuple, Opened]) -> Group:
    """The `models:` form: one group, every tensor under its own name."""
    base = models[recipe.base_ref.key].tree if recipe.base_ref is not None else None
    inputs = [Input(m.path if m.lora is None else str(m.ref), models[m.ref.key].tree, models[m.ref.key].is_delta,
                    m.params) for m in recipe.models]  # fmt: skip
    ref = base if base is not None else next(i.tree for i in inputs if not i.is_delta)
    resolver = recipe.resolver()
    positions: dict[str, float] = {}
    if not resolver.constant:  # per-layer gradients: where each tensor sits in the model
        cfg_dir = next((o.dir for o in models.values() if not o.is_delta and o.dir is not None), None)
        positions = layer_positions(ref, config=cfg_dir)
    refs = [m.ref for m in recipe.models]
    return Group("models", base, inputs, refs, recipe.base_ref, resolver, positions, None, list(ref))


def _module_names(module: Module, names: Sequence[str]) -> list[str]:
    if module.name is None:
        return list(names)
    out = [n for n in names if n.startswith(module.name + ".")]
    if not out:
        raise UserError(
            f"modules.{module.name}: no tensor of the model starts with {module.name + '.'!r}. A module here is named "
            "by the prefix of its tensors' names (T5: encoder, decoder, shared); mergekit's architecture-specific "
            "module names for multimodal models (text_decoder, vision_tower, ...) are not supported yet."
        )
    return out


def _stack(module: Module, names: Sequence[str], where: str) -> str:
    stacks = stacks_of(names)
    if len(stacks) != 1:
        what = ", ".join(sorted(stacks)) or "none"
        raise UserError(
            f"{where}: slices need one stack of layers, but {'the model' if module.name is None else 'the module'} "
            f"has {len(stacks)} ({what})"
            + ("; give one module per stack with `modules:` (a module is named by the prefix of its tensors, "
               "e.g. encoder and decoder)." if module.name is None and len(stacks) > 1 else ".")
        )  # fmt: skip
    return next(iter(stacks))


class _SlicePlanner:
    """The groups of one module's slices."""

    def __init__(self, recipe: Recipe, models: dict[tuple, Opened], module: Module, where: str):
        self.r, self.models, self.module, self.where = recipe, models, module, where
        self.cls = type(recipe.method)
        self.offset = 0
        self.layers: list[tuple[ModelRef, int]] = []

    def names_of(self, ref: ModelRef) -> list[str]:
        return _module_names(self.module, list(self.models[ref.key].tree))

    def groups(self) -> tuple[list[Group], str]:
        first = self.module.slices[0].sources[0].model
        names = self.names_of(first)
        stack = _stack(self.module, names, self.where)
        side = sides(names, stack, self.models[first.key].dir)
        pre = [n for n in names if side.get(n) == "pre"]
        groups = []
        for i, sl in enumerate(self.module.slices):
            post = [n for n in self.names_of(sl.sources[0].model) if side.get(n) == "post"]
            extra_post = post if i == len(self.module.slices) - 1 else []
            groups.append(self.group(i, sl, stack, pre if i == 0 else [], extra_post))
        return groups, stack

    def _check_range(self, sl: Slice, stack: str, i: int) -> None:
        for s in sl.sources:
            n = stacks_of(self.names_of(s.model)).get(stack, 0)
            if s.layers[1] > n:
                raise UserError(
                    f"{self.where}[{i}]: layer_range {list(s.layers)} of {s.model} is outside the model: it has "
                    f"{n} layers in {stack} (layer_range [a, b] takes layers a to b − 1, so b <= {n})."
                )

    def _names(self, sl: Slice, ref, stack: str, pre: list[str], post: list[str]):
        """The slice's output names in order, each source's own name for each (by `id(source)`), and the layer
        position of each: layer k of the slice is output layer offset + k and source layer start + k."""
        out_names: list[str] = list(pre)
        src_of = {n: {id(s): n for s in sl.sources} for n in [*pre, *post]}
        positions = {n: 0.0 for n in [*pre, *post]}
        L = sl.length
        for k in range(L):
            self.layers.append((ref.model, ref.layers[0] + k))
            prefix = f"{stack}.{ref.layers[0] + k}."
            for n in self.names_of(ref.model):
                if n.startswith(prefix):
                    rest = n[len(prefix) :]
                    out = f"{stack}.{self.offset + k}.{rest}"
                    out_names.append(out)
                    positions[out] = k / (L - 1) if L > 1 else 1.0
                    src_of[out] = {id(s): f"{stack}.{s.layers[0] + k}.{rest}" for s in sl.sources}
        self.offset += L
        return out_names + list(post), src_of, positions

    def _resolver(self, i: int, sl: Slice, srcs: list) -> Resolver:
        shared, per_model = _split(self.cls, sl.settings)
        mshared, mper = _split(self.cls, self.module.settings)
        top_shared, top_per = _split(self.cls, self.r.parameters)
        scopes = [[s.settings, per_model, mper, top_per] for s in srcs]
        return Resolver(self.cls.Params, [shared, mshared, top_shared], self.cls.ModelParams, scopes,
                        f"{self.where}[{i}]")  # fmt: skip

    def group(self, i: int, sl: Slice, stack: str, pre: list[str], post: list[str]) -> Group:
        self._check_range(sl, stack, i)
        base_ref = sl.base or self.r.base_ref
        use_base = not self.cls.base_is_input and base_ref is not None
        base_src = next((s for s in sl.sources if use_base and s.model.same(base_ref)), None)
        srcs = [s for s in sl.sources if s is not base_src]
        out_names, src_of, positions = self._names(sl, base_src or srcs[0], stack, pre, post)

        def renamed(s) -> Tree:  # the source's tensors under the output's names (references: nothing is read)
            tree = self.models[s.model.key].tree
            own = {o: src_of[o][id(s)] for o in out_names}
            return Tree({o: tree[n] for o, n in own.items() if n in tree}, source=f"{s.model} {list(s.layers)}")

        resolver = self._resolver(i, sl, srcs)
        params = resolver.models()
        self.r.method.check_models(params, [str(s.model) for s in srcs])
        inputs = [Input(f"{s.model} {list(s.layers)}", renamed(s), False, p) for s, p in zip(srcs, params, strict=True)]
        names = {o: tuple(src_of[o][id(s)] for s in srcs) for o in out_names}
        return Group(f"{self.where}[{i}]", None if base_src is None else renamed(base_src), inputs,
                     [s.model for s in srcs], None if base_src is None else base_src.model, resolver, positions,
                     names, out_names)  # fmt: skip


def _module_models_group(recipe: Recipe, models: dict[tuple, Opened], module: Module, where: str) -> Group:
    """A module given as whole models: its tensors, under their own names (mergekit appends the base)."""
    cls = type(recipe.method)
    base_ref = recipe.base_ref
    takes_base = cls.needs_base or cls.optional_base  # a listed base is the base, not one more model
    entries = [(r, s) for r, s in module.models if not (takes_base and not cls.base_is_input and r.same(base_ref))]
    if cls.base_is_input and base_ref is not None and not any(r.same(base_ref) for r, _ in entries):
        entries.append((base_ref, {}))
    if cls.needs_base and base_ref is None:
        raise UserError(f"{where}: {cls.name} needs base_model.")
    n = len(entries)
    if n < cls.min_models or (cls.max_models is not None and n > cls.max_models):
        raise UserError(f"{where}: {cls.name} cannot merge {n} model(s) here (it takes {cls.min_models}"
                        f"{' to ' + str(cls.max_models) if cls.max_models else ' or more'}).")  # fmt: skip
    base = models[base_ref.key].tree if base_ref is not None and not cls.base_is_input else None
    ref_tree = base if base is not None else models[entries[0][0].key].tree
    names = _module_names(module, list(ref_tree))
    sub = lambda t: Tree({k: t[k] for k in names if k in t}, source=t.source)  # noqa: E731
    mshared, mper = _split(cls, module.settings)
    top_shared, top_per = _split(cls, recipe.parameters)
    resolver = Resolver(cls.Params, [mshared, top_shared], cls.ModelParams, [[s, mper, top_per] for _, s in entries],
                        where)  # fmt: skip
    params = resolver.models()
    recipe.method.check_models(params, [str(r) for r, _ in entries])
    inputs = [Input(str(r), sub(models[r.key].tree), False, p) for (r, _), p in zip(entries, params, strict=True)]
    positions = layer_positions(names) if not resolver.constant else {}
    refs = [r for r, _ in entries]
    return Group(where, None if base is None else sub(base), inputs, refs, base_ref if base is not None else None,
                 resolver, positions, None, names)  # fmt: skip


def plan_merge(recipe: Recipe, models: dict[tuple, Opened]) -> Plan:
    """The groups of a recipe (module docstring)."""
    if recipe.layout is None:
        return Plan([_models_group(recipe, models)], models)
    groups: list[Group] = []
    layers: dict[str, list[tuple[ModelRef, int]]] = {}
    for mod in recipe.layout.modules:
        where = "slices" if mod.name is None else f"modules.{mod.name}"
        if mod.slices:
            planner = _SlicePlanner(recipe, models, mod, where + (".slices" if mod.name is not None else ""))
            gs, stack = planner.groups()
            groups += gs
            layers[stack] = planner.layers
        else:
            groups.append(_module_models_group(recipe, models, mod, f"{where}.models"))
    _check_coverage(recipe, models)
    return Plan(groups, models, layers)


def _check_coverage(recipe: Recipe, models: dict[tuple, Opened]) -> None:
    """With `modules:`, every tensor of the model belongs to a module."""
    if recipe.layout is None or recipe.layout.form != "modules":
        return
    prefixes = tuple(f"{m.name}." for m in recipe.layout.modules)
    ref = next(iter(models.values())).tree
    left = [n for n in ref if not n.startswith(prefixes)]
    if left:
        names = ", ".join(m.name for m in recipe.layout.modules)
        raise UserError(
            f"modules: {len(left)} tensor(s) belong to none of the modules ({names}), e.g. {', '.join(left[:5])}. "
            "A module covers the tensors whose names start with its name and a dot; add one for these."
        )


def _filters(scope: Mapping[str, Any], where: str) -> list[tuple[str, str, str]]:
    """(where, key, filter) of every conditional value in a scope."""
    out = []
    for key, setting in (scope or {}).items():
        items = [setting] if isinstance(setting, Mapping) else setting if isinstance(setting, list) else []
        for c in items:
            f = c.get("filter") if isinstance(c, Mapping) else None
            if f not in (None, "*"):
                out.append((where, key, str(f)))
    return out


def warn_unmatched_filters(recipe: Recipe, plan: Plan) -> list[str]:
    """Warn about each filter that matches no tensor of the merge (its value is never used: a typo?)."""
    found = _filters(recipe.parameters, "parameters")
    found += [x for i, m in enumerate(recipe.models) for x in _filters(m.settings, f"models[{i}]")]
    for mod in recipe.layout.modules if recipe.layout is not None else ():
        w = "slices" if mod.name is None else f"modules.{mod.name}"
        found += _filters(mod.settings, f"{w}.parameters")
        found += [x for i, (_, st) in enumerate(mod.models) for x in _filters(st, f"{w}.models[{i}]")]
        for i, sl in enumerate(mod.slices):
            found += _filters(sl.settings, f"{w}[{i}].parameters")
            found += [x for j, s in enumerate(sl.sources) for x in _filters(s.settings, f"{w}[{i}].sources[{j}]")]
    names = {n for g in plan.groups for n in g.names}
    names |= {x for g in plan.groups for srcs in (g.source_names or {}).values() for x in srcs}
    msgs = []
    for where, key, f in dict.fromkeys(found):
        if not any(f in n for n in names):
            msgs.append(
                f"{where}: the filter {f!r} of {key} matches no tensor of this merge, so its value is never used "
                "(a filter is a part of tensor names, e.g. self_attn or mlp)."
            )
            log.warning(msgs[-1])
    return msgs
