"""The executor's fused path for bfloat16 files: linear, task arithmetic and slerp straight from the raw bits.

A method opts in through `MergeMethod.raw_spec`. When every input is a bfloat16 safetensors tensor (no adapters)
of at least `MIN_NUMEL` elements and the output is float32 or bfloat16, the executor reads raw uint16 chunks and
runs one numba pass per chunk (`merging.fused.raw_merge`, or `raw_dot3` + `raw_lerp` for slerp): no float32
copies of the inputs, no separate delta pass, the rounding to the output dtype inside the loop. Linear and task
arithmetic are bit-identical to `merge_chunk`; slerp sums its norms in float64 (float32 chunks on the torch
path), so the two agree to float32 rounding. On NaN/inf the chunk reruns on the torch path, so the error message
is the torch path's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from merging import fused
from merging.stream import chunk_ranges

if TYPE_CHECKING:
    from merging.base import TensorJob
    from merging.sources import MergeStreams, TensorSource

__all__ = ["plan", "chunks", "MIN_NUMEL", "WHOLE_NUMEL"]

MIN_NUMEL = 1 << 16  # smaller tensors take the torch path (and do not import numba for it)
WHOLE_NUMEL = 1 << 25  # slerp reads a tensor up to this size once (2 x 64 MB of bfloat16), larger twice


def _bf16_file(src: TensorSource | None) -> bool:
    return src is not None and src.bf16_file


def plan(streams: MergeStreams, job: TensorJob, base_src, srcs, dtype: torch.dtype) -> dict | None:
    """The method's `raw_spec` when the fused pass applies to this tensor (bfloat16 files, no adapters, a
    float32 or bfloat16 output, numba available), else None."""
    spec = streams.method.raw_spec(job)
    if spec is None or job.numel < MIN_NUMEL or dtype not in (torch.bfloat16, torch.float32):
        return None
    if not srcs or not all(_bf16_file(s) for s in srcs) or any(i.is_delta for i in streams.inputs):
        return None
    if base_src is not None and not _bf16_file(base_src):
        return None
    if spec["mode"] in ("task_arithmetic", "slerp") and base_src is None:
        return None
    if spec["mode"] != "slerp" and streams.method.next_pass(job, 0) is not None:
        return None
    return spec if fused.available() else None


def chunks(
    streams: MergeStreams, job: TensorJob, base_src, srcs, dtype: torch.dtype, spec: dict
) -> Iterator[torch.Tensor]:
    """The merged tensor, chunk by chunk, through the fused pass `spec` names."""
    if spec["mode"] == "slerp":
        yield from _slerp_chunks(streams, job, base_src, srcs[0], dtype, spec["t"])
        return
    check = not streams.allow_nonfinite
    files, size = streams.files, min(job.numel, streams.chunk_size)
    xs = np.empty((len(srcs), size), dtype=np.uint16)
    bb = np.empty(size if base_src is not None else 0, dtype=np.uint16)
    for s, e in chunk_ranges(job.numel, streams.chunk_size):
        n = e - s
        if base_src is not None:
            files.read_into(base_src.leaf, s, e, bb[:n])
        for t, src in enumerate(srcs):
            files.read_into(src.leaf, s, e, xs[t, :n])
        out = fused.raw_merge(
            xs[:, :n],
            bb[:n] if base_src is not None else None,
            spec["mode"],
            spec["weights"],
            normalize=spec["normalize"],
            lam=spec.get("lam", 1.0),
            out_dtype=dtype,
            check=check,
        )
        if out is None:  # NaN/inf in an input or the result: the torch path raises the error that names it
            base, ts = streams.read(job.name, base_src, srcs, s, e)
            out = streams.checked(streams.method.merge_chunk(job, s, base, ts), job.name, s).to(dtype)
        yield out


def _slerp_chunks(
    streams: MergeStreams, job: TensorJob, base_src, src, dtype: torch.dtype, t: float
) -> Iterator[torch.Tensor]:
    from merging.methods.slerp import slerp_coefficients

    check = not streams.allow_nonfinite
    files, n, chunk = streams.files, job.numel, streams.chunk_size
    whole = n <= max(chunk, WHOLE_NUMEL)
    size = n if whole else chunk
    x0, x1 = np.empty(size, dtype=np.uint16), np.empty(size, dtype=np.uint16)

    def load(s: int, e: int, again: bool):
        if whole:
            if not again:
                files.read_into(base_src.leaf, s, e, x0[s:e])
                files.read_into(src.leaf, s, e, x1[s:e])
            return x0[s:e], x1[s:e]
        files.read_into(base_src.leaf, s, e, x0[: e - s])
        files.read_into(src.leaf, s, e, x1[: e - s])
        return x0[: e - s], x1[: e - s]

    dot = n0 = n1 = 0.0
    for s, e in chunk_ranges(n, chunk):
        stats = fused.raw_dot3(*load(s, e, False), check=check)
        if stats is None:  # NaN/inf in an input: the torch path's reader names it
            streams.read(job.name, base_src, [src], s, e)
            raise RuntimeError(f"{job.name}: non-finite input not reported by the reader")
        dot, n0, n1 = dot + stats[0], n0 + stats[1], n1 + stats[2]
    c0, c1 = slerp_coefficients(t, dot, n0, n1)
    for s, e in chunk_ranges(n, chunk):
        a, b = load(s, e, True)
        out = fused.raw_lerp(a, b, c0, c1, out_dtype=dtype, check=check)
        if out is None:  # NaN/inf in the result: the same values in float32 for the error message
            f0, f1 = (torch.from_numpy(v.copy()).view(torch.bfloat16).float() for v in (a, b))
            streams.checked(f0.mul_(c0).add_(f1, alpha=c1), job.name, s)
            raise RuntimeError(f"{job.name}: non-finite result not reported by the check")
        yield out
