"""Typed parameters: one builder from user values (a YAML recipe, a Hydra config node, keyword arguments) to a
frozen parameters dataclass, each value checked against its field's annotation and constraints before the
dataclass is constructed.

    @dataclass(frozen=True)
    class TiesParams(Checked):
        lambda_: float = param(1.0, key="lambda")
        density: float = param(1.0, within="(0, 1]", help="the fraction of each task vector kept")
        trim_scope: str = param("tensor", choices=("tensor", "global"))
        heads: tuple[str, ...] = ("classifier.*",)

    build(TiesParams, {"lambda": "1e-3", "heads": "score.*"}, where="r.yaml: parameters")

What a value may be, by annotation (YAML and Hydra hand over str, int, float, bool, None, lists, mappings):
- `bool`: true or false only (not 1, not "yes").
- `int`: an integer or a string of one ("12"); never a bool or a float (neither 2.5 nor 2.0).
- `float`: an int, a float or a numeric string ("1e-3": PyYAML reads `lr: 1e-3` as a string); finite unless
  the field is declared with `finite=False`.
- `str`: a string (a bare `2019` in YAML is a number: quote it).
- `X | None`: null or an X; other unions: the first member the value converts to. `Literal[...]`: one of its values.
- `tuple[X, ...]`, `list[X]`: a list of X, each converted; a single value is a one-element list
  (`heads: classifier.*`), a mapping is refused. `tuple[X, Y]`: exactly that many items.
- `dict[str, X]`: a mapping of X; a dataclass: a mapping built with `build`; `Any`: anything.

`param(...)` declares the rest in the field's metadata: `key` (the name users write, `lambda` for `lambda_`),
`within` (an interval such as "(0, 1]" or "[1, inf)", checked for a number and for each number of a list),
`choices`, `aliases` (inputs taken as another value, e.g. mergekit's `rescale: true` for `l1`), `finite` and
`help` (added to error messages). Every error is one `UserError` naming where, the key as users write it, the
value given and what the field takes. A `Checked` dataclass runs the same checks (and conversions) when it is
constructed directly; checks across fields stay in its `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

from peft_lab.errors import UserError

__all__ = ["param", "build", "check", "Checked", "Spec", "specs", "param_key", "Interval"]

_MISSING = dataclasses.MISSING
_INT = re.compile(r"[+-]?\d+")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A numeric range written as in mathematics: "(0, 1]", "[0, 1)", "[1, inf)"."""

    text: str
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\s\])]+)\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"not an interval: {text!r} (write e.g. '(0, 1]' or '[1, inf)')")
        lo, hi = float(m.group(2)), float(m.group(3))
        return cls(f"{m.group(1)}{m.group(2)}, {m.group(3)}{m.group(4)}", lo, hi, m.group(1) == "(", m.group(4) == ")")

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.text[1:].split(',')[0]}"
        if self.lo == -math.inf:
            return f"{'<' if self.hi_open else '<='} {self.text.split(',')[1].strip()[:-1]}"
        return f"in {self.text}"


def param(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    key: str | None = None,
    within: str | None = None,
    choices: Sequence[Any] | None = None,
    aliases: Mapping[Any, Any] | None = None,
    finite: bool = True,
    help: str | None = None,
    static: bool = False,
) -> Any:
    """A dataclass field with its constraints in `metadata` (see the module docstring). `static`: where values may
    vary per tensor (a merge recipe's gradients and filters), this one may not."""
    meta: dict[str, Any] = {}
    if static:
        meta["static"] = True
    if key is not None:
        meta["key"] = key
    if within is not None:
        meta["within"] = Interval.parse(within)
    if choices is not None:
        meta["choices"] = tuple(choices)
    if aliases:
        meta["aliases"] = tuple(aliases.items())
    if not finite:
        meta["finite"] = False
    if help:
        meta["help"] = help
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def param_key(f: dataclasses.Field) -> str:
    """The name users write for a field: `metadata["key"]` (`lambda_` is written `lambda`), else its name."""
    return f.metadata.get("key", f.name)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One field of a parameters dataclass: its name, user-facing key, resolved annotation and metadata."""

    name: str
    key: str
    type: Any
    meta: Mapping[str, Any]

    @property
    def takes_list(self) -> bool:
        """True when the field holds a list (so a list value is not, say, a per-layer schedule of a scalar)."""
        return _is_sequence(_strip_none(self.type))


@functools.cache
def specs(cls: type) -> dict[str, Spec]:
    """key -> Spec for every init field of a dataclass ({} for anything else)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError) as e:  # a programming error: annotations must resolve in their module
        raise TypeError(f"{cls.__qualname__}: cannot resolve its field annotations ({e})") from None
    return {
        param_key(f): Spec(f.name, param_key(f), hints.get(f.name, Any), f.metadata)
        for f in dataclasses.fields(cls)
        if f.init
    }


