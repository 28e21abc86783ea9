"""Diffusion denoising (DDPM, https://arxiv.org/abs/2006.11239): train a UNet to predict the noise added to an image.

    x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε,   t ~ U{0..T−1},   loss = ‖ε_θ(x_t, t[, class]) − ε‖²

Evaluation: the same loss on the eval split with noise and timesteps fixed by a seed (comparable across runs), and
at each evaluation a grid of samples drawn with the DDPM sampler. On digits the samples are also read by a
logistic-regression digit classifier (fitted on all ten digits under the data's transform): `sample_score` is the
share of samples read as one of the data's classes (conditional models: as the class they were asked for).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from peft_lab.train.tasks.base import TASKS, Task

__all__ = ["Diffusion", "image_grid"]


def image_grid(images: torch.Tensor, ncol: int = 8, scale: int = 4):
    """(N, C, H, W) in [0, 1] -> a PIL image of the tiles (nearest-neighbour upscaled), 1px gaps."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    canvas = torch.ones(c, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = images[i]
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


@TASKS.register("diffusion")
class Diffusion(Task):
    name = "diffusion"
    columns = ("image",)
    metric = "eval_loss"
    higher_is_better = False

    def __init__(self, built, model_cfg, data_cfg):
        super().__init__(built, model_cfg, data_cfg)
        self.scheduler = built.noise_scheduler
        self.conditional = getattr(built.model.config, "cross_attention_dim", None) is not None
        self.num_classes = built.model.config.cross_attention_dim if self.conditional else None
        self._reader = None

    def check(self, dd) -> None:
        if self.conditional and "label" not in dd["train"].column_names:
            from peft_lab.errors import UserError

            raise UserError(f"model={self.model_cfg.name} is class-conditional; the dataset needs a `label` column.")

    def prepare(self, ds):
        return ds.with_format("numpy")

    def collate(self, batch):
        x0 = torch.as_tensor(np.asarray(batch["image"], dtype=np.float32))  # (B, H, W) in [0, 1]
        if x0.ndim == 3:
            x0 = x0[:, None]  # (B, 1, H, W)
        out = {"x0": x0 * 2 - 1}  # the DDPM convention: data in [-1, 1]
        if "label" in batch:
            out["labels"] = torch.as_tensor(np.asarray(batch["label"]), dtype=torch.long)
        return out

    def _cond(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.conditional:
            return {}
        return {"encoder_hidden_states": F.one_hot(labels, self.num_classes).float()[:, None, :]}  # (B, 1, K)

    def _denoise_loss(self, model, batch, generator=None, reduction="mean"):
        x0 = batch["x0"]
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(x0),), generator=generator, device="cpu").to(x0.device)
        xt = self.scheduler.add_noise(x0, noise, t)
        pred = model(xt, t, **self._cond(batch.get("labels"))).sample
        err = F.mse_loss(pred.float(), noise, reduction="none").flatten(1).mean(1)  # (B,)
        return err.mean() if reduction == "mean" else err.sum()

    def loss(self, model, batch):
        return self._denoise_loss(model, batch)  # noise from the global RNG: the loop seeds and checkpoints it

    def eval_sums(self, model, batch, seed):
        g = torch.Generator().manual_seed(seed)
        return {"loss": self._denoise_loss(model, batch, g, reduction="sum"), "count": torch.tensor(len(batch["x0"]))}

    def finalize(self, sums):
        return {"loss": sums["loss"] / max(sums["count"], 1)}

    # --- samples ---
    def _digit_reader(self):
        """A logistic regression on all ten digits under the data's transform, or None for other data."""
        if self._reader is None and getattr(self.data_cfg, "name", None) == "digits":
            import dataclasses

            from sklearn.linear_model import LogisticRegression
            from threadpoolctl import threadpool_limits

            allten = dataclasses.replace(self.data_cfg, classes=None, relabel=False)
            x, y = allten.arrays()
            with threadpool_limits(1):  # 0.07 CPU-s; a multi-threaded BLAS spun for 6 CPU-s on a busy 2-core box
                self._reader = LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1), y)
        return self._reader

    @torch.no_grad()
    def sample(
        self, model, n: int, steps: int, device, seed: int = 0, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`n` images (n, C, H, W) in [0, 1] by ancestral DDPM sampling in `steps` steps, seeded."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(steps)
        cfg = self.built.model.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g).to(device)
        cond = self._cond(labels.to(device)) if labels is not None else {}
        for t in sched.timesteps:
            eps = model(x, t.to(device).expand(n), **cond).sample
            x = sched.step(eps, t, x, generator=g).prev_sample
        return ((x.float().cpu() + 1) / 2).clamp(0, 1)

    def extras(self, model, device, step) -> tuple[dict[str, float], Any]:
        n, steps = self.model_cfg.num_samples, self.model_cfg.sample_steps
        if n <= 0:
            return {}, None
        classes = getattr(self.data_cfg, "classes", None)
        labels = None
        if self.conditional:
            pool = list(classes) if classes is not None else list(range(self.num_classes))
            labels = torch.as_tensor([pool[i % len(pool)] for i in range(n)])
        imgs = self.sample(model, n, steps, device, seed=self.model_cfg.sample_seed, labels=labels)
        metrics = {}
        reader = self._digit_reader()
        if reader is not None and imgs.shape[1:] == (1, 8, 8):
            pred = reader.predict(imgs.reshape(n, -1).numpy())
            if labels is not None:
                metrics["sample_score"] = float((pred == labels.numpy()).mean())
            elif classes is not None:
                metrics["sample_score"] = float(np.isin(pred, np.asarray(classes)).mean())
        return metrics, image_grid(imgs)
