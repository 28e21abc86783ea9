"""`Tree`: an ordered mapping from dotted parameter names (`state_dict` keys) to leaves."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from peft_lab.tree.leaves import Leaf, as_leaf

__all__ = ["Tree"]


class Tree(Mapping[str, Leaf]):
    """Immutable ordered name -> leaf mapping.

    Args:
        leaves: mapping or iterable of (name, leaf-or-tensor); insertion order is kept (it is the order
            tensors are streamed and written in).
        source: where the tree came from (a path, "module", ...), used in error messages.
        meta: free-form string metadata (e.g. the safetensors header metadata of the file it was read from).
    """

    def __init__(
        self,
        leaves: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
        *,
        source: str = "<memory>",
        meta: Mapping[str, str] | None = None,
    ):
        items = leaves.items() if isinstance(leaves, Mapping) else leaves
        self._leaves: dict[str, Leaf] = {name: as_leaf(x) for name, x in items}
        self.source = source
        self.meta: dict[str, str] = dict(meta or {})

    # Mapping protocol
    def __getitem__(self, name: str) -> Leaf:
        return self._leaves[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._leaves)

    def __len__(self) -> int:
        return len(self._leaves)

    def __repr__(self) -> str:
        return f"Tree({len(self)} leaves, {self.nbytes / 2**20:.1f} MiB, source={self.source!r})"

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self._leaves.values())

    @property
    def numel(self) -> int:
        return sum(leaf.numel for leaf in self._leaves.values())

    def replace(self, leaves: Mapping[str, Any] | Iterable[tuple[str, Any]], **kw) -> Tree:
        """A new tree with other leaves and this tree's source/meta (overridable by keywords)."""
        return Tree(leaves, source=kw.get("source", self.source), meta=kw.get("meta", self.meta))

    def to_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Materialise every leaf (in its own dtype unless `dtype` is given). Loads everything: small trees only."""
        return {k: leaf.dense(dtype or leaf.dtype) for k, leaf in self._leaves.items()}

    @classmethod
    def from_module(cls, module: torch.nn.Module, *, trainable_only: bool = False, buffers: bool = True) -> Tree:
        """The module's `state_dict()` as a tree of `Dense` leaves (views, not copies)."""
        if trainable_only:
            items = [(n, p.detach()) for n, p in module.named_parameters() if p.requires_grad]
        else:
            sd = module.state_dict(keep_vars=False)
            if not buffers:
                params = {n for n, _ in module.named_parameters()}
                sd = {k: v for k, v in sd.items() if k in params}
            items = list(sd.items())
        return cls(items, source=type(module).__name__)