# ---------------------------------------------------------------------------------------------------------
# Conversion of one value to an annotation
# ---------------------------------------------------------------------------------------------------------
class _Mismatch(Exception):
    """The value does not fit the annotation (the message is built from the annotation)."""


class _OutOfRange(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _strip_none(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _is_sequence(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return origin in (list, tuple, Sequence)


def _plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra hands over) as plain dicts and lists."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    raise _Mismatch


def _to_float(value: Any, finite: bool) -> float:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, numbers.Real):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise _Mismatch from None
    else:
        raise _Mismatch
    if finite and not math.isfinite(out):
        raise _Mismatch
    return out


def _to_sequence(tp: Any, value: Any, finite: bool) -> Any:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if isinstance(value, Mapping):
        raise _Mismatch
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, int, int]: a fixed length
        if len(items) != len(args):
            raise _Mismatch
        return tuple(_convert(a, v, finite) for a, v in zip(args, items, strict=True))
    elem = args[0] if args else Any
    out = [_convert(elem, v, finite) for v in items]
    return out if origin is list else tuple(out)


def _to_union(tp: Any, value: Any, finite: bool) -> Any:
    members = typing.get_args(tp)
    if value is None and type(None) in members:
        return None
    for m in members:
        if m is not type(None):
            try:
                return _convert(m, value, finite)
            except _Mismatch:
                pass
    raise _Mismatch


def _to_literal(tp: Any, value: Any, finite: bool) -> Any:
    if any(value == c and type(value) is type(c) for c in typing.get_args(tp)):
        return value
    raise _Mismatch


def _to_mapping(tp: Any, value: Any, finite: bool) -> dict:
    if not isinstance(value, Mapping):
        raise _Mismatch
    vt = typing.get_args(tp)[1] if typing.get_args(tp) else Any
    return {k: _convert(vt, v, finite) for k, v in value.items()}


def _to_instance(tp: Any, value: Any, finite: bool) -> Any:
    """A value of a class: itself if it is one; a dataclass is also built from a mapping."""
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return build(tp, value)
    raise _Mismatch


def _exactly(kind: type) -> Callable[[Any, Any, bool], Any]:
    def convert(tp: Any, value: Any, finite: bool) -> Any:
        if type(value) is kind or (kind is str and isinstance(value, str)):
            return value
        raise _Mismatch

    return convert


_SCALARS: dict[Any, Callable[[Any, Any, bool], Any]] = {
    bool: _exactly(bool),
    str: _exactly(str),
    int: lambda tp, v, finite: _to_int(v),
    float: lambda tp, v, finite: _to_float(v, finite),
}


