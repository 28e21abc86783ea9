"""Kronecker-product adapters: LoKr (LyCORIS, through PEFT) and DiffuseKronA (https://arxiv.org/abs/2402.17412).

    ΔW = s · kron(W1, W2),   W1 (o1, i1), W2 (o2, i2),   o1·o2 = out, i1·i2 = in
    y.view(o1, o2) = s · W1 X W2^T  with X = x.view(i1, i2)   (no dense ΔW needed)

LoKr (default): PEFT's `LoKrConfig`: (o1, o2) = factorization(out, factor), (i1, i2) = factorization(in, factor)
(factor -1 = the most balanced split); W2 = W2a W2b of rank r when r < max(o2, i2)/2, else full; W1 likewise
only with `decompose_both`; s = alpha / r; init W1 = 0. Saved in PEFT's format.

DiffuseKronA's choices:
- `full: true`: both factors full, whatever their size (realised in PEFT by raising its rank above the
  full-rank threshold, with alpha raised alike so s is unchanged);
- s = 1: the default here (alpha = null means alpha = r);
- independent out/in factors (`a1`, `a2`: W1 is (a1, a2), W2 is (out/a1, in/a2)): PEFT has one factor for
  both dims and cannot express a1 != a2, so this mode uses our own layer (`KronALayer`, Linear layers only,
  DiffuseKronA's init W1 ~ N(0, (1/a1)^2), W2 = 0, both full) and is saved in peft-lab's own format.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peft_lab.adapters._own import AdapterLayer, OwnAdapter
from peft_lab.adapters._peft import ADAPTER_NAME, PeftAdapter
from peft_lab.adapters.base import ADAPTERS, Adapter, AdapterConfig, read_adapter_config
from peft_lab.errors import UserError
from peft_lab.params import param
from peft_lab.tree import Kronecker as KroneckerLeaf
from peft_lab.tree import Leaf, Tree

__all__ = ["Kronecker", "KroneckerConfig", "KronALayer", "factorization"]

log = logging.getLogger("peft_lab.adapters")


@dataclasses.dataclass(frozen=True)
class KroneckerConfig(AdapterConfig):
    """Attributes:
    r: rank of the larger factor W2 (low-rank when r < max(o2, i2)/2); unused when `full` or `a1`/`a2`.
    alpha: s = alpha / r; null = r (s = 1, as DiffuseKronA).
    factor: PEFT's decompose_factor for both dims (-1 = most balanced split).
    decompose_both: also factor W1 at rank r when r < max(o1, i1)/2.
    full: both factors full (DiffuseKronA).
    a1, a2: DiffuseKronA's independent out/in sizes of W1 (both or neither; our own layer, see above).
    rank_dropout, module_dropout: PEFT LoKr's train-time dropouts (LoKr mode only).
    """

    r: int = param(8, within="[1, inf)")
    alpha: float | None = param(None, within="(0, inf)", help="null for s = 1")
    factor: int = -1
    decompose_both: bool = False
    full: bool = False
    a1: int | None = param(None, within="[1, inf)")
    a2: int | None = param(None, within="[1, inf)")
    rank_dropout: float = param(0.0, within="[0, 1)")
    module_dropout: float = param(0.0, within="[0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor != -1 and self.factor < 1:
            raise UserError(f"adapter.factor must be -1 (balanced) or a positive integer, got {self.factor!r}.")
        if (self.a1 is None) != (self.a2 is None):
            raise UserError("adapter.a1 and adapter.a2 go together (DiffuseKronA's W1 shape); set both or neither.")
        if self.diffusekrona and (self.rank_dropout or self.module_dropout or self.decompose_both):
            raise UserError("adapter.a1/a2 (DiffuseKronA mode) take no rank_dropout, module_dropout or decompose_both.")

    @property
    def diffusekrona(self) -> bool:
        return self.a1 is not None

    @property
    def scale(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """PEFT/LyCORIS's split of `dim` into (m, n), m·n = dim (the same function PEFT's LoKr uses)."""
    from peft.tuners.lokr.layer import factorization as peft_factorization

    return peft_factorization(dim, factor)


# ---------------------------------------------------------------------------------------------------------
# LoKr through PEFT
# ---------------------------------------------------------------------------------------------------------
def _lokr_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2) of a PEFT LoKr layer, low-rank factors multiplied out (they are small)."""
    p = {n: getattr(layer, n) for n in layer.adapter_layer_names}
    if ADAPTER_NAME in p["lokr_t2"]:
        raise UserError("kronecker: LoKr with a Tucker core (use_effective_conv2d) has no Kronecker delta leaf.")
    a = ADAPTER_NAME
    w1 = p["lokr_w1"][a] if a in p["lokr_w1"] else p["lokr_w1_a"][a] @ p["lokr_w1_b"][a]
    w2 = p["lokr_w2"][a] if a in p["lokr_w2"] else p["lokr_w2_a"][a] @ p["lokr_w2_b"][a]
    return w1, w2


