"""Recipes: a mergekit-style YAML/dict or a Hydra config, validated into one `Recipe`.

Both CLI forms end here: `peft-lab merge --config RECIPE.yaml` parses the file, the Hydra form turns its
composed config into the same mergekit-style dict (`hydra_to_dict`), and `parse_recipe` validates it:

    merge_method: ties                  # a registry name (merging.METHODS)
    base_model: PATH                    # HF dir | sharded dir | .safetensors file
    models:                             # HF dirs, .safetensors files, PEFT / peft-lab adapter dirs
      - model: PATH
        parameters: {weight: 1.0, density: 0.2}
    parameters: {lambda: 1.0, normalize: true}   # the method's own parameters + defaults for per-model ones
    dtype: bfloat16                     # output dtype (default: the base model's); arithmetic is float32
    data: {...}                         # data-driven methods only: the examples they need

Any parameter may be a per-layer gradient or per-tensor conditional values, as in mergekit (`merging.settings`):
`t: [0, 0.5, 1]`, `density: [{filter: mlp, value: 0.3}, {value: 0.5}]`. Per-model parameters resolve as in
mergekit: the model's own value, else the top-level one, else the method's default. Methods that merge task
vectors drop a `models` entry that is the base model itself; `linear` adds a `base_model` that is not listed as
one more input (mergekit does both). Unknown keys, unsupported mergekit features and out-of-range values are
refused with one message each.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from merging.base import METHODS, MergeMethod
from merging.settings import Resolver, check_scope, is_scalar
from peft_lab.errors import UserError
from peft_lab.params import Checked, build, param, param_key, specs

__all__ = ["Recipe", "InputModel", "Options", "parse_recipe", "load_recipe", "hydra_to_dict", "DTYPES", "OPTION_KEYS"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
HASHES = ("sha256", "none")
RECIPE_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")

# keys peft-lab writes into merge_recipe.yaml besides the recipe; accepted (and ignored) when it is re-run
RECORD_KEYS = ("inputs", "tool")
UNSUPPORTED = {
    "slices": "layer slices (frankenmerges)",
    "modules": "per-module recipes",
    "tokenizer": "tokenizer surgery",
    "chat_template": "chat template selection",
}


@dataclass(frozen=True)
class Options(Checked):
    """How to run a merge (not part of what is merged).

    Attributes:
        overwrite: replace a non-empty output dir (only once the new one is complete).
        allow_pickle: load `.bin`/`.pt` inputs (this can execute code from the file).
        allow_nonfinite: merge inputs that contain NaN/inf instead of refusing them.
        progress: show progress bars (None: only when stderr is a terminal).
        max_shard_size: output shard size ("5GB", "500MB", bytes).
        hash: content hash of the input files recorded in the recipe (`sha256`, or `none` to skip it).
        chunk_size: elements per streamed chunk (memory is a few chunks of float32 per input).
        threads: torch intra-op threads while tensors stream (`auto`: leave torch's setting). The streaming loops
            are memory-bound: one thread is as fast as several on an idle machine and much faster on a busy one,
            where spinning worker threads compete for the cores (a data-driven method's model runs are not
            affected).
    """

    overwrite: bool = False
    allow_pickle: bool = False
    allow_nonfinite: bool = False
    progress: bool | None = None
    max_shard_size: int | str = "5GB"
    hash: str = param("sha256", choices=HASHES)
    chunk_size: int = param(1 << 22, within="[16, inf)")
    threads: int | Literal["auto"] = param(1, within="[1, inf)", help="a positive integer, or auto for torch's default")

    def __post_init__(self):
        super().__post_init__()
        if self.chunk_size % 2:  # DARE's random stream is drawn two values at a time
            object.__setattr__(self, "chunk_size", self.chunk_size + 1)


OPTION_KEYS = tuple(f.name for f in dataclasses.fields(Options))


@dataclass(frozen=True)
class InputModel:
    """One model to merge.

    Attributes:
        path: as written in the recipe.
        params: its per-model parameters outside any gradient or filter (all of them, for a recipe of scalars).
        settings: the per-model settings of its own entry, as given (checked): scalars, gradients, filters.
    """

    path: str
    params: Any
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe.

    Attributes:
        method: the method instance (its `params` validated).
        base: the base model path (None when the method takes none and none was given).
        models: the inputs, in recipe order, with resolved per-model parameters.
        dtype: the requested output dtype (None: each tensor keeps the base model's dtype).
        options: how to run it.
        data: the examples data-driven methods need (the recipe's `data` mapping; `MergeInputs.extra["data"]`).
        parameters: the top-level `parameters` settings as given (checked): the method's and per-model defaults.
    """

    method: MergeMethod
    base: str | None
    models: tuple[InputModel, ...]
    dtype: torch.dtype | None
    options: Options = field(default_factory=Options)
    data: Any = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def resolver(self) -> Resolver:
        """Each tensor's parameters (`merging.settings.Resolver`) from the settings of this recipe."""
        cls = type(self.method)
        shared = {k: v for k, v in self.parameters.items() if k in specs(cls.Params)}
        defaults = {k: v for k, v in self.parameters.items() if k in specs(cls.ModelParams)}
        return Resolver(cls.Params, [shared], cls.ModelParams, [[m.settings, defaults] for m in self.models])

    def to_dict(self) -> dict[str, Any]:
        """The canonical recipe, a valid input to `parse_recipe`: every parameter resolved to its value (defaults
        filled in), except those given as gradients or filters, which are kept as given."""
        schedules = {k: v for k, v in self.parameters.items() if not is_scalar(v)}
        d: dict[str, Any] = {"merge_method": self.method.name}
        if self.base is not None:
            d["base_model"] = self.base
        d["models"] = []
        for m in self.models:
            values = {k: v for k, v in _fields_dict(m.params).items() if k not in schedules}  # those apply as given
            values.update({k: v for k, v in m.settings.items() if not is_scalar(v)})
            d["models"].append({"model": m.path, "parameters": values})
        d["parameters"] = {**_fields_dict(self.method.params), **schedules}
        d["dtype"] = DTYPE_NAMES[self.dtype] if self.dtype is not None else None
        if self.data is not None:
            d["data"] = self.data
        return d


def _fields_dict(obj: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(obj):
        return {}
    return {param_key(f): getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _path(value: Any, where: str) -> str:
    if isinstance(value, Mapping) and "path" in value:  # mergekit's ModelReference {path: ..., lora: ...}
        if value.get("lora"):
            raise UserError(
                f"{where}: mergekit's `lora:` model references are not supported; give the adapter dir itself as "
                "the model."
            )
        value = value["path"]
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise UserError(
            f"{where}: a model must be a path (an HF model dir, a .safetensors file or an adapter dir), got {value!r}."
        )
    return str(value)


def parse_recipe(raw: Mapping[str, Any], *, where: str = "recipe", **options: Any) -> Recipe:
    """Validate a mergekit-style recipe dict (plus peft-lab's run options, as keys or keywords)."""
    raw = _without_extras(raw, where)
    opts = _options(raw, options, where)
    data = _data(raw.pop("data", None), where)
    _check_keys(raw, where)
    cls = _method_class(raw, where)
    dtype = _dtype(raw.get("out_dtype") or raw.get("dtype"), where)
    top = _parameters(cls, raw.get("parameters"), where)
    base = raw.get("base_model")
    base = None if base is None else _path(base, f"{where}: base_model")
    entries = _models(cls, raw.get("models"), base, where)
    _check_count(cls, entries, base, where)
    shared = {k: v for k, v in top.items() if k in specs(cls.Params)}
    defaults = {k: v for k, v in top.items() if k in specs(cls.ModelParams)}
    resolver = Resolver(cls.Params, [shared], cls.ModelParams, [[own, defaults] for _, own in entries], where)
    _check_per_tensor(cls, resolver, where)
    method = cls(resolver.shared())
    method.check_settings([shared], [[own, defaults] for _, own in entries])
    models = [InputModel(path, p, own) for (path, own), p in zip(entries, resolver.models(), strict=True)]
    method.check_models([m.params for m in models], [m.path for m in models])
    return Recipe(
        method=method,
        base=base,
        models=tuple(models),
        dtype=dtype,
        options=opts,
        data=None if data is None else dict(data),
        parameters=top,
    )


def _check_per_tensor(cls: type[MergeMethod], resolver: Resolver, where: str) -> None:
    if not cls.per_tensor_params and not resolver.constant:
        raise UserError(
            f"{where}: {cls.name} learns or computes its statistics for the whole model from one set of parameters; "
            "its parameters cannot be per-layer gradients or per-tensor filters: give one value each."
        )


def _without_extras(raw: Any, where: str) -> dict[str, Any]:
    """The recipe as a dict without the keys peft-lab ignores; mergekit features it does not support refused."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}: a recipe is a mapping with merge_method, models, ...; got {type(raw).__name__}.")
    raw = dict(raw)
    for key, what in UNSUPPORTED.items():
        if raw.get(key):
            raise UserError(
                f"{where}: `{key}` ({what}) is a mergekit feature peft-lab merge does not support; "
                "list whole models under `models:`."
            )
        raw.pop(key, None)
    ts = raw.pop("tokenizer_source", None)
    if ts not in (None, "base"):
        raise UserError(
            f"{where}: tokenizer_source={ts!r} is not supported; the tokenizer is copied from the base model."
        )
    for k in RECORD_KEYS:
        raw.pop(k, None)
    return raw


def _options(raw: dict[str, Any], given: Mapping[str, Any], where: str) -> Options:
    """The run options: the recipe's option keys (popped from `raw`), overridden by keywords that are not None."""
    opts = {k: raw.pop(k) for k in OPTION_KEYS if k in raw}
    opts.update({k: v for k, v in given.items() if v is not None})
    unknown = [k for k in opts if k not in OPTION_KEYS]
    if unknown:
        raise UserError(f"Unknown option(s) {', '.join(unknown)}; options are: {', '.join(OPTION_KEYS)}.")
    return build(Options, opts, where=f"{where}: run options")


def _data(data: Any, where: str) -> Mapping[str, Any] | None:
    if data is not None and not isinstance(data, Mapping):
        raise UserError(f"{where}: `data` must be a mapping (the examples a data-driven method needs), got {data!r}.")
    return data


def _check_keys(raw: Mapping[str, Any], where: str) -> None:
    unknown = [k for k in raw if k not in RECIPE_KEYS]
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}. A recipe has merge_method, base_model, models, "
            f"parameters, dtype, data (and run options {', '.join(OPTION_KEYS)})."
        )


def _method_class(raw: Mapping[str, Any], where: str) -> type[MergeMethod]:
    if not raw.get("merge_method"):
        raise UserError(f"{where}: merge_method is missing (one of: {', '.join(METHODS.names())}).")
    return METHODS.get(str(raw["merge_method"]))


def _dtype(name: Any, where: str) -> torch.dtype | None:
    """mergekit's `dtype` is its compute dtype and `out_dtype` the output's; peft-lab computes in float32."""
    if name is None:
        return None
    if str(name) not in DTYPES:
        raise UserError(f"{where}: dtype {name!r} is not one of: {', '.join(sorted(DTYPE_NAMES.values()))}.")
    return DTYPES[str(name)]


def _parameters(cls: type[MergeMethod], top: Any, where: str) -> dict[str, Any]:
    """The top-level `parameters` settings (the method's and per-model defaults), each checked."""
    top = top or {}
    if not isinstance(top, Mapping):
        raise UserError(f"{where}: `parameters` must be a mapping, got {top!r}.")
    shared, per_model = specs(cls.Params), specs(cls.ModelParams)
    bad = [k for k in top if k not in shared and k not in per_model]
    if bad:
        allowed = sorted(set(shared) | set(per_model))
        raise UserError(
            f"{where}: {cls.name} has no parameter {', '.join(map(str, bad))}; "
            f"its parameters are: {', '.join(allowed) or '(none)'}."
        )
    wh = f"{where}: parameters"
    return {**check_scope(cls.Params, top, wh), **check_scope(cls.ModelParams, top, wh)}


def _models(cls: type[MergeMethod], entries: Any, base: str | None, where: str) -> list[tuple[str, dict[str, Any]]]:
    """The `models` entries: (path, own per-model settings, checked)."""
    if entries is None or isinstance(entries, (str, Mapping)) or not hasattr(entries, "__iter__"):
        raise UserError(f"{where}: `models` must be a list of {{model: PATH, parameters: {{...}}}} entries.")
    models = []
    for i, entry in enumerate(entries):
        model = _model(cls, entry, base, f"{where}: models[{i}]")
        if model is not None:
            models.append(model)
    if cls.base_is_input and base is not None and not any(_same_path(m, base) for m, _ in models):
        models.append((base, {}))
    return models


def _model(cls: type[MergeMethod], entry: Any, base: str | None, where: str) -> tuple[str, dict[str, Any]] | None:
    """One `models` entry (None for the base model listed among the inputs, mergekit style)."""
    if isinstance(entry, (str, os.PathLike)):
        entry = {"model": entry}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise UserError(f"{where}: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}.")
    extra = [k for k in entry if k not in ("model", "parameters")]
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, extra))} (an entry has model and parameters).")
    path = _path(entry["model"], where)
    if base is not None and cls.needs_base and not cls.base_is_input and _same_path(path, base):
        return None  # the base model listed among the inputs: it is the base, not a task
    own = entry.get("parameters") or {}
    if not isinstance(own, Mapping):
        raise UserError(f"{where}: `parameters` must be a mapping, got {own!r}.")
    per_model = specs(cls.ModelParams)
    bad = [k for k in own if k not in per_model]
    if bad:
        raise UserError(
            f"{where}: {cls.name} has no per-model parameter {', '.join(map(str, bad))}"
            + (f"; per-model parameters are: {', '.join(per_model)}." if per_model else " (it takes none).")
        )
    return path, check_scope(cls.ModelParams, own, f"{where} ({path})")


