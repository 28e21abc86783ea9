"""The parts of mergekit's recipe grammar beyond `models:`: model references, `slices:`, `modules:`.

    merge_method: slerp
    base_model: A                        # a path, `path+lora_dir`, or {model: PATH, lora: DIR}
    slices:                              # the output model, slice after slice (layers renumbered from 0)
      - sources:                         # the inputs of this slice, each a layer range [start, end) of a model
          - {model: A, layer_range: [0, 16], parameters: {...}}       # per-model settings of this source
          - {model: B, layer_range: [0, 16]}
        base_model: A                    # this slice's base (default: the recipe's); must be one of its sources
        parameters: {t: [0, 1]}          # settings for this slice (between the sources' and the top level's)
      - sources: [{model: B, layer_range: [16, 32]}]
    modules:                             # instead of slices/models: one definition per tower of the model
      encoder: {slices: [...], parameters: {...}}     # a module is named by the tensor-name prefix it covers
      decoder: {models: [...]}

Exactly one of `models`, `slices` and `modules` is given. Everything here is checked when the recipe is read
(settings against the method's parameters, layer ranges against each other); what needs the models (a layer range
beyond a model's layers) is checked when they are opened (`merging.plan`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merging.settings import check_scope
from peft_lab.errors import UserError
from peft_lab.params import specs

__all__ = ["ModelRef", "Source", "Slice", "Module", "Layout", "model_ref", "parse_layout", "split_scope", "NOOP_KEYS"]

log = logging.getLogger(__name__)

# parameters mergekit accepts that change nothing in the result here (a memory option): accepted and recorded
NOOP_KEYS = ("int8_mask",)


@dataclass(frozen=True)
class ModelRef:
    """A model as a recipe names it: a path, and a PEFT LoRA dir applied to it first (mergekit's `path+lora`)."""

    path: str
    lora: str | None = None

    def __str__(self) -> str:
        return self.path if self.lora is None else f"{self.path}+{self.lora}"

    @property
    def key(self) -> tuple[str, str | None]:
        """What identifies the model: the real paths (two spellings of one model are one model)."""
        real = lambda p: os.path.realpath(os.path.expanduser(p))  # noqa: E731
        return real(self.path), None if self.lora is None else real(self.lora)

    def same(self, other: ModelRef | None) -> bool:
        return other is not None and self.key == other.key

    def to_yaml(self) -> Any:
        return str(self) if self.lora is None or "+" in self.path else {"model": self.path, "lora": self.lora}


def _path_part(value: Any, what: str, where: str) -> str:
    if isinstance(value, Mapping) and set(value) <= {"path", "revision"} and "path" in value:
        if value.get("revision"):
            raise UserError(f"{where}: {what} {value!r} names a Hub revision; peft-lab merges local paths only.")
        value = value["path"]
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise UserError(
            f"{where}: a model must be a path (an HF model dir, a .safetensors file or an adapter dir), "
            f"`path+lora_dir`, or {{model: PATH, lora: DIR}}; got {value!r}."
        )
    return str(value)


def model_ref(value: Any, where: str) -> ModelRef:
    """A model reference as mergekit writes it: `PATH`, `PATH+LORA_DIR`, {model: PATH, lora: DIR} or {path: PATH}."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"model", "path", "lora"}
        if unknown or not (("model" in value) ^ ("path" in value)):
            raise UserError(
                f"{where}: a model reference is PATH, PATH+LORA_DIR or {{model: PATH, lora: LORA_DIR}}; got "
                f"{dict(value)!r}" + (f" (unknown key(s) {', '.join(map(str, sorted(unknown)))})." if unknown else ".")
            )
        path = _path_part(value.get("model", value.get("path")), "model", where)
        lora = value.get("lora")
        return ModelRef(path, None if lora is None else _path_part(lora, "lora", where))
    text = _path_part(value, "model", where)
    if "+" in text and not os.path.exists(text):
        path, _, lora = text.partition("+")
        if path and lora and "+" not in lora:
            return ModelRef(path, lora)
    return ModelRef(text)


@dataclass(frozen=True)
class Source:
    """One input of a slice: a model's layers [start, end) and its own per-model settings."""

    model: ModelRef
    layers: tuple[int, int]
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Slice:
    """Consecutive output layers: layer k of the slice merges layer start + k of each source."""

    sources: tuple[Source, ...]
    base: ModelRef | None = None  # this slice's base_model (None: the recipe's)
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].length


