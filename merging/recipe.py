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

Per-model parameters resolve as in mergekit: the model's own value, else the top-level one, else the method's
default. Methods that merge task vectors drop a `models` entry that is the base model itself; `linear` adds a
`base_model` that is not listed as one more input (mergekit does both). Unknown keys, unsupported mergekit
features (slices, per-layer parameter schedules) and out-of-range values are refused with one message each.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from merging.base import METHODS, MergeMethod, param_key
from peft_lab.errors import UserError

__all__ = ["Recipe", "InputModel", "Options", "parse_recipe", "load_recipe", "hydra_to_dict", "DTYPES", "OPTION_KEYS"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}  # fmt: skip
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
HASHES = ("sha256", "none")

# keys peft-lab writes into merge_recipe.yaml besides the recipe; accepted (and ignored) when it is re-run
RECORD_KEYS = ("inputs", "tool")
UNSUPPORTED = {
    "slices": "layer slices (frankenmerges)",
    "modules": "per-module recipes",
    "tokenizer": "tokenizer surgery",
    "chat_template": "chat template selection",
}


@dataclass(frozen=True)
class Options:
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
    hash: str = "sha256"
    chunk_size: int = 1 << 22
    threads: int | str = 1

    def __post_init__(self):
        for k in ("overwrite", "allow_pickle", "allow_nonfinite"):
            if not isinstance(getattr(self, k), bool):
                raise UserError(f"Option {k}={getattr(self, k)!r} must be true or false.")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise UserError(f"Option progress={self.progress!r} must be true, false or null (auto).")
        if self.hash not in HASHES:
            raise UserError(f"Option hash={self.hash!r} must be one of: {', '.join(HASHES)}.")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 16:
            raise UserError(f"Option chunk_size={self.chunk_size!r} must be an integer >= 16.")
        if self.threads != "auto" and (not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1):
            raise UserError(f"Option threads={self.threads!r} must be a positive integer, or auto for torch's default.")
        if self.chunk_size % 2:  # DARE's random stream is drawn two values at a time
            object.__setattr__(self, "chunk_size", self.chunk_size + 1)


OPTION_KEYS = tuple(f.name for f in dataclasses.fields(Options))


@dataclass(frozen=True)
class InputModel:
    """One model to merge: its path as written in the recipe and its resolved per-model parameters."""

    path: str
    params: Any


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
    """

    method: MergeMethod
    base: str | None
    models: tuple[InputModel, ...]
    dtype: torch.dtype | None
    options: Options = field(default_factory=Options)
    data: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The canonical recipe (every parameter resolved), a valid input to `parse_recipe`."""
        d: dict[str, Any] = {"merge_method": self.method.name}
        if self.base is not None:
            d["base_model"] = self.base
        d["models"] = [{"model": m.path, "parameters": _fields_dict(m.params)} for m in self.models]
        d["parameters"] = _fields_dict(self.method.params)
        d["dtype"] = DTYPE_NAMES[self.dtype] if self.dtype is not None else None
        if self.data is not None:
            d["data"] = self.data
        return d


