"""The adapter protocol: what every adapter (`peft_lab/adapters/<name>.py`) can do.

An adapter is built from its config (a dataclass that is also its Hydra schema, `conf/adapter/<name>.yaml`),
then `attach`ed to a transformers or diffusers model. After that it can list its trainable parameters,
export its delta as a parameter tree keyed by the *original* model's `state_dict` names, merge into the base
weights and unmerge, and save/load itself.

Contract (tested for every registry entry in tests/test_adapters_contract.py):
- at init the attached model computes what the base model computes;
- `apply(base_tree, adapter.delta_tree())` run through the plain model == the adapted model;
- `merge()` then `unmerge()` restores the base weights (within float tolerance);
- gradients reach exactly `trainable_parameters()`, and `num_trainable()` counts them;
- `save(dir)` then `load_adapter(fresh_base_model, dir)` reproduces the outputs.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peft_lab.errors import UserError
from peft_lab.registry import Registry
from peft_lab.tree import Tree
from peft_lab.tree.io import ADAPTER_CONFIG

__all__ = ["ADAPTERS", "AdapterConfig", "Adapter", "build_adapter", "load_adapter", "ADAPTER_FILE", "count_parameters", "freeze"]

ADAPTERS: Registry[type["Adapter"]] = Registry("adapter", package="peft_lab.adapters")
# our own on-disk format: this JSON ({"adapter": name, **config}) beside `adapter.safetensors`, the delta tree
# saved with `save_tree(..., metadata={TREE_KIND_KEY: "delta"})` (structured leaves kept), which
# `peft_lab.tree.load_tree` opens as a delta tree (so `peft-lab merge` takes these dirs as task vectors)
ADAPTER_FILE = ADAPTER_CONFIG


@dataclasses.dataclass
class AdapterConfig:
    """Fields every adapter shares. Subclasses add their own hyperparameters.

    Attributes:
        target_modules: name patterns of the modules to adapt (see `peft_lab.tree.matches`: a dotted suffix such
            as `query`, a glob such as `*.attn1.to_q`, or `re:<regex>`); None = the adapter's default targets.
        exclude_modules: patterns removed from the targets.
        modules_to_save: modules trained in full beside the adapter (e.g. a new classification head); their
            change is part of the delta tree as dense deltas.
    """

    target_modules: list[str] | None = None
    exclude_modules: list[str] = dataclasses.field(default_factory=list)
    modules_to_save: list[str] = dataclasses.field(default_factory=list)


class Adapter(abc.ABC):
    """One parameter-efficient method. Subclasses set `name` (= module name = registry key) and `Config`."""

    name: ClassVar[str]
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig

    def __init__(self, config: AdapterConfig | None = None, **overrides: Any):
        cfg = config if config is not None else self.Config()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        self.config = cfg
        self.model: nn.Module | None = None

    # --- lifecycle ---
    @abc.abstractmethod
    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the base, insert the adapter, return the module to train/run (may be a wrapper)."""

    @abc.abstractmethod
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter, for exactly what the optimizer should update."""

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    @abc.abstractmethod
    def delta_tree(self) -> Tree:
        """The adapter's change to the base weights, keyed by the original model's state_dict names."""

    @abc.abstractmethod
    def merge(self) -> None:
        """Fold the delta into the base weights; the model then runs without adapter overhead."""

    @abc.abstractmethod
    def unmerge(self) -> None:
        """Undo `merge`."""

    @abc.abstractmethod
    def save(self, out_dir: str | Path) -> None:
        """Write the adapter to `out_dir` (PEFT's format where PEFT implements the method, else ours)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> "Adapter":
        """Attach a saved adapter to a fresh base `model` (the returned adapter's `.model` is the module to run)."""

    def on_optimizer_step(self, step: int, max_steps: int, optimizer) -> None:
        """Called by the training loop after every optimizer step (`step` = steps completed). Adapters that
        change their structure during training (sparse grow/drop) act here; the default does nothing."""

    # --- helpers for subclasses ---
    def config_dict(self) -> dict[str, Any]:
        return {"adapter": self.name, **dataclasses.asdict(self.config)}


def build_adapter(name: str, **params: Any) -> Adapter:
    """The registered adapter `name` with its config built from `params` (unknown keys are a `UserError`)."""
    cls = ADAPTERS.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise UserError(
            f"adapter {name!r} has no parameter(s) {', '.join(unknown)}; it takes: {', '.join(sorted(fields))}."
        )
    return cls(cls.Config(**params))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> Adapter:
    """Load any saved adapter (ours: `peft_lab_adapter.json`; PEFT's: `adapter_config.json`) onto `model`."""
    d = Path(adapter_dir)
    if (d / ADAPTER_FILE).exists():
        name = json.loads((d / ADAPTER_FILE).read_text())["adapter"]
    elif (d / "adapter_config.json").exists():
        peft_type = json.loads((d / "adapter_config.json").read_text()).get("peft_type")
        name = {"LORA": "lora", "LOKR": "kronecker"}.get(peft_type)
        if name is None:
            raise UserError(f"{d}: PEFT adapter type {peft_type!r} is not one of peft-lab's adapters.")
    else:
        raise UserError(f"{d}: not an adapter dir (no {ADAPTER_FILE} or adapter_config.json).")
    return ADAPTERS.get(name).load(model, d)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