@dataclass(frozen=True)
class Module:
    """The output of one tower (`modules:`), or of the whole model (`slices:`: name None): slices, or whole models
    (`models:`, as (reference, own settings) pairs), with the module's own settings."""

    name: str | None
    slices: tuple[Slice, ...] = ()
    models: tuple[tuple[ModelRef, Mapping[str, Any]], ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """What the output is made of, as `slices:` or `modules:` give it."""

    modules: tuple[Module, ...]
    form: str  # "slices" | "modules"

    def to_dict(self) -> dict[str, Any]:
        """The `slices:` or `modules:` of the recipe, as a recipe writes them (settings as given)."""

        def params(settings):
            return {"parameters": dict(settings)} if settings else {}

        def slices(m: Module) -> list[dict[str, Any]]:
            out = []
            for sl in m.slices:
                srcs = [{"model": s.model.to_yaml(), "layer_range": list(s.layers), **params(s.settings)}
                        for s in sl.sources]  # fmt: skip
                base = {"base_model": sl.base.to_yaml()} if sl.base is not None else {}
                out.append({"sources": srcs, **base, **params(sl.settings)})
            return out

        if self.form == "slices":
            return {"slices": slices(self.modules[0])}
        mods = {}
        for m in self.modules:
            body = {"slices": slices(m)} if m.slices else {"models": [{"model": r.to_yaml(), **params(s)}
                                                                      for r, s in m.models]}  # fmt: skip
            mods[m.name] = {**body, **params(m.settings)}
        return {"modules": mods}

    def refs(self) -> list[ModelRef]:
        """Every model named, once each, in recipe order (slice bases included)."""
        out: list[ModelRef] = []
        for m in self.modules:
            refs = [r for r, _ in m.models] + [x for s in m.slices for x in (*(src.model for src in s.sources), s.base)]
            for r in refs:
                if r is not None and not any(r.same(o) for o in out):
                    out.append(r)
        return out


def split_scope(cls: type, scope: Any, where: str, *, shared: bool = True, noop: dict | None = None) -> dict[str, Any]:
    """One `parameters` mapping checked against a method (`cls`): its shared and per-model parameters (only the
    per-model ones with `shared=False`: a source's settings); unknown keys refused with the known ones; the no-op
    keys (`int8_mask`) moved into `noop`."""
    if scope is not None and not isinstance(scope, Mapping):
        raise UserError(f"{where}: `parameters` must be a mapping, got {scope!r}.")
    scope = dict(scope or {})
    own, per_model = specs(cls.Params), specs(cls.ModelParams)
    for k in NOOP_KEYS:
        if k in scope and k not in own and k not in per_model:
            if noop is not None:
                noop[k] = scope[k]
            del scope[k]
    allowed = (set(own) if shared else set()) | set(per_model)
    bad = [k for k in scope if k not in allowed]
    if bad:
        if not shared and any(k in own for k in bad):
            raise UserError(
                f"{where}: {', '.join(k for k in bad if k in own)} applies to the whole merge, not to one model "
                "(mergekit ignores it there): give it in the slice's or the recipe's `parameters`."
            )
        raise UserError(
            f"{where}: {cls.name} has no {'per-model ' if not shared else ''}parameter {', '.join(map(str, bad))}; "
            f"its {'per-model ' if not shared else ''}parameters are: {', '.join(sorted(allowed)) or '(none)'}."
        )
    out = check_scope(cls.ModelParams, scope, where)
    if shared:
        out.update(check_scope(cls.Params, scope, where))
    return out


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    if not ok:
        raise UserError(f"{where}: layer_range must be [start, end] (integers, end excluded), got {value!r}.")
    a, b = value
    if a < 0 or b <= a:
        raise UserError(
            f"{where}: layer_range [{a}, {b}] is empty or reversed: it is [start, end) with 0 <= start < end "
            "(layers start to end − 1)."
        )
    return a, b


def _source(cls: type, raw: Any, where: str, noop: dict) -> Source:
    if not isinstance(raw, Mapping) or "model" not in raw or "layer_range" not in raw:
        raise UserError(f"{where}: a source is {{model: PATH, layer_range: [start, end], parameters: {{...}}}}.")
    extra = [k for k in raw if k not in ("model", "layer_range", "parameters")]
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, extra))}; a source has model, layer_range, "
                        "parameters.")  # fmt: skip
    ref = model_ref(raw["model"], where)
    settings = split_scope(cls, raw.get("parameters"), f"{where} ({ref})", shared=False, noop=noop)
    return Source(ref, _layer_range(raw["layer_range"], where), settings)


