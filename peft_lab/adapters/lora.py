"""LoRA (https://arxiv.org/abs/2106.09685) and rsLoRA (https://arxiv.org/abs/2312.03732), through PEFT.

    y = x W^T + b + s · dropout(x) A^T B^T,   ΔW = s · B A,   A (r, in), B (out, r)
    s = alpha / r   (rsLoRA: s = alpha / sqrt(r));   init: A kaiming-uniform (or N(0, 1/r)), B = 0

Saved in PEFT's format (`PeftModel.from_pretrained` loads it). Supports nn.Linear and nn.Conv1d/Conv2d (B is a
1x1 convolution after a full-kernel A).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from torch import nn

from peft_lab.adapters._peft import ADAPTER_NAME, PeftAdapter
from peft_lab.adapters.base import ADAPTERS, AdapterConfig
from peft_lab.errors import UserError
from peft_lab.params import param
from peft_lab.tree import Leaf, LowRank

__all__ = ["LoRA", "LoRAConfig", "LowRankConfig", "max_rank"]


@dataclasses.dataclass(frozen=True)
class LowRankConfig(AdapterConfig):
    """Hyperparameters of a LoRA-shaped adapter.

    Attributes:
        r: rank of B A (at most min(out, in) of every target layer).
        alpha: scale numerator; None = r, so s = 1 (rsLoRA: s = sqrt(r)) at every rank.
        dropout: dropout on the adapter's input (train mode only).
        use_rslora: s = alpha / sqrt(r) instead of alpha / r.
    """

    r: int = param(8, within="[1, inf)")
    alpha: float | None = param(None, within="(0, inf)", help="null for alpha = r")
    dropout: float = param(0.0, within="[0, 1)")
    use_rslora: bool = False

    @property
    def lora_alpha(self) -> float:
        return float(self.r if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclasses.dataclass(frozen=True)
class LoRAConfig(LowRankConfig):
    """Attributes:
    init: "kaiming" (PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in))) or "gaussian" (A ~ N(0, 1/r)); B = 0 both.
    """

    init: str = param("kaiming", choices=("kaiming", "gaussian"))


def max_rank(module: nn.Module) -> int:
    """The largest useful rank of a layer's delta: min(out, in·prod(kernel))."""
    w = module.weight
    return min(w.shape[0], w[0].numel())


def lora_layer_delta(layer: nn.Module) -> LowRank:
    """s · B A of one PEFT LoRA layer, shaped like its base weight (conv: A (r, in, k...), B (out, r, 1...))."""
    A = layer.lora_A[ADAPTER_NAME].weight.detach().clone()
    B = layer.lora_B[ADAPTER_NAME].weight.detach().clone()
    return LowRank(B, A, layer.scaling[ADAPTER_NAME], tuple(layer.get_base_layer().weight.shape))


@ADAPTERS.register("lora")
class LoRA(PeftAdapter):
    name = "lora"
    Config = LoRAConfig
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv1d, nn.Conv2d)
    peft_type = "LORA"

    @property
    def layer_type(self) -> type:  # imported lazily: peft is slow to import
        from peft.tuners.lora import LoraLayer

        return LoraLayer

    def check_layer(self, name: str, module: nn.Module) -> None:
        if getattr(module, "groups", 1) != 1:
            raise UserError(f"{self.name}: {name} is a grouped convolution (groups={module.groups}); exclude it.")
        if self.config.r > max_rank(module):
            raise UserError(
                f"{self.name}: rank r={self.config.r} exceeds what layer {name} {tuple(module.weight.shape)} allows "
                f"(at most {max_rank(module)}); lower adapter.r or exclude the layer."
            )

    def lora_kwargs(self) -> dict[str, Any]:
        c = self.config
        return dict(r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.dropout, use_rslora=c.use_rslora)

    def peft_config(self, model, targets, peft_targets, saved):
        from peft import LoraConfig

        init = True if self.config.init == "kaiming" else "gaussian"
        return LoraConfig(
            target_modules=peft_targets, modules_to_save=saved or None, init_lora_weights=init, **self.lora_kwargs()
        )

    def layer_delta(self, layer: nn.Module) -> Leaf:
        return lora_layer_delta(layer)

    @classmethod
    def config_from_peft(cls, peft_cfg: dict[str, Any]) -> dict[str, Any]:
        if peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern") or peft_cfg.get("use_dora"):
            raise UserError(
                "this PEFT LoRA uses rank_pattern/alpha_pattern/DoRA, which peft-lab's lora adapter does not "
                "express; load it with PeftModel.from_pretrained, or use it as a task vector in `peft-lab merge`."
            )
        return {
            **super().config_from_peft(peft_cfg),
            "r": peft_cfg.get("r", 8),
            "alpha": peft_cfg.get("lora_alpha"),
            "dropout": peft_cfg.get("lora_dropout", 0.0),
            "use_rslora": bool(peft_cfg.get("use_rslora", False)),
        }
