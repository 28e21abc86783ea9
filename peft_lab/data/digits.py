"""scikit-learn's 8x8 handwritten digits (1797 images, UCI "Optical Recognition of Handwritten Digits") and
transformed variants of them, all offline.

Transforms are input-space tasks in the sense of the model-merging literature (e.g. rotated/permuted MNIST in
https://arxiv.org/abs/1312.6211): the same labels under a fixed change of the pixels. A transform name is one of
TRANSFORMS, or several joined by `+` and applied left to right (`rot90+invert`). Class subsets (`classes: [0..4]`)
give the two halves used by the diffusion demo (pretrain on 0–4, adapt to 5–9).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from peft_lab.data.base import DATASETS, DataConfig, check_fractions, stratified_split
from peft_lab.errors import UserError
from peft_lab.params import param

__all__ = ["Digits", "TRANSFORMS", "apply_transform", "load_raw"]


def _permute(x: np.ndarray, seed: int) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(64)  # one fixed permutation of the 64 pixels per seed
    return x.reshape(len(x), 64)[:, perm].reshape(x.shape)


def _shift(x: np.ndarray, seed: int) -> np.ndarray:
    return np.roll(x, shift=(2, 2), axis=(1, 2))  # cyclic: no pixel is lost


# images (N, 8, 8) float in [0, 1], seed -> images of the same shape and range
TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "identity": lambda x, s: x,
    "rot90": lambda x, s: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x, s: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x, s: np.rot90(x, 3, axes=(1, 2)),
    "hflip": lambda x, s: x[:, :, ::-1],
    "vflip": lambda x, s: x[:, ::-1, :],
    "transpose": lambda x, s: x.transpose(0, 2, 1),
    "invert": lambda x, s: 1.0 - x,
    "permute": _permute,
    "shift": _shift,
}


def apply_transform(images: np.ndarray, transform: str, seed: int = 0) -> np.ndarray:
    """`images` (N, 8, 8) in [0, 1] under `transform` (names from TRANSFORMS joined by `+`)."""
    for part in transform.split("+"):
        if part not in TRANSFORMS:
            raise UserError(
                f"data.transform={transform!r}: unknown transform {part!r}. Available: {', '.join(TRANSFORMS)}."
            )
        images = TRANSFORMS[part](images, seed)
    return np.ascontiguousarray(images, dtype=np.float32)


@lru_cache(maxsize=1)
def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@DATASETS.register("digits")
@dataclasses.dataclass(frozen=True)
class Digits(DataConfig):
    """Digits -> `image` (8x8 float32 in [0, 1]) and `label` (ClassLabel "0".."9", or 0..k-1 with `relabel`).

    Attributes:
        classes: keep only these digits (null = all ten).
        relabel: number the kept classes 0..k-1 in the order given (for a k-way head); else keep the digit.
        transform: names from TRANSFORMS joined by `+` (e.g. `rot90+invert`).
        transform_seed: seeds random transforms (`permute`); independent of the split seed.
        validation_fraction, test_fraction: stratified, seeded shares of each class.
    """

    name = "digits"
    classes: list[int] | None = param(None, within="[0, 9]")
    relabel: bool = False
    transform: str = "identity"
    transform_seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fractions(validation_fraction=self.validation_fraction, test_fraction=self.test_fraction)
        if self.classes is not None:
            if not self.classes or len(set(self.classes)) != len(self.classes):
                raise UserError(f"data.classes={list(self.classes)}: give distinct digits in 0..9.")
        for part in self.transform.split("+"):
            if part not in TRANSFORMS:
                raise UserError(
                    f"data.transform={self.transform!r}: unknown transform {part!r}. "
                    f"Available: {', '.join(TRANSFORMS)}."
                )

    @property
    def label_names(self) -> list[str]:
        if self.relabel and self.classes is not None:
            return [str(c) for c in self.classes]
        return [str(c) for c in range(10)]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All kept (images (N, 8, 8), labels (N,)) after class selection and transform, before splitting."""
        images, labels = load_raw()
        if self.classes is not None:
            keep = np.isin(labels, np.asarray(self.classes))
            images, labels = images[keep], labels[keep]
            if self.relabel:
                lut = {c: i for i, c in enumerate(self.classes)}
                labels = np.asarray([lut[int(y)] for y in labels], dtype=np.int64)
        return apply_transform(images, self.transform, self.transform_seed), labels

    def splits(self):
        import datasets

        images, labels = self.arrays()
        features = datasets.Features(
            {"image": datasets.Array2D((8, 8), "float32"), "label": datasets.ClassLabel(names=self.label_names)}
        )
        fractions = {"validation": self.validation_fraction, "test": self.test_fraction}
        parts = stratified_split(labels, fractions, self.seed)
        dd = datasets.DatasetDict()
        for split in ("train", "validation", "test"):
            idx = parts[split]
            if len(idx):
                dd[split] = datasets.Dataset.from_dict({"image": images[idx], "label": labels[idx]}, features=features)
        return dd
