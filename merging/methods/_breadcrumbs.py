"""The parameters shared by `breadcrumbs` and `breadcrumbs_ties` (Model Breadcrumbs, arXiv 2312.06795)."""

from __future__ import annotations

from dataclasses import dataclass

from merging.methods._sparsifiers import BREADCRUMB_SCOPES
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class BreadcrumbsParams(Checked):
    """λ (recipe key `lambda`), `normalize` (divide by the summed weights, of the agreeing models with the sign
    election), `rescale` (`none`, or `l1`: restore each tensor's L1 norm after the mask; mergekit's boolean
    `rescale: true` is `l1`), `scope` (`tensor`: mergekit's per-tensor ranks; `row`: the breadcrumbs code's
    per-row rule)."""

    lambda_: float = param(1.0, key="lambda")
    normalize: bool = False
    rescale: str = param("none", choices=("none", "l1"), aliases={True: "l1", False: "none"})
    scope: str = param("tensor", choices=BREADCRUMB_SCOPES)
