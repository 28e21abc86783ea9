"""LoLDU (https://arxiv.org/abs/2410.13618): train only the diagonal of a truncated LDU decomposition.

    W = P L diag(D) Ū       (LU with partial pivoting in float32; Ū = U / D row-wise, unit upper)
    W' = W_res + σ P L_r diag(z) Ū_r,  W_res = W − σ0 P L_r diag(z0) Ū_r,  z0 = D[:r]
       = W + P L_r diag(σ z − σ0 z0) Ū_r          (the form we compute)

Trainable: z (r values per layer; + σ when `train_scale`). Frozen: perm, L_r, Ū_r, z0, σ0.

Choices where the official code (SKDDJ/LoLDU) is unsafe or implicit (docs/adapters.md#loldu):
- we keep W and add `P L_r diag(σz − σ0z0) Ū_r`, which equals the paper's `W_res + σ P L_r diag(z) Ū_r` but is
  exact at init (the coefficient is exactly 0) and never rounds W_res to a half dtype;
- parameters exist as soon as `attach` returns (the official code creates them on the first forward);
- σ = alpha / r is frozen unless `train_scale` (the official code trains it by accident); alpha = null gives
  σ = 1, the same unit scale our LoRA default uses (the official default α = 1 gives σ = 1/r);
- P is a permutation vector (`(P M) == M[perm]`), never a dense m×m matrix;
- a zero or tiny pivot among the first r (a singular or badly scaled W) is a UserError naming the layer;
- the forward never forms W': `y = base(x) + ((x Ū_r^T) * (σz − σ0z0)) (P L_r)^T` (LoRA's cost);
- Conv2d weights are flattened to (out, in·kh·kw): Ū_r becomes an (r, in, kh, kw) convolution, P L_r a 1x1 one.
Only the "lu" initialisation (z = z0) reproduces W at init, so the official code's other inits are not offered.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_lab.adapters._own import AdapterLayer, OwnAdapter
from peft_lab.adapters.base import ADAPTERS, AdapterConfig
from peft_lab.errors import UserError
from peft_lab.params import param
from peft_lab.tree import LDU, Leaf

__all__ = ["LoLDU", "LoLDUConfig", "LoLDULayer", "truncated_ldu"]


@dataclasses.dataclass(frozen=True)
class LoLDUConfig(AdapterConfig):
    """Attributes:
    r: number of leading LU pivots kept per layer (= trainable values per layer).
    alpha: σ = alpha / r; null = r (σ = 1).
    train_scale: also train σ (one more parameter per layer).
    """

    r: int = param(8, within="[1, inf)")
    alpha: float | None = param(None, within="(0, inf)", help="null for σ = 1")
    train_scale: bool = False

    @property
    def sigma(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


def truncated_ldu(W: torch.Tensor, r: int, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first r pivots of W's LDU decomposition.

    Args:
        W: (m, n) weight, any float dtype (factorised in float32).
        r: pivots to keep, r <= min(m, n).
        where: the layer's name, for errors.
    Returns:
        perm (m,) int64 with `(P M) == M[perm]`, L_r (m, r) unit lower trapezoidal, z0 = D[:r] (r,),
        Ū_r (r, n) unit upper, all float32 except perm; `W ≈ (L D Ū)[perm]` over all pivots.
    Raises:
        UserError: a pivot among the first r is zero or tiny relative to the largest (W is singular or badly
        scaled there), which would make Ū = U / D infinite.
    """
    m, n = W.shape
    P, L, U = torch.linalg.lu(W.float())
    D = torch.diagonal(U)
    dmax = D.abs().max()
    tol = max(m, n) * torch.finfo(torch.float32).eps * dmax  # the usual numerical-rank threshold
    bad = (D[:r].abs() <= tol).nonzero().flatten()
    if dmax == 0 or bad.numel():
        i = int(bad[0]) if bad.numel() else 0
        raise UserError(
            f"loldu: the weight of {where} {tuple(W.shape)} is singular or badly scaled within its first r={r} LU "
            f"pivots (pivot {i} is {float(D[i]):.3g}, the largest {float(dmax):.3g}); lower adapter.r below "
            f"{max(i, 1)} or exclude the layer."
        )
    perm = P.argmax(dim=1)  # row i of P selects row perm[i]: (P @ M) == M[perm]
    return perm, L[:, :r].contiguous(), D[:r].clone(), (U[:r] / D[:r, None]).contiguous()


