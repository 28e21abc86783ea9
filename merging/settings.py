"""Parameter settings as mergekit's recipe grammar writes them, resolved per tensor.

A setting is one of (mergekit 0.1.5's semantics):

    density: 0.5                                   a scalar
    t: [0, 0.5, 0.3, 0.7, 1]                       a gradient: numbers interpolate piecewise-linearly over the
                                                   layer position t in [0, 1]; other values (words, booleans)
                                                   are picked by index, values[int(t·(n − 1))]
    t:                                             conditional values: the first entry whose `filter` is a
      - filter: self_attn                          substring of the tensor's name, or `*`, or absent, gives the
        value: [0, 0.5, 0.3, 0.7, 1]               value (itself a scalar or a gradient); when none matches the
      - filter: mlp                                setting gives nothing and the next scope is asked
        value: [1, 0.5, 0.7, 0.3, 0]
      - value: 0.5

A value is looked up in scopes from the most specific to the least: for a per-model parameter, the model's own
entry (or its slice source), then the slice's `parameters`, then the recipe's top-level `parameters`; for the
method's shared parameters, the slice's then the top level's. The first scope whose setting yields a value wins;
else the parameter's default. The layer position t of a tensor in layer i of n is i/(n − 1) (1 when n = 1);
tensors outside the layers (embeddings, final norm, head) take t = 0, as mergekit plans them
(`merging.architecture`).

`Resolver` turns the scopes of a recipe into each tensor's parameters dataclasses (built and checked by
`peft_lab.params`), cached per distinct set of values: a recipe of scalars builds its parameters once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from peft_lab.errors import UserError
from peft_lab.params import Spec, build, convert, specs

__all__ = ["Scope", "Resolver", "evaluate", "check_setting", "check_scope", "is_scalar"]

Scope = Mapping[str, Any]  # key -> setting


def _is_condition(x: Any) -> bool:
    return isinstance(x, Mapping) and "value" in x and set(x) <= {"value", "filter"}


def is_scalar(setting: Any) -> bool:
    """A plain value (no gradient, no filter)."""
    return not isinstance(setting, (list, tuple, Mapping))


def _numeric(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one (already checked) setting for a tensor at layer position t; None when a conditional
    setting has no entry for this tensor."""
    if _is_condition(setting):
        setting = [setting]
    if is_scalar(setting):
        return setting
    items = list(setting)
    if not items:
        return None
    if all(_is_condition(c) for c in items):
        for cond in items:
            f = cond.get("filter")
            if f is None or f == "*" or (tensor_name and str(f) in tensor_name):
                return evaluate(cond["value"], tensor_name, t)
        return None
    if not all(_numeric(v) for v in items):
        return items[int(t * (len(items) - 1))]
    scaled = t * (len(items) - 1)
    i0 = int(scaled)
    i1 = min(len(items) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * items[i0] + frac * items[i1]


def check_setting(spec: Spec, setting: Any, where: str) -> Any:
    """A setting with every scalar in it converted and checked against the field `spec` (UserError naming it).
    A list is a gradient unless the field itself takes a list (AdaMerging's `heads`); a field declared `static`
    (one value for the whole model, e.g. TIES's `trim_scope`) refuses gradients and filters."""
    if spec.takes_list or is_scalar(setting):
        return convert(spec, setting, where=where)
    if spec.meta.get("static"):
        raise UserError(
            f"{where}: {spec.key}={setting!r}: {spec.key} takes one value for the whole model, not a per-layer "
            "gradient or per-tensor filters."
        )
    if _is_condition(setting):
        setting = [setting]
    if isinstance(setting, Mapping):
        raise UserError(
            f"{where}: {spec.key}={dict(setting)!r} is not a value: a conditional value is "
            "{filter: NAME_PART, value: V} (a list of them for several filters)."
        )
    items = list(setting)
    if not items:
        raise UserError(f"{where}: {spec.key}=[] is empty: give a value, a gradient [v0, v1, ...] or filters.")
    if all(_is_condition(c) for c in items):
        return [{**c, "value": check_setting(spec, c["value"], where)} for c in items]
    if any(isinstance(c, (list, tuple, Mapping)) for c in items):
        raise UserError(
            f"{where}: {spec.key}={items!r} mixes values and filters: a gradient is a list of values, a "
            "conditional value a list of {filter, value} entries."
        )
    return [convert(spec, v, where=where) for v in items]


def check_scope(cls: type, scope: Any, where: str) -> dict[str, Any]:
    """One scope's settings for the fields of `cls`, each checked; unknown keys are the caller's business."""
    fields = specs(cls)
    return {k: check_setting(fields[k], v, where) for k, v in (scope or {}).items() if k in fields}


@dataclasses.dataclass
class Resolver:
    """Each tensor's parameters from the scopes of a recipe.

    Args:
        shared_cls: the method's `Params`.
        shared_scopes: the shared parameters' scopes, most specific first.
        model_cls: the method's `ModelParams`.
        model_scopes: per model, its scopes, most specific first.
        where: the recipe, for messages.
    """

    shared_cls: type
    shared_scopes: Sequence[Scope]
    model_cls: type
    model_scopes: Sequence[Sequence[Scope]]
    where: str = "recipe"

    def __post_init__(self):
        self._cache: dict[tuple, Any] = {}
        self.constant = all(self._is_constant(s) for s in self.shared_scopes) and all(
            self._is_constant(s) for scopes in self.model_scopes for s in scopes
        )

    def _is_constant(self, scope: Scope) -> bool:
        fields = {**specs(self.shared_cls), **specs(self.model_cls)}
        return all(is_scalar(v) or (k in fields and fields[k].takes_list) for k, v in scope.items())

    @staticmethod
    def _values(cls: type, scopes: Sequence[Scope], name: str, t: float) -> dict[str, Any]:
        out = {}
        for key, spec in specs(cls).items():
            for scope in scopes:
                if key in scope:
                    value = scope[key] if spec.takes_list else evaluate(scope[key], name, t)
                    if value is not None:
                        out[key] = value
                        break
        return out

    def _built(self, cls: type, values: dict[str, Any], where: str) -> Any:
        key = (cls, tuple(sorted((k, repr(v)) for k, v in values.items())))
        if key not in self._cache:
            self._cache[key] = build(cls, values, where=where)
        return self._cache[key]

    def shared(self, name: str = "", t: float = 0.0) -> Any:
        """The method's parameters for tensor `name` at layer position t."""
        values = self._values(self.shared_cls, self.shared_scopes, name, t)
        return self._built(self.shared_cls, values, f"{self.where}: parameters for {name or 'every tensor'}")

    def models(self, names: Sequence[str] | str = "", t: float = 0.0) -> list[Any]:
        """Each model's parameters for its tensor (`names`: one per model, or one for all) at position t."""
        names = [names] * len(self.model_scopes) if isinstance(names, str) else list(names)
        out = []
        for i, (scopes, name) in enumerate(zip(self.model_scopes, names, strict=True)):
            values = self._values(self.model_cls, scopes, name, t)
            out.append(self._built(self.model_cls, values, f"{self.where}: models[{i}] for {name or 'every tensor'}"))
        return out