@functools.cache
def _fast_lokr_linear() -> type:
    """PEFT's LoKr Linear with the Kronecker product applied to x instead of materialised.

    PEFT forms ΔW = s·kron(W1, W2) (out×in) on every forward and multiplies x by it: one more dense matmul per
    layer, and two more in the backward. `y.view(o1, o2) = s · W1 X W2^T` with X = x.view(i1, i2) costs
    n·(o1·i1·i2 + o1·i2·o2) instead of n·out·in (10x less for MiniLM's 384x384 at the balanced split). Same
    parameters and state dict as PEFT's layer, so saved dirs are PEFT's; rank dropout (which drops rows of ΔW
    at random) keeps PEFT's own path.
    """
    from peft.tuners.lokr.layer import Linear

    class FastLoKrLinear(Linear):
        def _get_delta_activations(self, adapter_name: str, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if adapter_name != ADAPTER_NAME or (self.training and self.rank_dropout[adapter_name]):
                return super()._get_delta_activations(adapter_name, input, *args, **kwargs)
            w1, w2 = _lokr_factors(self)
            (o1, i1), (o2, i2) = w1.shape, w2.shape
            X = input.reshape(-1, i1, i2).to(w2.dtype)  # (n, i1, i2)
            Y = torch.matmul(w1, X @ w2.t())  # (o1, i1) @ (n, i1, o2) -> (n, o1, o2)
            return (self.scaling[adapter_name] * Y).reshape(*input.shape[:-1], o1 * o2)

    return FastLoKrLinear


def _use_fast_forward(model: nn.Module) -> None:
    from peft.tuners.lokr.layer import Linear

    fast = _fast_lokr_linear()
    for m in model.modules():
        if type(m) is Linear:
            m.__class__ = fast  # same attributes and state; only the delta's forward differs


class _LoKr(PeftAdapter):
    name = "kronecker"
    Config = KroneckerConfig
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)
    peft_type = "LOKR"

    @property
    def layer_type(self) -> type:
        from peft.tuners.lokr.layer import LoKrLayer

        return LoKrLayer

    def check_layer(self, name: str, module: nn.Module) -> None:
        if getattr(module, "groups", 1) != 1:
            raise UserError(f"kronecker: {name} is a grouped convolution (groups={module.groups}); exclude it.")

    def peft_config(self, model, targets, peft_targets, saved):
        from peft import LoKrConfig

        c = self.config
        r = c.r
        if c.full:  # PEFT keeps W2 full once r >= max(o2, i2)/2: raise r past that for every target
            for t in targets:
                w = model.get_submodule(t).weight
                o2 = factorization(w.shape[0], c.factor)[1]
                i2 = factorization(w.shape[1], c.factor)[1]
                r = max(r, math.ceil(max(o2, i2) / 2))
        return LoKrConfig(
            r=r,
            alpha=c.scale * r,
            decompose_factor=c.factor,
            decompose_both=c.decompose_both and not c.full,
            rank_dropout=c.rank_dropout,
            module_dropout=c.module_dropout,
            target_modules=peft_targets,
            modules_to_save=saved or None,
        )

    def attach(self, model: nn.Module) -> nn.Module:
        out = super().attach(model)
        _use_fast_forward(out)
        return out

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> PeftAdapter:
        adapter = super().load(model, adapter_dir)
        _use_fast_forward(adapter.model)
        return adapter

    def layer_delta(self, layer: nn.Module) -> Leaf:
        w1, w2 = _lokr_factors(layer)
        shape = tuple(layer.get_base_layer().weight.shape)
        return KroneckerLeaf(w1.detach().clone(), w2.detach().clone(), layer.scaling[ADAPTER_NAME], shape)

    @classmethod
    def config_from_peft(cls, peft_cfg: dict[str, Any]) -> dict[str, Any]:
        if peft_cfg.get("use_effective_conv2d") or peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"):
            raise UserError(
                "this PEFT LoKr uses use_effective_conv2d or rank/alpha patterns, which peft-lab's kronecker adapter "
                "does not express; load it with PeftModel.from_pretrained, or merge it with `peft-lab merge`."
            )
        return {
            **super().config_from_peft(peft_cfg),
            "r": peft_cfg.get("r", 8),
            "alpha": peft_cfg.get("alpha"),
            "factor": peft_cfg.get("decompose_factor", -1),
            "decompose_both": bool(peft_cfg.get("decompose_both", False)),
            "rank_dropout": peft_cfg.get("rank_dropout", 0.0),
            "module_dropout": peft_cfg.get("module_dropout", 0.0),
        }


