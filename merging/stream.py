"""The one pass driver: a merge method's statistic passes and `merge_chunk`, over one tensor, chunk by chunk.

Every place that merges a tensor goes through `drive`: the executor (files, `merging.sources`), in-memory merges
(`merging.sources.merge_trees`, which the benchmark and AdaMerging++ use), `MergeMethod.merge_tensor` (one
chunk), and the tests (any chunk size). `drive` only needs a `read(start, stop)` that returns fresh float32
chunks of the base and of every input; where they come from is the caller's business.

    passes:  i = 0, 1, ...  while method.next_pass(job, i) is SAMPLE or FULL:
                 SAMPLE: blocks of `block` elements, one in `every` (a representative 1/64 for quantiles)
                 FULL:   every chunk, in order
                 each chunk -> method.observe(job, i, start, base, chunks)
    merge:   each chunk, in order -> method.merge_chunk(job, start, base, chunks)   (yielded)

A tensor that fits in one chunk (`job.chunked` False) is read once: every pass and the merge see that one
chunk (so `observe` must not modify it; `merge_chunk` may).

It also holds the allocator setting that makes chunk-sized torch ops fast (`tuned_malloc`): glibc returns
every freed block above 32 MB (its mmap threshold) to the kernel, and the next allocation of that size
page-faults all of it in again; on the development machine that made a chain of chunk-sized ops 3.5x slower
(15 vs 4.4 ns per element for 8 elementwise ops on 4M-element chunks).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from merging.base import MergeMethod, TensorJob

__all__ = ["SAMPLE", "FULL", "Reader", "drive", "chunk_ranges", "sample_ranges", "tuned_malloc", "intra_op_threads"]

# statistic pass kinds (see MergeMethod.next_pass)
SAMPLE = "sample"  # a representative subset of each tensor's elements (blocks), enough to estimate quantiles
FULL = "full"  # every element, in order
MERGE = "merge"  # the merge pass (for `MergeMethod.raw_ok`)

SAMPLE_BLOCK = 1 << 16
SAMPLE_EVERY = 64

# read(start, stop) -> (base chunk or None, one chunk per input): fresh float32 tensors the method may modify
Reader = Callable[[int, int], "tuple[torch.Tensor | None, Sequence[torch.Tensor]]"]


def chunk_ranges(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for s in range(0, numel, chunk):
        yield s, min(s + chunk, numel)


def sample_ranges(
    numel: int, block: int = SAMPLE_BLOCK, every: int = SAMPLE_EVERY
) -> tuple[list[tuple[int, int]], float]:
    """Blocks of `block` elements, one in `every`: a representative 1/`every` of a tensor for quantile
    estimates (whole when small). Returns (ranges, fraction of the elements they cover)."""
    if numel <= block:
        return [(0, numel)], 1.0
    ranges = [(s, min(s + block, numel)) for s in range(0, numel, block * every)]
    return ranges, sum(e - s for s, e in ranges) / numel


def drive(
    method: MergeMethod,
    job: TensorJob,
    read: Reader,
    chunk_size: int,
    *,
    sample_block: int = SAMPLE_BLOCK,
    sample_every: int = SAMPLE_EVERY,
    raw_read: Reader | None = None,
) -> Iterator[torch.Tensor]:
    """Run `method`'s statistic passes over one tensor, then yield `merge_chunk`'s flat float32 results in order.

    Args:
        method: a streaming merge method.
        job: the tensor's job; `job.chunked` must say whether `job.numel > chunk_size` (the driver updates it when
            the method asks for row-aligned chunks, `MergeMethod.chunk_unit`).
        read: `read(start, stop)` -> fresh float32 chunks (base or None, one per input).
        chunk_size: elements per chunk.
        sample_block, sample_every: the SAMPLE pass's blocks (tests shrink them to exercise small tensors).
        raw_read: a reader that may return task vectors as undecoded `merging.fused.RawDelta`s, used for the FULL
            passes and the merge of a streamed tensor where the method accepts them (`MergeMethod.raw_ok`).
    """

    def reader(kind: str) -> Reader:
        raw = raw_read is not None and kind != SAMPLE and job.chunked and method.raw_ok(job, kind)
        return raw_read if raw else read

    numel = job.numel
    unit = method.chunk_unit(job)
    if unit > 1 and chunk_size < numel:  # whole rows per chunk (see MergeMethod.chunk_unit)
        chunk_size = max(unit, chunk_size // unit * unit)
        job.chunked = numel > chunk_size
    cached = None
    i = 0
    while (kind := method.next_pass(job, i)) is not None:
        if not job.chunked:
            cached = cached or read(0, numel)
            method.observe(job, i, 0, *cached)
        else:
            if kind == SAMPLE:
                ranges, job.sample_rate = sample_ranges(numel, sample_block, sample_every)
            else:
                ranges, job.sample_rate = chunk_ranges(numel, chunk_size), 1.0
            rd = reader(kind)
            for s, e in ranges:
                method.observe(job, i, s, *rd(s, e))
        i += 1
    rd = reader(MERGE)
    for s, e in chunk_ranges(numel, chunk_size):
        base, chunks = cached if cached is not None else rd(s, e)
        cached = None
        yield method.merge_chunk(job, s, base, chunks)


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """torch's intra-op thread count set to `n` while the block runs (None: unchanged), restored afterwards."""
    saved = torch.get_num_threads()
    if n is not None and n != saved:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@contextlib.contextmanager
def tuned_malloc():
    """Keep freed memory in glibc's heap (no mmap for large blocks, no trimming) while the block runs, then
    restore glibc's defaults and give the memory back. A no-op where glibc is not the allocator."""
    libc = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if libc is None:
        yield
        return
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    try:
        yield
    finally:
        if ok:
            libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            with contextlib.suppress(AttributeError):
                libc.malloc_trim(0)