def _slice(cls: type, raw: Any, where: str, noop: dict) -> Slice:
    if not isinstance(raw, Mapping) or not raw.get("sources"):
        raise UserError(f"{where}: a slice is {{sources: [{{model, layer_range}}, ...], base_model, parameters}}.")
    extra = [k for k in raw if k not in ("sources", "base_model", "parameters", "residual_weight")]
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, extra))}; a slice has sources, base_model, "
                        "parameters (and residual_weight, which mergekit ignores).")  # fmt: skip
    if isinstance(raw["sources"], (str, Mapping)):
        raise UserError(f"{where}: `sources` must be a list of {{model, layer_range}} entries.")
    sources = tuple(_source(cls, s, f"{where}.sources[{i}]", noop) for i, s in enumerate(raw["sources"]))
    lengths = {s.length for s in sources}
    if len(lengths) > 1:
        shown = ", ".join(f"{s.model} {list(s.layers)}" for s in sources)
        raise UserError(
            f"{where}: its sources span different numbers of layers ({shown}); every source of a slice gives the "
            "same number of layers (layer k of the slice merges layer start + k of each)."
        )
    for i, s in enumerate(sources):
        if any(s.model.same(o.model) for o in sources[:i]):
            raise UserError(f"{where}: {s.model} is a source twice; a slice merges each model once.")
    if raw.get("residual_weight") is not None:
        log.warning("%s: residual_weight has no effect (mergekit reads it and ignores it too)", where)
    base = raw.get("base_model")
    return Slice(sources, None if base is None else model_ref(base, f"{where}.base_model"),
                 split_scope(cls, raw.get("parameters"), f"{where}.parameters", noop=noop))  # fmt: skip


def check_slice_inputs(cls: type, sl: Slice, base: ModelRef | None, where: str) -> None:
    """The slice's sources fit the method: its base among them when the method takes one, the count of inputs."""
    base = sl.base or base
    has_base = base is not None and any(s.model.same(base) for s in sl.sources)
    if cls.needs_base and not has_base:
        raise UserError(
            f"{where}: {cls.name} needs a base model among the slice's sources"
            + (f"; the slice's base_model {base} is not one of them: add it as a source with the same layer_range."
               if base is not None else ": give base_model (the recipe's or the slice's) and list it as a source.")
        )  # fmt: skip
    n = len(sl.sources) - int(has_base and not cls.base_is_input)
    if n < cls.min_models or (cls.max_models is not None and n > cls.max_models):
        want = f"exactly {cls.min_models}" if cls.max_models == cls.min_models else f"at least {cls.min_models}"
        if cls.max_models not in (None, cls.min_models):
            want = f"{cls.min_models} to {cls.max_models}"
        raise UserError(
            f"{where}: {cls.name} merges {want} model(s)"
            + (" besides the base" if cls.needs_base else "")
            + f" per slice, got {n}"
            + (" (a frankenmerge stacks one source per slice)." if cls.name == "passthrough" else ".")
        )


