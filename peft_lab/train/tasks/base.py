"""A task tells the one training loop what a batch is, what to minimise and how to score the model.

The loop owns everything else (devices, precision, accumulation, order of examples, checkpoints). A task:
- `check_columns` of the dataset before anything is built, `prepare` a split once (tokenise, convert);
- `collate` a columnar batch (`dataset[indices]`) into tensors;
- `loss(model, batch)` -> scalar to minimise;
- `eval_sums(model, batch, seed)` -> additive statistics (sums, counts), so evaluation can be split over
  processes and summed; `finalize(sums)` -> metrics;
- optionally `extras(model, ...)` for what is not a sum over examples (diffusion sample grids).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from peft_lab.errors import UserError
from peft_lab.registry import Registry

__all__ = ["TASKS", "Task"]

TASKS: Registry[type[Task]] = Registry("task", package="peft_lab.train.tasks")


class Task(abc.ABC):
    """Subclasses set `name` (= module name = registry key = `model.task`), `columns`, `metric`."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    metric: ClassVar[str]  # the headline key of metrics.json (sweep summaries sort by it)
    higher_is_better: ClassVar[bool] = True

    def __init__(self, built, model_cfg, data_cfg):
        self.built = built
        self.model_cfg = model_cfg
        self.data_cfg = data_cfg

    @classmethod
    def check_columns(cls, dd, where: str) -> None:
        """UserError unless every split has the columns this task reads (runs before any model is built)."""
        if "train" not in dd or len(dd["train"]) == 0:
            raise UserError(f"{where}: the training split is empty.")
        for split, ds in dd.items():
            missing = [c for c in cls.columns if c not in ds.column_names]
            if missing:
                raise UserError(
                    f"{where}: the {split!r} split has no column(s) {', '.join(map(repr, missing))} (it has: "
                    f"{', '.join(ds.column_names)}), which model.task={cls.name} needs. With data=hf, name your "
                    "columns with data.text_column / data.label_column."
                )

    def check(self, dd) -> None:
        """Checks that need the built model (e.g. a conditional model needs labels); none by default."""
        return None

    @abc.abstractmethod
    def prepare(self, ds):
        """A split converted once for training (e.g. tokenised); indexable by a list of indices."""

    @abc.abstractmethod
    def collate(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        """Columns of a few examples -> model inputs (tensors, on CPU)."""

    @abc.abstractmethod
    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar to minimise, averaged over the batch."""

    @abc.abstractmethod
    def eval_sums(self, model, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """Additive statistics of one eval batch (summed over batches and processes by the loop)."""

    @abc.abstractmethod
    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics (without the split prefix) from the summed statistics."""

    def extras(self, model, device: torch.device, step: int) -> tuple[dict[str, float], Any]:
        """(metrics, image or None) computed on the main process at each evaluation; none by default."""
        return {}, None

    def describe(self) -> str:
        return self.name
