"""The parameters shared by `della` and `della_linear` (DELLA-Merging, arXiv 2406.11617)."""

from __future__ import annotations

from dataclasses import dataclass

from peft_lab.params import Checked, param


@dataclass(frozen=True)
class DellaParams(Checked):
    """λ (recipe key `lambda`), `normalize`, `rescale` (`l1`: restore each tensor's L1 norm, mergekit's
    `rescale: true`; `keep_rate`: divide each kept entry by its keep probability, the paper; `none`), `seed` (the
    seed every per-tensor mask derives from, with the tensor name and the model's position)."""

    lambda_: float = param(1.0, key="lambda")
    normalize: bool = True
    rescale: str = param("l1", choices=("l1", "keep_rate", "none"), aliases={True: "l1", False: "none"})
    seed: int = param(0, within="[0, inf)")


@dataclass(frozen=True)
class DellaLinearParams(DellaParams):
    """As `DellaParams`, without normalisation by default (mergekit's `della_linear`)."""

    normalize: bool = False
