"""A tiny Stable Diffusion pipeline built from configs (nothing downloaded): the tiny UNet of
tests/helpers/adapters.py, a one-block VAE and a one-layer CLIP text encoder; no tokenizer (LoRA loading does not
need one)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.adapters import tiny_unet


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=16,
    )
    return CLIPTextModel(cfg)


def tiny_pipeline(unet=None, text_encoder=None):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder if text_encoder is not None else tiny_text_encoder(),
        tokenizer=None,
        unet=unet if unet is not None else tiny_unet(),
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def fused_deltas(pipe, lora_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """What diffusers' `load_lora_weights` + `fuse_lora` change: {component: {weight name: fused − original}}."""
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in parts.items()}
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    out = {}
    for c, m in parts.items():
        after = m.state_dict()
        out[c] = {k: after[k] - v for k, v in before[c].items() if not torch.equal(after[k], v)}
    return out