def _converter(tp: Any) -> Callable[[Any, Any, bool], Any]:
    """The conversion function for an annotation."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    if _is_union(tp):
        return _to_union
    if typing.get_origin(tp) is Literal:
        return _to_literal
    if _is_sequence(tp):
        return _to_sequence
    if typing.get_origin(tp) in (dict, Mapping) or tp in (dict, Mapping):
        return _to_mapping
    return _to_instance


def _convert(tp: Any, value: Any, finite: bool = True) -> Any:
    """`value` as the annotation `tp` says, or _Mismatch."""
    value = _plain(value)
    if tp is Any or tp is object:
        return value
    return _converter(tp)(tp, value, finite)


def describe(tp: Any, finite: bool = True) -> str:
    """What an annotation takes, in words ("an integer", "a list of strings", "a finite number or null")."""
    if tp is Any or tp is object:
        return "anything"
    if _is_union(tp):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        if members == [bool]:
            return "true, false or null"
        text = " or ".join(describe(m, finite) for m in members)
        return text + (" or null" if type(None) in typing.get_args(tp) else "")
    if typing.get_origin(tp) is Literal:
        return "one of: " + ", ".join(map(str, typing.get_args(tp)))
    if _is_sequence(tp):
        args = typing.get_args(tp)
        if (typing.get_origin(tp) or tp) is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items: " + ", ".join(describe(a, finite) for a in args)
        return "a list of " + _plural(args[0] if args else Any, finite)
    simple = {
        bool: "true or false",
        int: "an integer",
        float: "a finite number" if finite else "a number",
        str: "a string",
    }
    if tp in simple:
        return simple[tp]
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__}'s parameters"
    if typing.get_origin(tp) in (dict, Mapping) or tp in (dict, Mapping):
        return "a mapping"
    return f"a {getattr(tp, '__name__', tp)}"


def _plural(tp: Any, finite: bool) -> str:
    words = {bool: "booleans", int: "integers", float: "finite numbers" if finite else "numbers", str: "strings"}
    return words.get(tp) or f"items that are each {describe(tp, finite)}"


# ---------------------------------------------------------------------------------------------------------
# One field, a whole dataclass
# ---------------------------------------------------------------------------------------------------------
def _aliased(spec: Spec, value: Any) -> Any:
    for given, meant in spec.meta.get("aliases", ()):
        if type(given) is type(value) and given == value:
            return meant
    return value


def _check_constraints(spec: Spec, value: Any) -> None:
    items = value if isinstance(value, (list, tuple)) else [value]
    within: Interval | None = spec.meta.get("within")
    # the interval bounds the numbers only (a union such as `int | Literal["auto"]` lets a word through)
    if within is not None and not all(not isinstance(x, numbers.Real) or x in within for x in items):
        raise _OutOfRange(f"{'each item ' if isinstance(value, (list, tuple)) else ''}must be {within}")
    choices = spec.meta.get("choices")
    if choices is not None and not all(x is None or x in choices for x in items):
        raise _OutOfRange("must be one of: " + ", ".join(map(str, choices)))


def convert(spec: Spec, value: Any, *, where: str | None = None, prefix: str = "") -> Any:
    """One user value for the field `spec`, converted and checked (UserError naming where, key and value)."""
    raw = value
    finite = spec.meta.get("finite", True)
    try:
        value = _convert(spec.type, _aliased(spec, _plain(value)), finite)
        _check_constraints(spec, value)
    except _Mismatch:
        choices = spec.meta.get("choices")
        want = "one of: " + ", ".join(map(str, choices)) if choices else describe(spec.type, finite)
        raise UserError(_message(spec, raw, f"must be {want}", where, prefix)) from None
    except _OutOfRange as e:
        problem = e.what if e.what.startswith("must be one of") else f"is out of range: {e.what}"
        raise UserError(_message(spec, raw, problem, where, prefix)) from None
    return value


def _message(spec: Spec, value: Any, problem: str, where: str | None, prefix: str) -> str:
    hint = spec.meta.get("help")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _strip_none(spec.type) is str:
        hint = f"quote it: '{value}'"
    return f"{where + ': ' if where else ''}{prefix}{spec.key}={value!r} {problem}{f' ({hint})' if hint else ''}."


def build(cls: type, values: Mapping[str, Any], *, where: str | None = None, prefix: str = "") -> Any:
    """`cls` from user values keyed as users write them (`param_key`): unknown keys, wrong types and values out
    of range are refused before `cls` is constructed; a UserError of its own checks gets `where` in front.

    Args:
        cls: a dataclass (typically `Checked`).
        values: key -> value (OmegaConf containers are accepted).
        where: what the values are, for messages: a recipe file, `models[2]`, a config group such as `adapter=lora`.
        prefix: written before each key in messages (`adapter.` for `adapter.r=...`); without `where`, it also
            names the values in the unknown-key message (`trainer has no parameter(s) ...`).
    """
    values = _plain(values)
    label = where or prefix.rstrip(".") or cls.__name__
    if not isinstance(values, Mapping):
        raise UserError(f"{label}: expected a mapping of parameters, got {values!r}.")
    fields = specs(cls)
    unknown = [str(k) for k in values if k not in fields]
    if unknown:
        raise UserError(
            f"{label} has no parameter(s) {', '.join(unknown)}; it takes: {', '.join(sorted(fields)) or 'none'}."
        )
    kwargs = {fields[k].name: convert(fields[k], v, where=where, prefix=prefix) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except UserError as e:
        raise (UserError(f"{where}: {e}") if where else e) from None
    except TypeError as e:  # a field without a default that was not given
        raise UserError(f"{label}: {e}.") from None


def check(obj: Any) -> None:
    """Check (and convert, as `build` does) the fields of a constructed dataclass in place."""
    for spec in specs(type(obj)).values():
        value = getattr(obj, spec.name)
        converted = convert(spec, value, where=type(obj).__name__)
        if converted is not value:
            object.__setattr__(obj, spec.name, converted)


class Checked:
    """Base of parameters dataclasses: constructing one runs `check`. Subclasses with checks across fields
    extend `__post_init__`, calling `super().__post_init__()` first."""

    def __post_init__(self) -> None:
        check(self)
