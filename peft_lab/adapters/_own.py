"""Shared machinery for peft-lab's own adapters (loldu, sparse, kronecker's DiffuseKronA mode).

Each targeted module is replaced by an `AdapterLayer` that keeps the original as `base_layer` (frozen) and adds
the adapter's few trainable tensors; `modules_to_save` are trained in place against a frozen copy of their
initial values. On disk (the format `peft_lab.tree.load_tree` opens as a delta tree):

    peft_lab_adapter.json   {"adapter": name, **config}
    adapter.safetensors     the delta tree (structured leaves as `<weight>.<factor>`, their kind and meta in
                            the header; `modules_to_save` as dense deltas), tree_kind = "delta"
    adapter_state.safetensors   state for an exact reload, never read by `peft-lab merge`: the trained
                            `modules_to_save` weights in full (a new head is initialised at random, so a
                            delta against one random init cannot rebuild it on another), and layer state
                            such as LoLDU's z and z0, keyed `<module>.<tensor>`
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from peft_lab.adapters.base import ADAPTER_OUTPUT, Adapter, freeze, read_adapter_config
from peft_lab.errors import UserError
from peft_lab.tree import Dense, Leaf, Tree, load_safetensors, save_tree
from peft_lab.tree.fs import atomic_output_dir
from peft_lab.tree.load import ADAPTER_WEIGHTS
from peft_lab.tree.safetensors import TREE_KIND_KEY

__all__ = ["AdapterLayer", "OwnAdapter", "STATE_FILE"]

STATE_FILE = "adapter_state.safetensors"


class AdapterLayer(nn.Module):
    """A frozen `base_layer` plus an adapter. Subclasses implement `delta`, `adapter_forward`, and the
    (de)serialisation hooks; `forward` runs the base layer alone once merged."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:  # code that reads `module.weight` (e.g. dtype probes) keeps working
        return self.base_layer.weight

    @abc.abstractmethod
    def delta(self) -> Leaf:
        """The live delta (a snapshot, shaped like the base weight): forward(x) == base_layer with W + delta."""

    @abc.abstractmethod
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution to the base layer's output."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return y
        return y + self.adapter_forward(x).to(y.dtype)

    def load_delta(self, leaf: Leaf, state: dict[str, torch.Tensor]) -> None:
        """Restore the adapter from its saved delta leaf (+ this layer's entries of adapter_state)."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save beside the delta tree for an exact resume (default: none)."""
        return {}

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.delta().add_to(self.base_layer.weight.data)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.delta().add_to(self.base_layer.weight.data, alpha=-1.0)
            self.merged = False


class OwnAdapter(Adapter):
    """An adapter whose layers are ours. Subclasses set `supported` and implement `make_layer`."""

    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._saved_init: dict[str, dict[str, torch.Tensor]] = {}

    @abc.abstractmethod
    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        """The adapter layer for target `name` (raise UserError when the hyperparameters do not fit it)."""

    # --- protocol ---
    def attach(self, model: nn.Module) -> nn.Module:
        saved, targets = self._resolve(model)
        freeze(model)
        # build every layer before swapping any in: a UserError on one layer leaves the model untouched
        layers = {t: self.make_layer(t, model.get_submodule(t)) for t in targets}
        for t, layer in layers.items():
            model.set_submodule(t, layer)
        for s in saved:
            module = model.get_submodule(s)
            self._saved_init[s] = {n: p.detach().clone() for n, p in module.named_parameters()}
            for p in module.parameters():
                p.requires_grad_(True)
        self.model = model
        return model

    def layers(self) -> dict[str, AdapterLayer]:
        return {n: m for n, m in self._require_attached().named_modules() if isinstance(m, AdapterLayer)}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self._require_attached().named_parameters() if p.requires_grad}

    @torch.no_grad()
    def delta_tree(self) -> Tree:
        model = self._require_attached()
        leaves: dict[str, Leaf] = {}
        for name, m in model.named_modules():
            if isinstance(m, AdapterLayer):
                leaves[f"{name}.weight"] = m.delta()
            elif name in self._saved_init:
                init = self._saved_init[name]
                for p, t in m.named_parameters():
                    leaves[f"{name}.{p}"] = Dense(t.detach().float() - init[p].to(t.device).float())
        return Tree(leaves, source=f"{self.name} adapter", meta={TREE_KIND_KEY: "delta", "adapter": self.name})

    def merge(self) -> None:
        if not self.merged:
            for layer in self.layers().values():
                layer.merge()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            for layer in self.layers().values():
                layer.unmerge()
            self.merged = False

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> None:
        self._require_attached()
        tree = self.delta_tree()
        state = {
            f"{n}.{k}": v.detach().contiguous()
            for n, layer in self.layers().items()
            for k, v in layer.extra_state().items()
        }
        model = self._require_attached()
        for s in self._saved_init:
            for p, t in model.get_submodule(s).named_parameters():
                state[f"{s}.{p}"] = t.detach().contiguous()
        with atomic_output_dir(out_dir, kind=ADAPTER_OUTPUT, overwrite=overwrite) as tmp:
            self.write_config(tmp)
            save_tree(tree, tmp / ADAPTER_WEIGHTS, metadata={TREE_KIND_KEY: "delta", "adapter": self.name})
            if state:
                save_tree(Tree(state), tmp / STATE_FILE, metadata={"adapter": self.name})

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> OwnAdapter:
        d = Path(adapter_dir)
        name, raw = read_adapter_config(d)
        if name != cls.name:
            raise UserError(f"{d} holds a {name!r} adapter, not {cls.name!r}.")
        if not (d / ADAPTER_WEIGHTS).exists():
            raise UserError(f"{d}: {ADAPTER_WEIGHTS} is missing.")
        tree = load_safetensors(d / ADAPTER_WEIGHTS)
        state_tree = load_safetensors(d / STATE_FILE) if (d / STATE_FILE).exists() else Tree()
        adapter = cls(cls.Config(**raw))
        adapter.attach(model)
        layers = adapter.layers()
        expected = {f"{n}.weight" for n in layers} | {f"{s}.{p}" for s, ps in adapter._saved_init.items() for p in ps}
        if set(tree) != expected:
            extra, missing = sorted(set(tree) - expected), sorted(expected - set(tree))
            raise UserError(
                f"{d}: the saved adapter does not fit {type(model).__name__}: "
                + (f"tensors for modules it lacks: {', '.join(extra[:5])}; " if extra else "")
                + (f"no tensors for: {', '.join(missing[:5])}" if missing else "")
                + ". Is this adapter for this model?"
            )
        with torch.no_grad():
            for n, layer in layers.items():
                prefix = f"{n}."
                state = {k[len(prefix) :]: state_tree[k].dense(None) for k in state_tree if k.startswith(prefix)}
                layer.load_delta(tree[f"{n}.weight"], state)
            for s in adapter._saved_init:
                module = model.get_submodule(s)
                for p, t in module.named_parameters():
                    key = f"{s}.{p}"
                    leaf = state_tree[key] if key in state_tree else tree[key]
                    if tuple(leaf.shape) != tuple(t.shape):
                        raise UserError(f"{d}: {key} has shape {tuple(leaf.shape)}, the model's is {tuple(t.shape)}.")
                    if key in state_tree:  # the trained weights themselves (delta_tree is then relative
                        t.data.copy_(leaf.dense(t.dtype))  # to this model's own init, as PEFT's would be)
                    else:  # a bare delta tree: relative to this model's current weights
                        leaf.add_to(t.data)
        return adapter
