"""PiSSA (https://arxiv.org/abs/2404.02948): LoRA initialised on the principal singular directions, via PEFT.

    W = U Σ V^T;  A = diag(sqrt(Σ_r / s)) V_r^T,  B = U_r diag(sqrt(Σ_r / s));  W_res = W − s·B A
    forward: y = x W_res^T + s · x A^T B^T   (exactly LoRA on W_res)

`niter` null = exact SVD (torch.linalg.svd); an integer n = torch.svd_lowrank with n subspace iterations (PEFT's
"pissa_niter_n"; the residual is W − s·B A either way, so the init reproduces W).

Saved converted to a plain LoRA on the ORIGINAL weights, so anyone can `PeftModel.from_pretrained(base, dir)`:
    ΔW = s(B A − B0 A0) = s · [B | −B0] [A ; A0]   ->   r' = 2r, alpha' = 2·alpha (rsLoRA: sqrt(2)·alpha), s' = s
We write that conversion ourselves rather than through PEFT's `path_initial_model_for_weight_conversion`, which
in PEFT 0.21.2 drops `modules_to_save` (e.g. a sequence classifier's head) from the converted weights while the
config still lists them. Our `load` splits the doubled factors again and rebuilds W_res = W − s·B0 A0, so training
can resume as PiSSA; `PeftModel.from_pretrained` sees the same dir as a rank-2r LoRA with the same outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from peft_lab.adapters._peft import ADAPTER_NAME
from peft_lab.adapters.base import ADAPTERS
from peft_lab.adapters.lora import LoRA, LowRankConfig, lora_layer_delta
from peft_lab.errors import UserError
from peft_lab.params import param
from peft_lab.tree import Leaf, LowRank, load_safetensors

__all__ = ["PiSSA", "PiSSAConfig"]


@dataclasses.dataclass(frozen=True)
class PiSSAConfig(LowRankConfig):
    """Attributes:
    niter: null = exact SVD; an integer = fast randomized SVD (torch.svd_lowrank) with that many subspace iterations.
    """

    niter: int | None = param(None, within="[0, inf)", help="null = exact SVD")


def _keep_init(layer: nn.Module, B0: torch.Tensor, A0: torch.Tensor) -> None:
    """The initial factors, kept on the layer as non-persistent buffers (they follow `.to()`, stay out of
    state_dict) for the conversion ΔW = s(B A − B0 A0)."""
    layer.register_buffer("pissa_B0", B0, persistent=False)
    layer.register_buffer("pissa_A0", A0, persistent=False)


@ADAPTERS.register("pissa")
class PiSSA(LoRA):
    name = "pissa"
    Config = PiSSAConfig
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)  # PEFT's PiSSA init takes 2-D weights

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._svd = True  # False when load() restores a trained state instead of decomposing

    def peft_config(self, model, targets, peft_targets, saved):
        from peft import LoraConfig

        c = self.config
        init = ("pissa" if c.niter is None else f"pissa_niter_{c.niter}") if self._svd else True
        return LoraConfig(
            target_modules=peft_targets, modules_to_save=saved or None, init_lora_weights=init, **self.lora_kwargs()
        )

    def attach(self, model: nn.Module) -> nn.Module:
        out = super().attach(model)
        for layer in self.layers().values():
            d = lora_layer_delta(layer)
            _keep_init(layer, d.B, d.A)
        return out

    def tree_delta(self, name: str, layer: nn.Module) -> Leaf:
        """s(B A − B0 A0) as one rank-2r LowRank, relative to the ORIGINAL weight W (not W_res)."""
        d = lora_layer_delta(layer)
        B0, A0 = layer.pissa_B0, layer.pissa_A0
        return LowRank(torch.cat([d.B, -B0], dim=1), torch.cat([d.A, A0], dim=0), d.scale, d.shape)

    def save_peft(self, out_dir: Path) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        cfg = copy.deepcopy(self.model.peft_config[ADAPTER_NAME])
        c = self.config
        cfg.r = 2 * c.r
        cfg.lora_alpha = (math.sqrt(2) if c.use_rslora else 2) * c.lora_alpha  # keeps s' = s
        cfg.init_lora_weights = True  # loading must not decompose again
        cfg.inference_mode = True
        sd = get_peft_model_state_dict(self.model)  # LoRA factors + modules_to_save weights (the head)
        prefix = "base_model.model."
        for name, layer in self.layers().items():
            leaf = self.tree_delta(name, layer)
            sd[f"{prefix}{name}.lora_A.weight"] = leaf.A.contiguous()
            sd[f"{prefix}{name}.lora_B.weight"] = leaf.B.contiguous()
        cfg.save_pretrained(str(out_dir))
        save_file(
            {k: v.detach().contiguous() for k, v in sd.items()},
            str(out_dir / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str | Path) -> PiSSA:
        """Rebuild the trained PiSSA state (W_res, A, B, A0, B0, heads) from its converted LoRA dir."""
        from peft.utils import set_peft_model_state_dict

        d = Path(adapter_dir)
        adapter = cls(cls.read_config(d))
        peft_cfg = json.loads((d / "adapter_config.json").read_text())
        r2 = peft_cfg.get("r")
        if r2 != 2 * adapter.config.r:
            raise UserError(
                f"{d}: adapter_config.json has r={r2}, expected 2r = {2 * adapter.config.r} for a converted PiSSA."
            )
        adapter._svd = False
        adapter.attach(model)
        saved = {k: t.dense(None) for k, t in load_safetensors(d / "adapter_model.safetensors").items()}
        r = adapter.config.r
        prefix = "base_model.model."
        sd = dict(saved)
        with torch.no_grad():
            for name, layer in adapter.layers().items():
                try:
                    A2, B2 = saved[f"{prefix}{name}.lora_A.weight"], saved[f"{prefix}{name}.lora_B.weight"]
                except KeyError:
                    raise UserError(f"{d}: no LoRA factors for {name}.") from None
                A, A0, B, B0 = A2[:r], A2[r:], B2[:, :r], -B2[:, r:]
                sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = A, B
                base = layer.get_base_layer().weight
                # the same expression PEFT's pissa_init evaluates, so W_res is rebuilt bit for bit
                s = layer.scaling[ADAPTER_NAME]
                base.data = (base.data.float() - s * B0.float() @ A0.float()).to(base.dtype)
                _keep_init(layer, B0.clone(), A0.clone())
            result = set_peft_model_state_dict(adapter.model, sd)
        missing = [k for k in result.missing_keys if ADAPTER_NAME in k and ("lora_" in k or "modules_to_save" in k)]
        if missing:
            raise UserError(f"{d}: the saved adapter lacks {', '.join(missing[:5])}.")
        return adapter
