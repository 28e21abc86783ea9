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
    eval: {name: classification, ...}   # score the merged model (merging.scoring): OUT_DIR/eval.json

or, instead of `models`, `slices:` (layer ranges, per-slice base and parameters) or `modules:` (per tower), and
`tokenizer_source` / `tokenizer:` / `chat_template` (`merging.grammar`, `merging.vocab`). A model is a path,
`path+lora_dir` or `{model: PATH, lora: DIR}` (a PEFT LoRA applied to it first).

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

from merging import scoring
from merging.base import METHODS, MergeMethod
from merging.extract.settings import RECIPE_KEYS as ADAPTER_KEYS
from merging.extract.settings import adapter_keys_to_dict, check_adapter_recipe, parse_adapter_keys
from merging.grammar import Layout, ModelRef, model_ref, parse_layout, split_scope
from merging.settings import Resolver, is_scalar
from merging.vocab import TokenizerSpec, parse_chat_template, parse_tokenizer
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
RECIPE_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)

# keys peft-lab writes into merge_recipe.yaml besides the recipe; accepted (and ignored) when it is re-run
RECORD_KEYS = ("inputs", "tool", "arithmetic")


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
    lora: str | None = None  # a PEFT LoRA dir applied to the model first (`path+lora`)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.path, self.lora)


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
        layout: the `slices:` / `modules:` of the recipe (None: the `models:` form, `models` holds the inputs).
        base_ref: the base model's reference (with its LoRA, if any).
        tokenizer: the output tokenizer (`tokenizer_source` / `tokenizer:`), None: copied from the base.
        chat_template: the chat template to write into the tokenizer config (None: the tokenizer's own).
        noop: accepted mergekit parameters that change nothing here (`int8_mask`), as given.
        out_dtype_given: which key gave `dtype` (`dtype` or `out_dtype`), for the record.
        adapter: with `out_format: adapter`, how the merge becomes an adapter (`merging.extract.AdapterSettings`);
            None for a model output.
        eval: the evaluator (`peft_lab.eval.Evaluator`) of the recipe's `eval:` block, or None.
    """

    method: MergeMethod
    base: str | None
    models: tuple[InputModel, ...]
    dtype: torch.dtype | None
    options: Options = field(default_factory=Options)
    data: Any = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    layout: Layout | None = None
    base_ref: ModelRef | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    noop: Mapping[str, Any] = field(default_factory=dict)
    adapter: Any = None
    eval: Any = None  # the evaluator of an `eval:` block (merging.scoring): the merged model is scored

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
        if self.base_ref is not None:
            d["base_model"] = self.base_ref.to_yaml()
        if self.layout is None:
            d["models"] = []
            for m in self.models:
                values = {k: v for k, v in _fields_dict(m.params).items() if k not in schedules}  # apply as given
                values.update({k: v for k, v in m.settings.items() if not is_scalar(v)})
                d["models"].append({"model": m.ref.to_yaml(), "parameters": values})
        else:
            d.update(self.layout.to_dict())
        d["parameters"] = {**_fields_dict(self.method.params), **schedules, **self.noop}
        d["dtype"] = DTYPE_NAMES[self.dtype] if self.dtype is not None else None
        if self.tokenizer is not None:
            d.update(self.tokenizer.to_dict())
        if self.chat_template is not None:
            d["chat_template"] = self.chat_template
        if self.data is not None:
            d["data"] = self.data
        d.update(adapter_keys_to_dict(self.adapter))  # out_format: adapter and its keys
        if self.eval is not None:
            d["eval"] = self.eval.to_dict()
        return d


def _fields_dict(obj: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(obj):
        return {}
    return {param_key(f): getattr(obj, f.name) for f in dataclasses.fields(obj)}


def parse_recipe(raw: Mapping[str, Any], *, where: str = "recipe", **options: Any) -> Recipe:
    """Validate a mergekit-style recipe dict (plus peft-lab's run options, as keys or keywords)."""
    raw = _without_extras(raw, where)
    opts = _options(raw, options, where)
    data = _data(raw.pop("data", None), where)
    adapter = parse_adapter_keys(raw, where)  # out_format: adapter (merging.extract.settings)
    evaluator = scoring.parse_eval(raw.pop("eval", None), where)
    _check_keys(raw, where)
    cls = _method_class(raw, where)
    dtype = _dtype(raw.get("out_dtype") or raw.get("dtype"), where)
    noop: dict[str, Any] = {}
    top = split_scope(cls, raw.get("parameters"), f"{where}: parameters", noop=noop)
    base_ref = None if raw.get("base_model") is None else model_ref(raw["base_model"], f"{where}: base_model")
    base = None if base_ref is None else str(base_ref)
    check_adapter_recipe(adapter, base_ref, raw, where)  # out_format: adapter (merging.extract.settings)
    layout = parse_layout(cls, raw, base_ref, where, noop)
    shared = {k: v for k, v in top.items() if k in specs(cls.Params)}
    defaults = {k: v for k, v in top.items() if k in specs(cls.ModelParams)}
    common = dict(
        base=base,
        dtype=dtype,
        options=opts,
        data=None if data is None else dict(data),
        parameters=top,
        base_ref=base_ref,
        chat_template=parse_chat_template(raw.get("chat_template"), where),
        noop=noop,
        adapter=adapter,
        eval=evaluator,
    )
    if layout is not None:
        method = _layout_method(cls, layout, shared, defaults, where)
        refs = layout.refs() + ([base_ref] if base_ref is not None else [])
        tokenizer = parse_tokenizer(raw, refs, where)
        return Recipe(method=method, models=(), layout=layout, tokenizer=tokenizer, **common)
    entries = _models(cls, raw.get("models"), base_ref, where)
    _check_count(cls, entries, base, where)
    resolver = Resolver(cls.Params, [shared], cls.ModelParams, [[own, defaults] for _, own in entries], where)
    _check_per_tensor(cls, resolver, where)
    method = cls(resolver.shared())
    method.check_settings([shared], [[own, defaults] for _, own in entries])
    models = [InputModel(r.path, p, own, r.lora) for (r, own), p in zip(entries, resolver.models(), strict=True)]
    method.check_models([m.params for m in models], [m.path for m in models])
    tokenizer = parse_tokenizer(raw, [m.ref for m in models] + ([base_ref] if base_ref else []), where)
    return Recipe(method=method, models=tuple(models), tokenizer=tokenizer, **common)


def _layout_method(cls: type[MergeMethod], layout: Layout, shared: dict, defaults: dict, where: str) -> MergeMethod:
    """The method of a `slices:` / `modules:` recipe, its settings checked in every scope."""
    if not cls.per_tensor_params:
        raise UserError(
            f"{where}: {cls.name} learns or computes its statistics by running the whole model; it merges whole "
            "models (`models:`), not slices or modules."
        )
    shared_scopes, model_scopes = [shared], []
    for mod in layout.modules:
        pick = lambda sc: {k: v for k, v in sc.items() if k in specs(cls.Params)}  # noqa: E731
        shared_scopes += [pick(mod.settings)] + [pick(sl.settings) for sl in mod.slices]
        model_scopes += [[own, mod.settings, defaults] for _, own in mod.models]
        model_scopes += [[s.settings, sl.settings, mod.settings, defaults] for sl in mod.slices for s in sl.sources]
    resolver = Resolver(cls.Params, [shared], cls.ModelParams, [], where)
    method = cls(resolver.shared())
    method.check_settings(shared_scopes, model_scopes)
    return method


def _check_per_tensor(cls: type[MergeMethod], resolver: Resolver, where: str) -> None:
    if not cls.per_tensor_params and not resolver.constant:
        raise UserError(
            f"{where}: {cls.name} learns or computes its statistics for the whole model from one set of parameters; "
            "its parameters cannot be per-layer gradients or per-tensor filters: give one value each."
        )


def _without_extras(raw: Any, where: str) -> dict[str, Any]:
    """The recipe as a dict without the keys peft-lab writes into its record (ignored when a record is re-run)."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}: a recipe is a mapping with merge_method, models, ...; got {type(raw).__name__}.")
    raw = dict(raw)
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
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}. A recipe has {', '.join(RECIPE_KEYS)}, data, "
            f"eval (and run options {', '.join(OPTION_KEYS)}; adapter output keys {', '.join(ADAPTER_KEYS)})."
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


def _models(cls: type[MergeMethod], entries: Any, base: ModelRef | None, where: str) -> list[tuple[ModelRef, dict]]:
    """The `models` entries: (path, own per-model settings, checked)."""
    if entries is None or isinstance(entries, (str, Mapping)) or not hasattr(entries, "__iter__"):
        raise UserError(f"{where}: `models` must be a list of {{model: PATH, parameters: {{...}}}} entries.")
    models = []
    for i, entry in enumerate(entries):
        model = _model(cls, entry, base, f"{where}: models[{i}]")
        if model is not None:
            models.append(model)
    if cls.base_is_input and base is not None and not any(m.same(base) for m, _ in models):
        models.append((base, {}))
    return models


def _model(cls: type[MergeMethod], entry: Any, base: ModelRef | None, where: str) -> tuple[ModelRef, dict] | None:
    """One `models` entry (None for the base model listed among the inputs, mergekit style)."""
    if isinstance(entry, (str, os.PathLike)):
        entry = {"model": entry}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise UserError(f"{where}: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}.")
    extra = [k for k in entry if k not in ("model", "parameters")]
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, extra))} (an entry has model and parameters).")
    ref = model_ref(entry["model"], where)
    takes_base = cls.needs_base or cls.optional_base
    if base is not None and takes_base and not cls.base_is_input and ref.same(base):
        return None  # the base model listed among the inputs: it is the base, not a task
    return ref, split_scope(cls, entry.get("parameters"), f"{where} ({ref})", shared=False)


def _check_count(cls: type[MergeMethod], models: list, base: str | None, where: str) -> None:
    takes_base = cls.needs_base or cls.optional_base
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
        + (" (entries equal to base_model count as the base)." if base is not None and takes_base else ".")
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
    if cfg.get("eval") is not None:  # eval=NAME: score the merged model (merging.scoring)
        d["eval"] = cfg["eval"]
    for k in OPTION_KEYS + ADAPTER_KEYS:
        if k in cfg:
            d[k] = cfg[k]
    return d