# ---------------------------------------------------------------------------------------------------------
# DiffuseKronA with independent out/in factors: our layer
# ---------------------------------------------------------------------------------------------------------
class KronALayer(AdapterLayer):
    """nn.Linear + s·kron(A, B), A (a1, a2) ~ N(0, (1/a1)^2), B (out/a1, in/a2) = 0 (DiffuseKronA's init)."""

    def __init__(self, base_layer: nn.Linear, a1: int, a2: int, scale: float):
        super().__init__(base_layer)
        out_f, in_f = base_layer.weight.shape
        self.scale = scale
        self.kron_A = nn.Parameter(torch.randn(a1, a2, device=base_layer.weight.device) / a1)
        self.kron_B = nn.Parameter(torch.zeros(out_f // a1, in_f // a2, device=base_layer.weight.device))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        (a1, a2), (b1, b2) = self.kron_A.shape, self.kron_B.shape
        X = x.reshape(-1, a2, b2).to(self.kron_B.dtype)  # (n, a2, b2)
        Y = self.kron_A @ (X @ self.kron_B.t())  # (a1, a2) @ (n, a2, b1) -> (n, a1, b1)
        return (self.scale * Y).reshape(*x.shape[:-1], a1 * b1)

    @torch.no_grad()
    def delta(self) -> Leaf:
        return KroneckerLeaf(
            self.kron_A.detach().clone(), self.kron_B.detach().clone(), self.scale, tuple(self.base_layer.weight.shape)
        )

    @torch.no_grad()
    def load_delta(self, leaf: Leaf, state: dict[str, torch.Tensor]) -> None:
        if (
            not isinstance(leaf, KroneckerLeaf)
            or leaf.A.shape != self.kron_A.shape
            or leaf.B.shape != self.kron_B.shape
        ):
            raise UserError(
                f"saved kronecker delta {leaf!r} does not fit factors {tuple(self.kron_A.shape)}, "
                f"{tuple(self.kron_B.shape)}."
            )
        self.kron_A.copy_(leaf.A), self.kron_B.copy_(leaf.B)
        self.scale = leaf.scale


class _KronA(OwnAdapter):
    name = "kronecker"
    Config = KroneckerConfig
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        out_f, in_f = module.weight.shape
        a1, a2 = self.config.a1, self.config.a2
        if out_f % a1 or in_f % a2:
            raise UserError(
                f"kronecker: DiffuseKronA needs a1 | out and a2 | in, but layer {name} is {out_f}x{in_f} and "
                f"(a1, a2) = ({a1}, {a2}); choose divisors or exclude the layer."
            )
        return KronALayer(module, a1, a2, self.config.scale)


# ---------------------------------------------------------------------------------------------------------
# The registered adapter: one config, two realisations
# ---------------------------------------------------------------------------------------------------------
@ADAPTERS.register("kronecker")
class Kronecker(Adapter):
    """LoKr through PEFT, or DiffuseKronA's independent-factor form through our own layer (when a1/a2 are set)."""

    name = "kronecker"
    Config = KroneckerConfig

    def __init__(self, config: KroneckerConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.impl: PeftAdapter | OwnAdapter = (_KronA if self.config.diffusekrona else _LoKr)(self.config)

    @property
    def supported(self) -> tuple[type[nn.Module], ...]:
        return self.impl.supported

    def attach(self, model: nn.Module) -> nn.Module:
        if self.config.diffusekrona and self.config.r != KroneckerConfig.r:
            log.warning("kronecker: r=%d is unused with a1/a2 set (both DiffuseKronA factors are full)", self.config.r)
        self.model = self.impl.attach(model)
        return self.model

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return self.impl.trainable_parameters()

    def delta_tree(self) -> Tree:
        return self.impl.delta_tree()

    def merge(self) -> None:
        self.impl.merge()
        self.merged = True

    def unmerge(self) -> None:
        self.impl.unmerge()
        self.merged = False

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> None:
        self.impl.save(out_dir, overwrite=overwrite)

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> Kronecker:
        d = Path(adapter_dir)
        name, raw = read_adapter_config(d)
        diffusekrona = raw.get("a1") is not None
        impl = (_KronA if diffusekrona else _LoKr).load(model, d)
        adapter = cls(impl.config)
        adapter.impl, adapter.model = impl, impl.model
        return adapter
