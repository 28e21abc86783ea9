"""Tiny models and tolerances shared by the adapter tests (tests/test_adapters_*.py)."""

from __future__ import annotations

import torch
from torch import nn

from peft_lab.adapters import ADAPTERS, build_adapter


class MLP(nn.Module):
    """Odd shapes on purpose: fc1.weight is 17x33, fc2.weight 33x17; `head` is the part trained in full."""

    def __init__(self, n_out: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(33, 17)
        self.fc2 = nn.Linear(17, 33)
        self.head = nn.Linear(33, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ConvNet(nn.Module):
    """A conv layer (odd channel counts) between two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.proj = nn.Linear(6, 9)
        self.norm = nn.LayerNorm(9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))  # (B, 6, H, W)
        return self.norm(self.proj(h.permute(0, 2, 3, 1)))


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def small_params(name: str, **extra) -> dict:
    """A small config for adapter `name`: r=4 where it has a rank (every registered adapter is covered)."""
    fields = {f for f in ADAPTERS.get(name).Config.__dataclass_fields__}
    p = {"r": 4} if "r" in fields else {}
    p.update(extra)
    return p


def make(name: str, **extra):
    return build_adapter(name, **small_params(name, **extra))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def perturb(adapter, scale: float = 0.1) -> None:
    """Simulate training: move every trainable parameter off its init (so deltas are non-zero)."""
    g = torch.Generator().manual_seed(1)
    for p in adapter.trainable_parameters().values():
        p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def tol(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Absolute tolerance for comparing outputs of size ~ref in `dtype`: (W + Δ) − Δ is not W in floating point, so
    round trips are compared relative to the largest value (1e-5 in float32, 4e-2 in bfloat16)."""
    scale = float(ref.detach().float().abs().max()) + 1.0
    return (1e-5 if dtype == torch.float32 else 4e-2) * scale


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = float((a.detach().float() - b.detach().float()).abs().max())
    assert err <= tol(dtype, b), f"{what}: max abs error {err:.3g} > {tol(dtype, b):.3g}"
