"""The adapter protocol: what every adapter (`peft_lab/adapters/<name>.py`) can do.

An adapter is built from its config (a frozen dataclass, `conf/adapter/<name>.yaml` holds its values), then
`attach`ed to a transformers or diffusers model. After that it can list its trainable parameters, export its
delta as a parameter tree keyed by the *original* model's `state_dict` names, merge into the base weights and
unmerge, and save/load itself.

Contract (tested for every registry entry in tests/test_adapters_contract.py):
- at init the attached model computes what the base model computes;
- `apply(base_tree, adapter.delta_tree())` run through the plain model == the adapted model;
- `merge()` then `unmerge()` restores the base weights (within float tolerance);
- gradients reach exactly `trainable_parameters()`, and `num_trainable()` counts them;
- `save(dir)` then `load_adapter(fresh_base_model, dir)` reproduces the outputs.

On disk every adapter dir holds `peft_lab_adapter.json` (`{"adapter": name, **config}`). Adapters PEFT
implements (lora, pissa, kronecker) add PEFT's own files (`adapter_config.json` + `adapter_model.safetensors`,
loadable with `PeftModel.from_pretrained`); the others add `adapter.safetensors`, their delta tree written by
`save_tree(..., metadata={TREE_KIND_KEY: "delta"})` (structured leaves kept). `peft_lab.tree.load_tree` opens
both kinds of dir as delta trees, so `peft-lab merge` takes them as task vectors.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peft_lab.errors import UserError
from peft_lab.params import Checked, build, param
from peft_lab.registry import Registry
from peft_lab.tree import Tree
from peft_lab.tree.load import ADAPTER_CONFIG

# the output kind of an adapter dir (`peft_lab.tree.fs.MARKER`): `save(overwrite=True)` replaces only such a dir
ADAPTER_OUTPUT = "adapter"

__all__ = [
    "ADAPTERS",
    "AdapterConfig",
    "Adapter",
    "build_adapter",
    "load_adapter",
    "ADAPTER_FILE",
    "count_parameters",
    "freeze",
    "read_adapter_config",
]

ADAPTERS: Registry[type[Adapter]] = Registry("adapter", package="peft_lab.adapters")
ADAPTER_FILE = ADAPTER_CONFIG  # peft_lab_adapter.json
_PEFT_TYPES = {"LORA": "lora", "LOKR": "kronecker"}


@dataclasses.dataclass(frozen=True)
class AdapterConfig(Checked):
    """Fields every adapter shares. Subclasses add their own hyperparameters (frozen; types and ranges declared
    with `peft_lab.params.param`, checks across fields in `__post_init__`, which subclasses extend by calling
    `super().__post_init__()`).

    Attributes:
        target_modules: name patterns of the modules to adapt (see `peft_lab.tree.matches`: a dotted suffix such
            as `query`, a glob such as `*.attn1.to_q`, or `re:<regex>`). None = the model family's defaults
            (`peft_lab.adapters._targets.default_targets`): PEFT's LoRA table for transformers models
            (e.g. `query`, `value` for BERT), `to_q/to_k/to_v/to_out.0` for diffusers models, else every layer of a
            type the adapter supports.
        exclude_modules: patterns removed from the targets.
        modules_to_save: modules trained in full beside the adapter (e.g. a new classification head); their
            change is part of the delta tree as dense deltas and is saved with the adapter. None = the task head of
            a transformers task model (`classifier`, `score` or `qa_outputs` when present), else none.
    """

    target_modules: list[str] | None = None
    exclude_modules: list[str] = param(default_factory=list, aliases={None: []})
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None and not self.target_modules:
            raise UserError("adapter.target_modules is an empty list; give patterns or null for the defaults.")
        for f in ("target_modules", "exclude_modules", "modules_to_save"):
            if "" in (getattr(self, f) or ()):
                raise UserError(f"adapter.{f}={getattr(self, f)!r} holds an empty pattern; remove it.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Adapter(abc.ABC):
    """One parameter-efficient method. Subclasses set `name` (= module name = registry key) and `Config`.

    `attach(model)` changes `model` in place (like PEFT) and returns the module to train and run, also kept as
    `self.model`; run that module, not the original object, after attaching.
    """

    name: ClassVar[str]
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig
    supported: ClassVar[tuple[type[nn.Module], ...]] = ()  # layer types it can adapt

    def __init__(self, config: AdapterConfig | None = None, **overrides: Any):
        cfg = config if config is not None else self.Config()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        if not isinstance(cfg, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(cfg).__name__}")
        self.config = cfg
        self.model: nn.Module | None = None
        self.merged = False

    def _resolve(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """(modules_to_save, target layers) of this config on `model`, checked (UserError) before anything changes."""
        from peft_lab.adapters._targets import resolve_modules_to_save, resolve_targets

        if self.model is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached")
        saved = resolve_modules_to_save(model, self.config.modules_to_save)
        targets = resolve_targets(
            model, self.config.target_modules, self.config.exclude_modules, self.supported, self.name, skip=saved
        )
        return saved, targets

    # --- lifecycle ---
    @abc.abstractmethod
    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the base, insert the adapter, return the module to train/run (may be a wrapper)."""

    @abc.abstractmethod
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name (in `self.model.named_parameters()`) -> parameter, for exactly what the optimizer should update."""

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    @abc.abstractmethod
    def delta_tree(self) -> Tree:
        """The adapter's change to the base weights, keyed by the original model's state_dict names
        (a snapshot: later training does not change the returned tree)."""

    @abc.abstractmethod
    def merge(self) -> None:
        """Fold the delta into the base weights; the model then runs without adapter overhead. A second
        `merge()` is a no-op."""

    @abc.abstractmethod
    def unmerge(self) -> None:
        """Undo `merge` (a no-op when not merged)."""

    @abc.abstractmethod
    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> None:
        """Write the adapter to `out_dir` (atomically: a failed save leaves nothing behind). `overwrite` replaces a
        previous adapter dir (one marked as an `ADAPTER_OUTPUT`), never anything else."""

    @classmethod
    @abc.abstractmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> Adapter:
        """Attach a saved adapter to a fresh base `model` (the returned adapter's `.model` is the module to run)."""

    def on_optimizer_step(self, step: int, max_steps: int, optimizer) -> None:
        """Called by the training loop after every optimizer step (`step` = steps completed). Adapters that
        change their structure during training (sparse grow/drop) act here; the default does nothing."""
        return None

    # --- helpers for subclasses ---
    def config_dict(self) -> dict[str, Any]:
        return {"adapter": self.name, **self.config.to_dict()}

    def write_config(self, out_dir: Path) -> None:
        (Path(out_dir) / ADAPTER_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n")

    def _require_attached(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}: call attach(model) first")
        return self.model

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())
        return f"{type(self).__name__}({fields})"


def build_adapter(name: str, **params: Any) -> Adapter:
    """The registered adapter `name` with its config built from `params` by `peft_lab.params.build` (unknown
    keys, wrong types and out-of-range values are a `UserError` naming `adapter.<key>`).

    A Hydra adapter node (`conf/adapter/<name>.yaml`) is `{"name": <name>, **params}`, so
    `build_adapter(**cfg.adapter)` works (a `name` equal to the registry key is accepted in `params`).
    """
    cls = ADAPTERS.get(name)
    params.pop("adapter", None)
    return cls(build(cls.Config, params, where=f"adapter={name}", prefix="adapter."))


def read_adapter_config(adapter_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """(adapter name, config dict) of a saved adapter dir: ours (`peft_lab_adapter.json`) or a PEFT LoRA/LoKr dir."""
    d = Path(adapter_dir)
    if (d / ADAPTER_FILE).exists():
        try:
            raw = json.loads((d / ADAPTER_FILE).read_text())
            name = raw.pop("adapter")
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{d / ADAPTER_FILE}: not a valid peft-lab adapter config ({e}).") from None
        return name, raw
    if (d / "adapter_config.json").exists():
        try:
            peft_type = json.loads((d / "adapter_config.json").read_text()).get("peft_type")
        except json.JSONDecodeError as e:
            raise UserError(f"{d / 'adapter_config.json'}: invalid JSON ({e}).") from None
        name = _PEFT_TYPES.get(peft_type)
        if name is None:
            raise UserError(
                f"{d}: PEFT adapter type {peft_type!r} is not one of peft-lab's adapters "
                f"(it loads {', '.join(sorted(_PEFT_TYPES))} dirs)."
            )
        return name, {}
    raise UserError(f"{d}: not an adapter dir (no {ADAPTER_FILE} or adapter_config.json).")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> Adapter:
    """Load any saved adapter (ours, or a PEFT LoRA/LoKr dir saved by another tool) onto a fresh `model`."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise UserError(f"{d}: no such adapter directory.")
    name, _ = read_adapter_config(d)
    return ADAPTERS.get(name).load(model, d)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
