"""Denoising models (diffusers): `tiny_unet` (an unconditional `UNet2DModel`) and `tiny_unet_cond` (a class-conditional
`UNet2DConditionModel`, the class given as a one-hot token to cross-attention), each with its DDPM noise schedule.

Built from a small config (random init, to pretrain) or loaded from `path` (a dir this app saved, e.g. the
`DIR/model` of a pretraining run, to adapt). DDPM: https://arxiv.org/abs/2006.11239.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from peft_lab.errors import UserError
from peft_lab.params import param
from peft_lab.train.models.base import MODELS, BuiltModel, DataInfo, ModelConfig, check_local_path, quiet_hf

__all__ = ["TinyUNet", "TinyUNetCond"]


@dataclasses.dataclass(frozen=True)
class _UNetConfig(ModelConfig):
    """Attributes:
    path: a saved diffusers model dir to start from (null = build from the fields below, random init).
    block_out_channels: channels per resolution (each a multiple of 32, GroupNorm's group count).
    layers_per_block: resnet layers per resolution.
    attention: attention (self- or cross-) at the lowest resolution.
    num_train_timesteps, beta_schedule: the DDPM noise schedule (`squaredcos_cap_v2` = cosine).
    num_samples: images drawn at each evaluation (a grid PNG; 0 = none).
    sample_steps: DDPM sampling steps (fewer than num_train_timesteps skips steps: faster, blurrier).
    sample_seed: seeds the sampler, so grids of different runs are comparable.
    """

    task: str = "diffusion"
    path: str | None = None
    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64])
    layers_per_block: int = param(1, within="[1, inf)")
    attention: bool = True
    num_train_timesteps: int = param(1000, within="[1, inf)")
    beta_schedule: str = param("squaredcos_cap_v2", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    num_samples: int = param(64, within="[0, inf)")
    sample_steps: int = 100
    sample_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.path is not None:
            if check_local_path(self.path, "model.path") is None:
                raise UserError(f"model.path={self.path}: no such directory (a saved diffusers model dir).")
        if not self.block_out_channels or any(c % 32 for c in self.block_out_channels):
            raise UserError(f"model.block_out_channels={list(self.block_out_channels)}: give multiples of 32.")
        if not 1 <= self.sample_steps <= self.num_train_timesteps:
            raise UserError(
                f"model.sample_steps={self.sample_steps}: must be in 1..num_train_timesteps "
                f"({self.num_train_timesteps})."
            )

    def tasks(self) -> tuple[str, ...]:
        return ("diffusion",)

    def scheduler(self):
        from diffusers import DDPMScheduler

        if self.path is not None and (Path(self.path) / "scheduler_config.json").exists():
            with quiet_hf():
                return DDPMScheduler.from_pretrained(self.path)
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule)

    def _load(self, cls):
        try:
            with quiet_hf():
                return cls.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise UserError(f"model.path={self.path}: not a {cls.__name__} dir ({str(e).splitlines()[0]}).") from None

    def _shape(self, info: DataInfo) -> tuple[int, int]:
        if info.image_shape is None:
            raise UserError(f"model={self.name} denoises images; the dataset has no `image` column (try data=digits).")
        c, h, w = info.image_shape
        if h != w:
            raise UserError(f"model={self.name}: square images only (got {h}x{w}).")
        return c, h


@MODELS.register("tiny_unet")
@dataclasses.dataclass(frozen=True)
class TinyUNet(_UNetConfig):
    """Unconditional `UNet2DModel`: (32, 64) channels on 8x8 digits is 0.7 M parameters."""

    name = "tiny_unet"

    def build(self, info: DataInfo) -> BuiltModel:
        from diffusers import UNet2DModel

        if self.path is not None:
            return BuiltModel(self._load(UNet2DModel), noise_scheduler=self.scheduler(), source=self.path)
        c, size = self._shape(info)
        n = len(self.block_out_channels)
        down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if self.attention else "DownBlock2D"]
        up = ["AttnUpBlock2D" if self.attention else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
        model = UNet2DModel(
            sample_size=size,
            in_channels=c,
            out_channels=c,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            add_attention=self.attention,
        )
        return BuiltModel(model, noise_scheduler=self.scheduler())


@MODELS.register("tiny_unet_cond")
@dataclasses.dataclass(frozen=True)
class TinyUNetCond(_UNetConfig):
    """Class-conditional `UNet2DConditionModel`: the label enters as a one-hot token (cross_attention_dim =
    #classes)."""

    name = "tiny_unet_cond"

    def build(self, info: DataInfo) -> BuiltModel:
        from diffusers import UNet2DConditionModel

        if self.path is not None:
            return BuiltModel(self._load(UNet2DConditionModel), noise_scheduler=self.scheduler(), source=self.path)
        c, size = self._shape(info)
        if info.num_labels is None:
            raise UserError("model=tiny_unet_cond is class-conditional; the dataset needs a `label` column.")
        n = len(self.block_out_channels)
        attn = "CrossAttnDownBlock2D" if self.attention else "DownBlock2D"
        model = UNet2DConditionModel(
            sample_size=size,
            in_channels=c,
            out_channels=c,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            down_block_types=tuple(["DownBlock2D"] * (n - 1) + [attn]),
            up_block_types=tuple([attn.replace("Down", "Up")] + ["UpBlock2D"] * (n - 1)),
            mid_block_type="UNetMidBlock2DCrossAttn" if self.attention else None,
            cross_attention_dim=info.num_labels,
            attention_head_dim=8,
        )
        return BuiltModel(model, noise_scheduler=self.scheduler())
