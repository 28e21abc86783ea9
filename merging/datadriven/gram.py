"""Gram matrices of the inputs of Linear layers (RegMean's statistics), from forward hooks, and the RegMean solve.

RegMean (Jin et al., https://arxiv.org/abs/2212.09849) merges a Linear layer y = x Wᵀ of T models as the least-squares
fit of all models' outputs on their own tasks' inputs:

    G_i = X_iᵀ X_i / n_i      (the mean of x xᵀ over the n_i input rows of model i on its task's examples)
    G̃_i = diag(G_i) + α · (G_i − diag(G_i))            (off-diagonals shrunk by α)
    W   = (Σ_i W_i G̃_i) (Σ_i G̃_i)⁻¹

`GramHooks` records G_i with a forward hook on each selected Linear (the Fisher engine's hooks, merging/datadriven/
fisher_hooks.py, record per-example gradients the same way): every row of the layer's input counts once, except the
padding positions of a text batch (`rows`: the batch's attention mask), which are not inputs of any example.
`regmean_solve` is the merge; it solves in float64 (falling back to least squares when Σ G̃ is singular, e.g. an
input dimension no example ever uses).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["GramHooks", "compute_grams", "regmean_solve", "shrink"]

log = logging.getLogger(__name__)


class GramHooks:
    """While active (`with`), each forward of the selected Linear modules of `module` adds Σ x xᵀ of their input rows
    into `self.total` (float64) and the number of rows into `self.rows`.

    Args:
        module: the model (or a part of it, e.g. one block).
        names: module names (as `module.named_modules()` gives them) of the Linear layers to record.
    """

    def __init__(self, module: nn.Module, names: Sequence[str]):
        mods = dict(module.named_modules())
        self.modules = {n: mods[n] for n in names}
        for n, m in self.modules.items():
            if not isinstance(m, nn.Linear):
                raise TypeError(f"{n} is not an nn.Linear")
        self.total = {
            n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in self.modules.items()
        }
        self.rows = dict.fromkeys(self.modules, 0)
        self.mask: torch.Tensor | None = None  # (B, L) bool: the real (non-padding) positions of the current batch
        self._handles: list = []

    def __enter__(self):
        for n, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook(n)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(mod: nn.Linear, inputs, out):
            x = inputs[0].detach()
            if self.mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask]  # the rows of real tokens only
            x = x.reshape(-1, x.shape[-1]).double()
            self.total[name] += x.T @ x
            self.rows[name] += x.shape[0]

        return hook

    def grams(self) -> dict[str, torch.Tensor]:
        """name -> G = X_ᵀX / n (float32), for the layers that saw at least one row."""
        return {n: (g / self.rows[n]).float() for n, g in self.total.items() if self.rows[n]}


def compute_grams(
    module: nn.Module, names: Sequence[str], batches: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """G of each Linear in `names` over the batches (keyword inputs of `module`; an `attention_mask` marks the rows
    that count). Labels in a batch are ignored."""
    module.eval()
    with torch.no_grad(), GramHooks(module, names) as hooks:
        for batch in batches:
            mask = batch.get("attention_mask")
            hooks.mask = None if mask is None else mask.bool()
            module(**{k: v for k, v in batch.items() if k != "labels"})
    return hooks.grams()


def shrink(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """diag(G) + α · (G − diag(G)), float64."""
    G = G.double()
    if alpha == 1:
        return G
    d = torch.diagonal(G).clone()
    out = G * alpha
    out.diagonal().copy_(d)
    return out


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """(Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹ for Linear weights W_i (out, in) and Grams G_i (in, in); float32 result."""
    A = torch.zeros_like(grams[0], dtype=torch.float64)
    B = torch.zeros(weights[0].shape[1], weights[0].shape[0], dtype=torch.float64)
    for W, G in zip(weights, grams, strict=True):
        Gs = shrink(G, alpha)
        A += Gs
        B += Gs @ W.double().T
    try:
        X = torch.linalg.solve(A, B)
    except RuntimeError:  # singular: the least-squares solution (minimum norm)
        log.warning("regmean: the summed Gram matrix is singular; using the least-squares solution")
        X = torch.linalg.lstsq(A, B, driver="gelsd").solution
    return X.T.float()
