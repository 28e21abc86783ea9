"""What every dataset builder shares: the registry, the split contract and the caps used to shrink a run.

A builder is a frozen dataclass (its fields are the Hydra schema of `conf/data/<name>.yaml`) whose `build()`
returns a `datasets.DatasetDict` with the splits `train`, `validation` and (when the source has one) `test`,
using the column names the tasks expect (`text`/`label` for text, `image`/`label` for digits).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from peft_lab.errors import UserError
from peft_lab.params import Checked, build, param
from peft_lab.registry import Registry

__all__ = ["DATASETS", "DataConfig", "build_dataset", "stratified_split", "SPLITS"]

DATASETS: Registry[type[DataConfig]] = Registry("dataset", package="peft_lab.data")
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DataConfig(Checked):
    """Fields every dataset takes.

    Attributes:
        seed: seeds the split (and any random transform); the same seed gives the same split everywhere.
        max_train_samples: keep only the first N training examples (after the seeded shuffle), for quick runs.
        max_eval_samples: the same for `validation` and `test`.
    """

    name: ClassVar[str]
    seed: int = 0
    max_train_samples: int | None = param(None, within="[1, inf)", help="null for all")
    max_eval_samples: int | None = param(None, within="[1, inf)", help="null for all")

    def splits(self):
        """The full `DatasetDict` before caps (subclasses implement)."""
        raise NotImplementedError

    def build(self):
        """`datasets.DatasetDict` with `train`, `validation` and maybe `test`, capped by the max_* fields."""
        dd = self.splits()
        for split in list(dd):
            cap = self.max_train_samples if split == "train" else self.max_eval_samples
            if cap is not None and len(dd[split]) > cap:
                dd[split] = dd[split].select(range(cap))
        return dd


def build_dataset(name: str, **params: Any):
    """The registered dataset `name` built with `params` (unknown keys are a `UserError` listing the valid ones)."""
    return build(DATASETS.get(name), params, where=f"data={name}", prefix="data.").build()


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Index arrays per split, each class divided in the given proportions, shuffled with `seed`.

    Args:
        labels: (N,) int class of each example.
        fractions: split name -> fraction of the data (the remainder goes to "train").
        seed: the same seed gives the same split.
    Returns:
        split name -> sorted-by-shuffle (M,) int64 indices; the splits partition range(N).
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # per split, ceil(fraction * N) examples in all (as scikit-learn's train_test_split counts a test share),
    # divided among the classes by largest remainder so each class keeps its proportion
    quota: dict[str, np.ndarray] = {}
    for split, frac in fractions.items():
        exact = frac * counts
        q = np.floor(exact).astype(int)
        extra = int(np.ceil(frac * len(labels) - 1e-9)) - int(q.sum())
        q[np.argsort(-(exact - q), kind="stable")[:extra]] += 1
        quota[split] = q
    out: dict[str, list[np.ndarray]] = {"train": [], **{k: [] for k in fractions}}
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        start = 0
        for split in fractions:
            n = int(quota[split][ci])
            out[split].append(idx[start : start + n])
            start += n
        out["train"].append(idx[start:])
    # one more seeded shuffle so the classes are interleaved (the training sampler shuffles anyway,
    # but capped slices `max_*_samples` should hold every class)
    return {k: rng.permutation(np.concatenate(v)) for k, v in out.items()}


def check_fractions(**fractions: float) -> None:
    for k, v in fractions.items():
        if not 0 <= v < 1:
            raise UserError(f"data.{k}={v}: must be in [0, 1).")
    if sum(fractions.values()) >= 1:
        raise UserError(f"data: {' + '.join(fractions)} = {sum(fractions.values())} leaves nothing to train on.")
