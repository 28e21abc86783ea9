"""Shared machinery for the adapters PEFT implements (lora, pissa, kronecker).

PEFT owns the layers, the initialisation and the on-disk format (`adapter_config.json` +
`adapter_model.safetensors`, loadable by `PeftModel.from_pretrained`). We add what the adapter protocol needs on
top: target resolution with clear errors, a delta tree keyed by the original model's names, and merge/unmerge
computed in float32 with one cast back to the weight dtype (PEFT adds a delta already rounded to the weight
dtype). Every saved dir also holds `peft_lab_adapter.json` with our config, which PEFT ignores.
"""

from __future__ import annotations

import abc
import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peft_lab.adapters.base import ADAPTER_OUTPUT, Adapter, read_adapter_config
from peft_lab.errors import UserError
from peft_lab.tree import Dense, Leaf, Tree
from peft_lab.tree.fs import atomic_output_dir
from peft_lab.tree.safetensors import TREE_KIND_KEY

__all__ = ["PeftAdapter", "saved_module_deltas", "peft_targets"]

log = logging.getLogger("peft_lab.adapters")

ADAPTER_NAME = "default"  # PEFT's name for the one adapter we attach


def saved_module_deltas(name: str, original: nn.Module, trained: nn.Module) -> dict[str, Leaf]:
    """Dense float32 deltas `trained − original` of a fully trained module, keyed `<name>.<param>`."""
    orig = dict(original.named_parameters())
    return {
        f"{name}.{p}": Dense((t.detach().float() - orig[p].detach().float()).clone())
        for p, t in trained.named_parameters()
    }


def peft_targets(model: nn.Module, targets: list[str]) -> list[str] | str:
    """`target_modules` for PEFT that select exactly `targets`: the names themselves (readable in
    adapter_config.json), or, when PEFT's suffix matching would also take another module (a target `fc1` and a
    module `block.fc1`), a regex PEFT full-matches."""
    chosen = set(targets)
    if not any(n not in chosen and any(n.endswith("." + t) for t in targets) for n, _ in model.named_modules()):
        return list(targets)
    return "|".join(re.escape(t) for t in targets)


class PeftAdapter(Adapter):
    """An adapter realised by a PEFT tuner. Subclasses give the PEFT config and each layer's delta."""

    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)
    layer_type: ClassVar[type]  # the PEFT layer class whose instances hold our adapter
    peft_type: ClassVar[str]  # "LORA" / "LOKR", the `peft_type` of adapter_config.json

    # --- what subclasses define ---
    @abc.abstractmethod
    def peft_config(self, model: nn.Module, targets: list[str], peft_targets: list[str] | str, saved: list[str]):
        """The PEFT config for these resolved target and saved module names (`peft_targets`: what to give PEFT
        as target_modules to select exactly `targets`)."""

    @abc.abstractmethod
    def layer_delta(self, layer: nn.Module) -> Leaf:
        """The live delta of one PEFT layer: forward(x) == base_layer(x) + x·delta (shape of its base weight)."""

    def check_layer(self, name: str, module: nn.Module) -> None:
        """Raise a UserError when the hyperparameters do not fit this layer (default: accept)."""

    def tree_delta(self, name: str, layer: nn.Module) -> Leaf:
        """The delta w.r.t. the original weights (differs from `layer_delta` when the init changed the base)."""
        return self.layer_delta(layer)

    @classmethod
    def config_from_peft(cls, peft_cfg: dict[str, Any]) -> dict[str, Any]:
        """Our config fields from a foreign PEFT adapter_config.json (dirs not written by peft-lab)."""
        targets = peft_cfg.get("target_modules")
        if isinstance(targets, str):  # PEFT full-matches a regex string
            targets = [f"re:^(?:{targets})$"]
        return {"target_modules": targets, "modules_to_save": peft_cfg.get("modules_to_save") or []}

    # --- protocol ---
    def attach(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        saved, targets = self._resolve(model)
        for t in targets:
            self.check_layer(t, model.get_submodule(t))
        self.model = get_peft_model(model, self.peft_config(model, targets, peft_targets(model, targets), saved))
        extra = sorted(set(self.saved_modules()) - set(saved))
        if extra:  # PEFT matches modules_to_save by bare name suffix (`classifier` also takes `pre_classifier`)
            log.warning("%s: PEFT also trains %s in full (its modules_to_save matching)", self.name, ", ".join(extra))
        return self.model

    @property
    def inner(self) -> nn.Module:
        """The original model object (now holding PEFT layers)."""
        return self._require_attached().base_model.model

    def layers(self) -> dict[str, nn.Module]:
        """Original module name -> PEFT layer."""
        return {n: m for n, m in self.inner.named_modules() if isinstance(m, self.layer_type)}

    def saved_modules(self) -> dict[str, nn.Module]:
        from peft.utils.other import ModulesToSaveWrapper

        return {n: m for n, m in self.inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self._require_attached().named_parameters() if p.requires_grad}

    @torch.no_grad()
    def delta_tree(self) -> Tree:
        from peft.utils.other import ModulesToSaveWrapper

        leaves: dict[str, Leaf] = {}
        for name, m in self.inner.named_modules():
            if isinstance(m, self.layer_type):
                leaves[f"{name}.weight"] = self.tree_delta(name, m)
            elif isinstance(m, ModulesToSaveWrapper):
                leaves.update(saved_module_deltas(name, m.original_module, m.modules_to_save[ADAPTER_NAME]))
        return Tree(leaves, source=f"{self.name} adapter", meta={TREE_KIND_KEY: "delta", "adapter": self.name})

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for layer in self.layers().values():
            self.layer_delta(layer).add_to(layer.get_base_layer().weight.data)
            layer.merged_adapters.append(ADAPTER_NAME)  # PEFT's forward then runs the base layer only
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for layer in self.layers().values():
            self.layer_delta(layer).add_to(layer.get_base_layer().weight.data, alpha=-1.0)
            layer.merged_adapters.remove(ADAPTER_NAME)
        self.merged = False

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> None:
        self._require_attached()
        with atomic_output_dir(out_dir, kind=ADAPTER_OUTPUT, overwrite=overwrite) as tmp:
            self.save_peft(tmp)
            self.write_config(tmp)

    def save_peft(self, out_dir: Path) -> None:
        """PEFT's own files (adapter_config.json + adapter_model.safetensors)."""
        self.model.save_pretrained(str(out_dir))

    @classmethod
    def read_config(cls, adapter_dir: Path):
        """Our config from `peft_lab_adapter.json`, or from PEFT's adapter_config.json for foreign dirs."""
        name, raw = read_adapter_config(adapter_dir)
        if name != cls.name:
            raise UserError(f"{adapter_dir} holds a {name!r} adapter, not {cls.name!r}.")
        if not raw:
            peft_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
            if peft_cfg.get("peft_type") != cls.peft_type:
                raise UserError(f"{adapter_dir}: PEFT type {peft_cfg.get('peft_type')!r}, expected {cls.peft_type!r}.")
            raw = cls.config_from_peft(peft_cfg)
        return cls.Config(**raw)

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> PeftAdapter:
        from peft import PeftModel

        d = Path(adapter_dir)
        adapter = cls(cls.read_config(d))
        try:
            adapter.model = PeftModel.from_pretrained(model, str(d), is_trainable=True)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{d}: PEFT could not load this adapter onto {type(model).__name__} ({e}).") from None
        return adapter