def _check_order(cls: type, slices: Sequence[Slice], where: str) -> None:
    """A merge of several models reads each model's layers once, in order; only passthrough stacks repeated or
    reordered ranges (frankenmerges)."""
    if cls.name == "passthrough":
        return
    seen: dict[tuple, tuple[int, int, int]] = {}
    for i, sl in enumerate(slices):
        for s in sl.sources:
            prev = seen.get(s.model.key)
            if prev is not None and s.layers[0] < prev[1]:
                raise UserError(
                    f"{where}: {s.model} gives layers {list(prev[:2])} in slices[{prev[2]}] and {list(s.layers)} in "
                    f"slices[{i}]: with {cls.name} each model's layer ranges must follow each other without overlap "
                    "(a merge reads every layer once, in order). To stack repeated or reordered layers "
                    "(a frankenmerge), use merge_method: passthrough with one source per slice."
                )
            seen[s.model.key] = (*s.layers, i)


def _slices(cls: type, raw: Any, base: ModelRef | None, where: str, noop: dict) -> tuple[Slice, ...]:
    if not raw or isinstance(raw, (str, Mapping)) or not isinstance(raw, Sequence):
        raise UserError(f"{where}: `slices` must be a non-empty list of {{sources: [...]}} entries.")
    slices = tuple(_slice(cls, s, f"{where}[{i}]", noop) for i, s in enumerate(raw))
    for i, sl in enumerate(slices):
        check_slice_inputs(cls, sl, base, f"{where}[{i}]")
    _check_order(cls, slices, where)
    return slices


def _module_models(cls: type, raw: Any, where: str, noop: dict) -> tuple[tuple[ModelRef, dict], ...]:
    if isinstance(raw, (str, Mapping)) or not isinstance(raw, Sequence) or not raw:
        raise UserError(f"{where}: `models` must be a non-empty list of {{model: PATH, parameters: {{...}}}}.")
    out = []
    for i, e in enumerate(raw):
        e = {"model": e} if isinstance(e, (str, os.PathLike)) else e
        if not isinstance(e, Mapping) or "model" not in e or set(e) - {"model", "parameters"}:
            raise UserError(f"{where}[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {e!r}.")
        ref = model_ref(e["model"], f"{where}[{i}]")
        out.append((ref, split_scope(cls, e.get("parameters"), f"{where}[{i}] ({ref})", shared=False, noop=noop)))
    return tuple(out)


def parse_layout(cls: type, raw: Mapping[str, Any], base: ModelRef | None, where: str, noop: dict) -> Layout | None:
    """The `slices:` or `modules:` of a recipe (None for the `models:` form); exactly one of the three is given."""
    given = [k for k in ("models", "slices", "modules") if raw.get(k)]
    if len(given) != 1:
        raise UserError(
            f"{where}: give exactly one of `models` (whole models), `slices` (layer ranges) or `modules` (per tower)"
            + (f"; this recipe has {' and '.join(given)}." if given else ".")
        )
    if given == ["models"]:
        return None
    if given == ["slices"]:
        return Layout((Module(None, _slices(cls, raw["slices"], base, f"{where}: slices", noop)),), "slices")
    mods = raw["modules"]
    if not isinstance(mods, Mapping):
        raise UserError(f"{where}: `modules` maps a module name to {{slices: [...]}} or {{models: [...]}}.")
    out = []
    for name, m in mods.items():
        w = f"{where}: modules.{name}"
        if not isinstance(m, Mapping) or bool(m.get("slices")) == bool(m.get("models")):
            raise UserError(f"{w}: give exactly one of `slices` or `models` (and optionally `parameters`).")
        extra = [k for k in m if k not in ("slices", "models", "parameters")]
        if extra:
            raise UserError(f"{w}: unknown key(s) {', '.join(map(str, extra))}; a module has slices or models, and "
                            "parameters.")  # fmt: skip
        settings = split_scope(cls, m.get("parameters"), f"{w}.parameters", noop=noop)
        if m.get("slices"):
            out.append(Module(str(name), _slices(cls, m["slices"], base, f"{w}.slices", noop), settings=settings))
        else:
            out.append(Module(str(name), models=_module_models(cls, m["models"], f"{w}.models", noop),
                              settings=settings))  # fmt: skip
    return Layout(tuple(out), "modules")
