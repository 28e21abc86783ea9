"""`peft-lab bench {merge, kernels}`: dispatch to the benchmark that lives beside the code it measures."""

from __future__ import annotations

import importlib

from peft_lab.errors import UserError

__all__ = ["main"]

BENCHES = {
    "merge": "merging.bench.runner",  # the offline multi-task merging benchmark
    "kernels": "peft_lab.kernels.sparse.bench",  # sparse-delta linear: Triton vs reference vs naive vs SHiRA
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        raise UserError(f"usage: peft-lab bench {{{','.join(BENCHES)}}} [ARGS...]")
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)
