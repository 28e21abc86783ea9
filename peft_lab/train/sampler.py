"""The order of training examples as a pure function of (seed, position): resuming needs no sampler state.

Epoch e is the permutation `randperm(N, seed + e)`. It is cut into global batches of `batch_size x world`
examples (the incomplete tail is dropped, so every process sees full batches); process r takes slice r of each.
Micro-batch m (counted from the start of training, over all epochs) is therefore fixed, and a run resumed at
optimizer step k with g accumulation micro-steps continues at micro-batch k x g with the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from peft_lab.errors import UserError

__all__ = ["ResumableBatches", "Columnar", "eval_batches"]


class ResumableBatches(torch.utils.data.Sampler[list[int]]):
    """Endless batches of indices (a DataLoader `batch_sampler`) starting at micro-batch `start`.

    Args:
        n: number of examples.
        batch_size: examples per process per micro-batch.
        seed: base seed of the epoch permutations.
        rank, world: this process and the number of processes.
        start: index of the first micro-batch to yield.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.b, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise UserError(
                f"the training split has {n} examples, fewer than one batch (trainer.batch_size={batch_size} x "
                f"{world} process(es)); lower trainer.batch_size or use more data."
            )

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        epoch, order = -1, None
        while True:
            e, i = divmod(m, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            lo = (i * self.world + self.rank) * self.b
            yield order[lo : lo + self.b].tolist()
            m += 1


class Columnar(torch.utils.data.Dataset):
    """A `datasets.Dataset` fetched a batch at a time (`ds[indices]`, columnar) instead of row by row: the
    DataLoader calls `__getitems__` and hands the column dict to the task's `collate`."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]

    def __getitems__(self, indices: list[int]):
        return self.ds[list(indices)]


def eval_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This process's share of an evaluation split: every example exactly once over all processes, in order."""
    mine = list(range(rank, n, world))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
