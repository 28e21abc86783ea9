"""Per-example squared gradients of Linear, LayerNorm, RMSNorm and Embedding parameters from one batched backward.

The diagonal Fisher needs Σ_i w_i g_i² over examples i, where g_i is example i's own gradient. For a layer
that maps example i's rows x_i (T_i tokens) to outputs whose gradient is δ_i, that gradient is known in closed
form from the two (Goodfellow 2015, "Efficient per-example gradient computations"; BackPACK, Opacus):

    Linear     dW_i = δ_iᵀ x_i   (out, in)          db_i = Σ_t δ_it
    LayerNorm  dγ_i = Σ_t δ_it ⊙ x̂_it               dβ_i = Σ_t δ_it          (x̂: the normalised input)
    RMSNorm    dγ_i = Σ_t δ_it ⊙ x̂_it                                        (x̂ = x / rms(x))
    Embedding  dE_i[v] = Σ_{t: id_it = v} δ_it       (only the rows example i uses)

So one ordinary forward and backward of the batch (no weight gradients: only δ is needed) plus, per layer,
these products give every example's gradient. The products are squared and summed as they are formed, a block
of output rows at a time, so the B per-example weight gradients never exist in memory together: that memory
traffic is what makes `vmap(grad)` (merging/datadriven/fisher.py) no faster than a loop on a CPU.

This holds when each selected parameter is used only by its own module, once per forward, on batch-first
inputs whose dim 0 is the example (true of transformers' encoders and the MLPs here). `hooks_supported` checks
what it can statically; `diagonal_fisher(engine="auto")` also compares this engine against a per-example
backward on two examples before trusting it, and falls back to `vmap` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HooksUnsupported", "SquaredGradHooks", "hooks_supported"]

_SUPPORTED = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding)
_ROWS = 64  # output rows per block of per-example Linear gradients: B x 64 x in floats stay in cache


class HooksUnsupported(Exception):
    """The model uses a selected parameter in a way the closed forms do not cover (the caller falls back)."""


def _is_hf_rms_norm(m: nn.Module) -> bool:
    """transformers' `*RMSNorm` (Llama, Mistral, Qwen2, ...): `weight * (x / rms(x))` with `variance_epsilon`.
    (Variants that scale by `1 + weight`, e.g. Gemma's, have no `variance_epsilon` and are not taken.)"""
    w = getattr(m, "weight", None)
    return (
        type(m).__name__.endswith("RMSNorm")
        and hasattr(m, "variance_epsilon")
        and isinstance(w, nn.Parameter)
        and w.dim() == 1
        and set(m._parameters) == {"weight"}
    )


def _rms_norm(mod: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The input normalised by its root mean square (in float32) and the number of normalised trailing dims."""
    if isinstance(mod, nn.RMSNorm):
        eps = torch.finfo(x.dtype).eps if mod.eps is None else mod.eps
        return F.rms_norm(x.float(), mod.normalized_shape, eps=eps), len(mod.normalized_shape)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=float(mod.variance_epsilon)), 1


def hooks_supported(module: nn.Module, names: Sequence[str]) -> str | None:
    """None when every parameter in `names` is the weight/bias of a Linear, LayerNorm, RMSNorm or Embedding that
    holds it alone; otherwise the reason it is not."""
    mods = dict(module.named_modules())
    holders: dict[int, int] = {}
    for m in mods.values():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    for n in names:
        mname, _, attr = n.rpartition(".")
        m = mods.get(mname)
        if not (isinstance(m, _SUPPORTED) or _is_hf_rms_norm(m)) or attr not in ("weight", "bias"):
            return f"{n} is not the weight or bias of a Linear, LayerNorm, RMSNorm or Embedding"
        if holders.get(id(getattr(m, attr)), 0) > 1:
            return f"{n} is shared with another module (tied weights)"
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            return f"{n} belongs to an Embedding with max_norm (it rewrites its weight in the forward)"
    return None


class SquaredGradHooks:
    """While active (`with`), each forward of `module` on a batch of B examples records, per selected parameter,
    Σ_i g_i² of the per-example gradients of whatever is backpropagated next, added into `self.total`.

    Args:
        module: the model; its selected modules are hooked.
        names: the parameters (each a weight/bias of a supported module, see `hooks_supported`).
    """

    def __init__(self, module: nn.Module, names: Sequence[str]):
        why = hooks_supported(module, names)
        if why is not None:
            raise HooksUnsupported(why)
        mods = dict(module.named_modules())
        self.by_module: dict[str, dict[str, str]] = {}  # module name -> {"weight"|"bias": parameter name}
        for n in names:
            mname, _, attr = n.rpartition(".")
            self.by_module.setdefault(mname, {})[attr] = n
        self.modules = {m: mods[m] for m in self.by_module}
        params = dict(module.named_parameters())
        self.total = {n: torch.zeros(params[n].shape, dtype=torch.float32) for n in names}
        self.batch_size = 0
        self._calls: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self):
        for mname, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._forward_hook(mname)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def start_batch(self, batch_size: int) -> None:
        """Call before each forward: the batch's number of examples (dim 0 of every hooked input)."""
        self.batch_size = batch_size
        self._calls = dict.fromkeys(self.modules, 0)

    def _forward_hook(self, mname: str):
        def hook(mod: nn.Module, inputs, out: torch.Tensor):
            if not torch.is_grad_enabled():  # a forward for predictions only (e.g. drawing the labels)
                return None
            self._calls[mname] += 1
            if self._calls[mname] > 1:
                raise HooksUnsupported(f"module {mname} runs more than once per forward")
            x, B = inputs[0], self.batch_size
            if x.dim() == 0 or out.dim() < 2:
                raise HooksUnsupported(f"module {mname} has no batch dimension")
            if (
                not out.requires_grad
            ):  # nothing upstream needs a gradient: start the graph here (the weights are frozen)
                out = out.detach().requires_grad_()
            if (
                x.shape[0] == 1 and B > 1
            ):  # broadcast over the batch (e.g. BERT's position ids): give each example its own copy
                x, out = x.expand(B, *x.shape[1:]), out.expand(B, *out.shape[1:])
            if x.shape[0] != B or out.shape[0] != B:
                raise HooksUnsupported(f"module {mname}: input dim 0 is {x.shape[0]}, not the batch's {B} examples")
            x = x.detach()
            out.register_hook(lambda d: self._accumulate(mname, mod, x, d))
            return out  # with a gradient of its own (per example when expanded)

        return hook

    def _accumulate(self, mname: str, mod: nn.Module, x: torch.Tensor, d: torch.Tensor) -> None:
        names, d = self.by_module[mname], d.float()
        if isinstance(mod, nn.Embedding):
            self._embedding(names, mod, x, d)
        elif isinstance(mod, nn.Linear):
            self._linear(names, mod, x, d)
        else:
            self._norm(names, mod, x, d)

    def _linear(self, names: dict[str, str], mod: nn.Linear, x: torch.Tensor, d: torch.Tensor) -> None:
        B = d.shape[0]
        d3, x3 = d.reshape(B, -1, d.shape[-1]), x.float().reshape(B, -1, mod.in_features)  # (B, T, out), (B, T, in)
        if "weight" in names:
            tot = self.total[names["weight"]]
            if d3.shape[1] == 1:  # one row per example: dW_i² = (δ_i²)ᵀ (x_i²) exactly
                tot += d3[:, 0].square().T @ x3[:, 0].square()
            else:
                for o in range(0, d3.shape[-1], _ROWS):
                    tot[o : o + _ROWS] += torch.bmm(d3[..., o : o + _ROWS].transpose(1, 2), x3).square_().sum(0)
        if "bias" in names:
            self.total[names["bias"]] += d3.sum(1).square().sum(0)

    def _norm(self, names: dict[str, str], mod: nn.Module, x: torch.Tensor, d: torch.Tensor) -> None:
        """LayerNorm / RMSNorm over the trailing normalised dims."""
        if isinstance(mod, nn.LayerNorm):
            k = len(mod.normalized_shape)
            xhat = F.layer_norm(x.float(), mod.normalized_shape, eps=mod.eps)
        else:
            xhat, k = _rms_norm(mod, x)
        dn = d.reshape(d.shape[0], -1, *d.shape[-k:])
        if "weight" in names:
            self.total[names["weight"]] += (dn * xhat.reshape(dn.shape)).sum(1).square().sum(0)
        if "bias" in names:
            self.total[names["bias"]] += dn.sum(1).square().sum(0)

    def _embedding(self, names: dict[str, str], mod: nn.Embedding, ids: torch.Tensor, d: torch.Tensor) -> None:
        if "weight" not in names:
            return
        B, V, dim = d.shape[0], mod.num_embeddings, d.shape[-1]
        ids = ids.reshape(B, -1).long()
        rows = d.reshape(B, -1, dim)
        keep = torch.ones_like(ids, dtype=torch.bool) if mod.padding_idx is None else ids != mod.padding_idx
        example = torch.arange(B).unsqueeze(1).expand_as(ids)
        key = (example * V + ids)[keep]  # one key per (example, token id): its gradient row is the sum of its δ rows
        uniq, inv = torch.unique(key, return_inverse=True)
        summed = torch.zeros(len(uniq), dim).index_add_(0, inv, rows[keep])
        self.total[names["weight"]].index_add_(0, uniq % V, summed.square())