def _fields_dict(obj: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(obj):
        return {}
    return {param_key(f): getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _keys(cls: type) -> dict[str, str]:
    """recipe key -> field name of a parameters dataclass."""
    return {param_key(f): f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def _list_keys(cls: type) -> set[str]:
    """Recipe keys of fields that take a list (their annotation or default is a sequence), e.g. AdaMerging's heads."""
    if not dataclasses.is_dataclass(cls):
        return set()
    out = set()
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, (list, tuple)) or any(t in str(f.type) for t in ("tuple", "list", "Sequence")):
            out.add(param_key(f))
    return out


def _scalar(method: str, key: str, value: Any, where: str, lists: set[str] = frozenset()) -> Any:
    if key in lists and isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, (list, tuple, Mapping)):
        raise UserError(
            f"{where}: parameter {key} of {method} is given as {type(value).__name__} ({value!r}); peft-lab merge "
            "takes one value per parameter (mergekit's per-layer gradients and filters are not supported)."
        )
    return value


def _build(cls: type, values: dict[str, Any], where: str, method: str) -> Any:
    try:
        return cls(**values)
    except TypeError as e:  # a required field missing, or a wrong keyword (already filtered)
        raise UserError(f"{where}: invalid parameters for {method}: {e}.") from None
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _path(value: Any, where: str) -> str:
    if isinstance(value, Mapping) and "path" in value:  # mergekit's ModelReference {path: ..., lora: ...}
        if value.get("lora"):
            raise UserError(f"{where}: mergekit's `lora:` model references are not supported; give the adapter dir itself as the model.")
        value = value["path"]
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise UserError(f"{where}: a model must be a path (an HF model dir, a .safetensors file or an adapter dir), got {value!r}.")
    return str(value)


def parse_recipe(raw: Mapping[str, Any], *, where: str = "recipe", **options: Any) -> Recipe:
    """Validate a mergekit-style recipe dict (plus peft-lab's run options, as keys or keywords)."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}: a recipe is a mapping with merge_method, models, ...; got {type(raw).__name__}.")
    raw = dict(raw)
    for key, what in UNSUPPORTED.items():
        if raw.get(key):
            raise UserError(f"{where}: `{key}` ({what}) is a mergekit feature peft-lab merge does not support; list whole models under `models:`.")
        raw.pop(key, None)
    ts = raw.pop("tokenizer_source", None)
    if ts not in (None, "base"):
        raise UserError(f"{where}: tokenizer_source={ts!r} is not supported; the tokenizer is copied from the base model.")
    opts = {k: raw.pop(k) for k in OPTION_KEYS if k in raw}
    for k in RECORD_KEYS:
        raw.pop(k, None)
    opts.update({k: v for k, v in options.items() if v is not None})
    unknown_opts = [k for k in opts if k not in OPTION_KEYS]
    if unknown_opts:
        raise UserError(f"Unknown option(s) {', '.join(unknown_opts)}; options are: {', '.join(OPTION_KEYS)}.")
    data = raw.pop("data", None)
    if data is not None and not isinstance(data, Mapping):
        raise UserError(f"{where}: `data` must be a mapping (the examples a data-driven method needs), got {data!r}.")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}. A recipe has merge_method, base_model, models, "
            f"parameters, dtype (and run options {', '.join(OPTION_KEYS)})."
        )
    if not raw.get("merge_method"):
        raise UserError(f"{where}: merge_method is missing (one of: {', '.join(METHODS.names())}).")
    cls: type[MergeMethod] = METHODS.get(str(raw["merge_method"]))
    name = cls.name

    # dtype: mergekit's `dtype` is its compute dtype and `out_dtype` the output's; peft-lab computes in float32
    dtype_name = raw.get("out_dtype") or raw.get("dtype")
    dtype = None
    if dtype_name is not None:
        if str(dtype_name) not in DTYPES:
            raise UserError(f"{where}: dtype {dtype_name!r} is not one of: {', '.join(sorted(DTYPE_NAMES.values()))}.")
        dtype = DTYPES[str(dtype_name)]

    top = raw.get("parameters") or {}
    if not isinstance(top, Mapping):
        raise UserError(f"{where}: `parameters` must be a mapping, got {top!r}.")
    shared_keys, model_keys = _keys(cls.Params), _keys(cls.ModelParams)
    bad = [k for k in top if k not in shared_keys and k not in model_keys]
    if bad:
        allowed = sorted(set(shared_keys) | set(model_keys))
        raise UserError(
            f"{where}: {name} has no parameter {', '.join(map(str, bad))}; its parameters are: {', '.join(allowed) or '(none)'}."
        )
    params = _build(
        cls.Params,
        {shared_keys[k]: _scalar(name, k, v, where, _list_keys(cls.Params)) for k, v in top.items() if k in shared_keys},
        where,
        name,
    )
    method = cls(params)

    base = raw.get("base_model")
    base = None if base is None else _path(base, f"{where}: base_model")
    entries = raw.get("models")
    if entries is None or isinstance(entries, (str, Mapping)) or not hasattr(entries, "__iter__"):
        raise UserError(f"{where}: `models` must be a list of {{model: PATH, parameters: {{...}}}} entries.")
    models: list[InputModel] = []
    lists = _list_keys(cls.ModelParams)
    for i, entry in enumerate(entries):
        ewhere = f"{where}: models[{i}]"
        if isinstance(entry, (str, os.PathLike)):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise UserError(f"{ewhere}: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}.")
        extra = [k for k in entry if k not in ("model", "parameters")]
        if extra:
            raise UserError(f"{ewhere}: unknown key(s) {', '.join(map(str, extra))} (an entry has model and parameters).")
        path = _path(entry["model"], ewhere)
        if base is not None and cls.needs_base and not cls.base_is_input and _same_path(path, base):
            continue  # the base model listed among the inputs (mergekit style): it is the base, not a task
        own = entry.get("parameters") or {}
        if not isinstance(own, Mapping):
            raise UserError(f"{ewhere}: `parameters` must be a mapping, got {own!r}.")
        bad = [k for k in own if k not in model_keys]
        if bad:
            raise UserError(
                f"{ewhere}: {name} has no per-model parameter {', '.join(map(str, bad))}"
                + (f"; per-model parameters are: {', '.join(model_keys)}." if model_keys else " (it takes none).")
            )
        values = {model_keys[k]: _scalar(name, k, v, where, lists) for k, v in top.items() if k in model_keys}
        values.update({model_keys[k]: _scalar(name, k, v, ewhere, lists) for k, v in own.items()})
        models.append(InputModel(path, _build(cls.ModelParams, values, f"{ewhere} ({path})", name)))
    if cls.base_is_input and base is not None and not any(_same_path(m.path, base) for m in models):
        values = {model_keys[k]: v for k, v in top.items() if k in model_keys}
        models.append(InputModel(base, _build(cls.ModelParams, values, f"{where}: base_model", name)))

    if cls.needs_base and base is None:
        raise UserError(f"{where}: {name} needs base_model (the model the task vectors are taken against).")
    if len(models) < cls.min_models or (cls.max_models is not None and len(models) > cls.max_models):
        want = (
            f"exactly {cls.min_models}" if cls.max_models == cls.min_models
            else f"at least {cls.min_models}" if cls.max_models is None
            else f"{cls.min_models} to {cls.max_models}"
        )
        raise UserError(
            f"{where}: {name} merges {want} model(s) besides the base, got {len(models)}"
            + (" (entries equal to base_model count as the base)." if base is not None and cls.needs_base else ".")
        )
    method.check_models([m.params for m in models], [m.path for m in models])
    return Recipe(method=method, base=base, models=tuple(models), dtype=dtype, options=Options(**opts),
                  data=None if data is None else dict(data))  # fmt: skip


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any], **options: Any) -> Recipe:
    """A recipe from a dict, a `Recipe`, or a path to a YAML file."""
    if isinstance(recipe, Recipe):
        return recipe if not options else dataclasses.replace(recipe, options=dataclasses.replace(recipe.options, **options))
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