def _check_count(cls: type[MergeMethod], models: list, base: str | None, where: str) -> None:
    if cls.needs_base and base is None:
        raise UserError(f"{where}: {cls.name} needs base_model (the model the task vectors are taken against).")
    if len(models) >= cls.min_models and (cls.max_models is None or len(models) <= cls.max_models):
        return
    want = (
        f"exactly {cls.min_models}"
        if cls.max_models == cls.min_models
        else f"at least {cls.min_models}"
        if cls.max_models is None
        else f"{cls.min_models} to {cls.max_models}"
    )
    raise UserError(
        f"{where}: {cls.name} merges {want} model(s) besides the base, got {len(models)}"
        + (" (entries equal to base_model count as the base)." if base is not None and cls.needs_base else ".")
    )


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any], **options: Any) -> Recipe:
    """A recipe from a dict, a `Recipe`, or a path to a YAML file."""
    if isinstance(recipe, Recipe):
        if not options:
            return recipe
        return dataclasses.replace(recipe, options=_options(_fields_dict(recipe.options), options, "recipe"))
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe, **options)
    path = Path(recipe)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e}).") from None
    return parse_recipe(raw, where=str(path), **options)


def hydra_to_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The Hydra form's composed config (`method` group + base/models/dtype/options) as a recipe dict."""
    method = dict(cfg.get("method") or {})
    name = method.pop("name", None)
    d: dict[str, Any] = {"merge_method": name, "models": list(cfg.get("models") or []), "parameters": method}
    if cfg.get("base") is not None:
        d["base_model"] = cfg["base"]
    if cfg.get("dtype") is not None:
        d["dtype"] = cfg["dtype"]
    if cfg.get("data") is not None:  # e.g. +data.tasks='[...]' for data-driven methods
        d["data"] = cfg["data"]
    for k in OPTION_KEYS:
        if k in cfg:
            d[k] = cfg[k]
    return d