class LoLDULayer(AdapterLayer):
    """LoLDU on an nn.Linear or nn.Conv2d (groups 1, zero padding)."""

    def __init__(self, base_layer: nn.Module, r: int, sigma: float, train_scale: bool, where: str):
        super().__init__(base_layer)
        w = base_layer.weight
        perm, L, z0, U = truncated_ldu(w.detach().reshape(w.shape[0], -1), r, where)
        dt = w.dtype
        # factors in the weight dtype (what the forward multiplies with); z, z0, σ in float32
        self.register_buffer("perm", perm)
        self.register_buffer("PL", L[perm].to(dt))  # P L_r: the forward needs the permuted rows
        self.register_buffer("U", U.to(dt))
        self.register_buffer("z0", z0)
        self.register_buffer("scale0", torch.tensor(float(sigma)))
        self.z = nn.Parameter(z0.clone())
        self.scale = nn.Parameter(torch.tensor(float(sigma)), requires_grad=train_scale)

    def coefficient(self) -> torch.Tensor:
        """d = z − (σ0/σ) z0, so that σ·d = σz − σ0z0 (exactly 0 at init; d = z − z0 while σ is frozen)."""
        return self.z - self.z0 * (self.scale0 / self.scale)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        c = (self.scale * self.coefficient()).to(x.dtype)  # (r,)
        if isinstance(self.base_layer, nn.Conv2d):
            b = self.base_layer
            U = self.U.view(-1, *b.weight.shape[1:])  # (r, in, kh, kw)
            h = F.conv2d(x, U, None, b.stride, b.padding, b.dilation)  # (B, r, H', W')
            return F.conv2d(h * c[:, None, None], self.PL[:, :, None, None])  # (B, out, H', W')
        h = F.linear(x, self.U)  # (..., r)
        return F.linear(h * c, self.PL)  # (..., out)

    @torch.no_grad()
    def delta(self) -> Leaf:
        inv = torch.argsort(self.perm)
        L = self.PL[inv]  # undo the row permutation: L_r itself
        return LDU(
            self.perm.clone(),
            L.clone(),
            self.coefficient().detach().clone(),
            self.U.clone(),
            float(self.scale),
            tuple(self.base_layer.weight.shape),
        )

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"z": self.z.detach(), "z0": self.z0, "scale": self.scale.detach(), "scale0": self.scale0}

    @torch.no_grad()
    def load_delta(self, leaf: Leaf, state: dict[str, torch.Tensor]) -> None:
        if not isinstance(leaf, LDU) or leaf.U.shape != self.U.shape:
            raise UserError(f"saved loldu delta {leaf!r} does not fit a layer of rank {self.U.shape[0]}.")
        # the saved factors win over this machine's LU (another BLAS may pivot differently)
        self.perm.copy_(leaf.perm.long())
        self.PL.copy_(leaf.L[leaf.perm.long()].to(self.PL.dtype))
        self.U.copy_(leaf.U.to(self.U.dtype))
        if {"z", "z0", "scale", "scale0"} <= set(state):
            self.z.copy_(state["z"]), self.z0.copy_(state["z0"])
            self.scale.copy_(state["scale"]), self.scale0.copy_(state["scale0"])
        else:  # a bare delta tree: re-base on z0 = 0, which gives the same function
            self.z.copy_(leaf.d.float()), self.z0.zero_(), self.scale.fill_(leaf.scale), self.scale0.fill_(leaf.scale)


@ADAPTERS.register("loldu")
class LoLDU(OwnAdapter):
    name = "loldu"
    Config = LoLDUConfig
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        w = module.weight
        k = min(w.shape[0], w[0].numel())
        if self.config.r > k:
            raise UserError(
                f"loldu: rank r={self.config.r} exceeds what layer {name} {tuple(w.shape)} allows "
                f"(at most {k} pivots); lower adapter.r or exclude the layer."
            )
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise UserError(
                f"loldu: {name} is a Conv2d with groups={module.groups}, padding_mode={module.padding_mode!r}; "
                "only groups=1 with zero padding is supported. Exclude it."
            )
        return LoLDULayer(module, self.config.r, self.config.sigma, self.config.train_scale, name)
