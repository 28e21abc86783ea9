"""Where a merge's chunks come from: the inputs as trees, read chunk by chunk in float32, fed to the pass driver.

`MergeStreams` holds the opened inputs of one merge (the base tree, each input's tree, whether it is a task
vector, its per-model parameters) and gives the method what it reads:

- `read(name, start, stop)`: float32 chunks of the base and of every input, as task vectors `θ_t − θ_0` for
  methods that take them (`uses_deltas`) and as full tensors otherwise; NaN/inf refused unless allowed;
- `scan(fn, kind)`: every float tensor streamed into `fn` (a whole-model statistic for `prepare`);
- `tensor_chunks(name, dtype)`: one output tensor, chunk by chunk, through `merging.stream.drive` (or the fused
  bfloat16 path of `merging.fused.raw` when it applies).

File-backed (`Lazy`) leaves are read with `os.preadv` into fresh buffers and converted to float32; nothing is
memory-mapped, so resident memory stays at a few chunks however large the model (a memory map adds every page
it touches to the process's RSS until it is unmapped). Other leaves — in-memory tensors, structured adapter
deltas (`LowRank`, `Kronecker`, `Sparse`, `LDU`) and thunks — are made dense once per tensor, in float32, and
sliced. `merge_trees` runs the same code on in-memory trees (no files): the benchmark and AdaMerging++ use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from merging.base import MergeInputs, MergeMethod, TensorJob
from merging.settings import Resolver
from merging.stream import FULL, SAMPLE, chunk_ranges, drive, intra_op_threads, sample_ranges
from peft_lab.errors import UserError
from peft_lab.tree import Lazy, Leaf, Tree, apply, delta
from peft_lab.tree.safetensors import TREE_KIND_KEY
from peft_lab.tree.safetensors import TensorReader as FileTable

__all__ = [
    "FileTable",
    "TensorSource",
    "Input",
    "MergeStreams",
    "in_memory",
    "merge_trees",
    "check_finite_chunk",
    "DEFAULT_CHUNK",
]

_FUSED_READ_MIN = 1 << 16  # smaller chunks take the torch path (and do not import numba for it)
DEFAULT_CHUNK = 1 << 22  # elements per streamed chunk (memory is a few chunks of float32 per input)


class TensorSource:
    """One input's view of one tensor: `read(start, stop)` gives a float32 slice of its flattened value.

    Args:
        leaf: the leaf (None: this input does not touch the tensor, i.e. a zero task vector).
        files: the merge's open files.
        label: the input's name for messages (its path).
    """

    def __init__(self, leaf: Leaf | None, files: FileTable, label: str):
        self.leaf, self.files, self.label = leaf, files, label
        self._dense: torch.Tensor | None = None

    @property
    def bf16_file(self) -> bool:
        """The tensor is read from a file that stores it in bfloat16 (the fused raw-bits paths apply)."""
        return isinstance(self.leaf, Lazy) and self.leaf.dtype == torch.bfloat16

    @property
    def where(self) -> str:
        return self.leaf.path if isinstance(self.leaf, Lazy) else self.label

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.leaf is None:
            return torch.zeros(stop - start)
        if isinstance(self.leaf, Lazy):
            return self.files.read(self.leaf, start, stop)
        if self._dense is None:  # small (adapter factors) or already in memory: densify once per tensor
            self._dense = self.leaf.dense(torch.float32).reshape(-1)
        return self._dense[start:stop].clone()


def check_finite_chunk(x: torch.Tensor, *, where: str, name: str, start: int) -> None:
    """Refuse NaN/inf in a float32 chunk. One `sum()` (0.14 ns/element here) decides: NaN and inf propagate
    through it; only when it is not finite are the entries looked at (a sum can also overflow)."""
    if math.isfinite(float(x.sum())):
        return
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    if not count:
        return
    first = int(torch.nonzero(bad)[0])
    value = float(x[first])
    raise UserError(
        f"{where}: tensor {name} contains {'NaN' if value != value else 'inf'} ({count} non-finite value(s) in "
        f"elements {start}..{start + x.numel() - 1}, the first at flat index {start + first}). A merge of it would "
        "be meaningless; fix or re-export that model, or pass allow_nonfinite=true to merge anyway."
    )


@dataclass
class Input:
    """One merge input: its path (or label), its tree, whether it is a task vector, its per-model parameters."""

    path: str
    tree: Tree
    is_delta: bool
    params: Any


class MergeStreams:
    """The opened inputs of one merge and the reads a method needs (module docstring).

    Args:
        method: the merge method.
        base: the base tree (None when the method takes none).
        inputs: the inputs, in recipe order.
        base_label: the base's name for messages.
        chunk_size: elements per chunk.
        allow_nonfinite: merge NaN/inf instead of refusing them.
        bar: `bar(total, desc, unit)` -> a progress-bar context (default: none).
        threads: torch intra-op threads while streaming (None: unchanged).
        resolver: each tensor's parameters when the recipe has gradients or filters (`merging.settings`);
            None, or a constant resolver: the method's `params` and each input's `params` for every tensor.
        positions: tensor name -> layer position t (`merging.architecture.layer_positions`), for the resolver.
        source_names: tensor name -> each input's own name for it, when the trees are keyed by output names
            (slices: `merging.plan`); per-model filters match those.
        files: the open-file table to read through (shared by the groups of a merge; default: a new one).
    """

    def __init__(
        self,
        method: MergeMethod,
        base: Tree | None,
        inputs: Sequence[Input],
        *,
        base_label: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        allow_nonfinite: bool = False,
        bar: Callable | None = None,
        threads: int | None = None,
        resolver: Resolver | None = None,
        positions: Mapping[str, float] | None = None,
        source_names: Mapping[str, Sequence[str]] | None = None,
        files: FileTable | None = None,
    ):
        self.method, self.base, self.inputs = method, base, list(inputs)
        self.base_label = base_label or (base.source if base is not None else None)
        self.chunk_size, self.allow_nonfinite, self.threads = chunk_size, allow_nonfinite, threads
        self.files = files if files is not None else FileTable()
        self.labels = [i.path for i in self.inputs]
        self.ref = base if base is not None else next(i.tree for i in self.inputs if not i.is_delta)
        self._bar = bar
        self.resolver = resolver if resolver is not None and not resolver.constant else None
        self.positions = positions or {}
        self.source_names = source_names or {}
        self._checked: tuple[str, set[tuple[int, int]]] = ("", set())  # chunks of one tensor found finite

    def close(self) -> None:
        self.files.close()

    def bar(self, total: int, desc: str, unit: str = "B"):
        return self._bar(total, desc, unit) if self._bar is not None else nullcontext(_NoBar())

    # ------------------------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------------------------
    def sources(self, name: str) -> tuple[TensorSource | None, list[TensorSource]]:
        base = TensorSource(self.base[name], self.files, self.base_label) if self.base is not None else None
        return base, [TensorSource(i.tree.get(name), self.files, i.path) for i in self.inputs]

    def read(self, name: str, base_src, srcs, start: int, stop: int, raw: bool = False):
        """float32 chunks [start, stop) of the base and of each input (task vectors if the method takes them).
        Each chunk is checked for NaN/inf on its first read only (a method's statistics passes and its merge pass
        read the same chunks of a tensor again). With `raw`, task vectors from bfloat16 files are returned
        undecoded (`merging.fused.RawDelta`) when every input is one."""
        check = not self.allow_nonfinite
        if check:
            if self._checked[0] != name:
                self._checked = (name, set())
            seen = self._checked[1]
            check = (start, stop) not in seen
            seen.add((start, stop))
        base = None
        if base_src is not None:
            base = base_src.read(start, stop)
            if check:
                check_finite_chunk(base, where=base_src.where, name=name, start=start)
        if raw and base is not None:
            raws = self._raw_deltas(srcs, base, start, stop, check)
            if raws is not None:
                return base, raws
        out = []
        for src, inp in zip(srcs, self.inputs, strict=True):
            if self.method.uses_deltas and not inp.is_delta and base is not None:
                x = self._bf16_delta(src, base, start, stop, check)
                if x is not None:  # decoded and subtracted in one fused pass; a NaN/inf falls through to the check
                    out.append(x)
                    continue
            x = src.read(start, stop)
            if check and src.leaf is not None:
                check_finite_chunk(x, where=src.where, name=name, start=start)
            if self.method.uses_deltas and not inp.is_delta:
                x.sub_(base)
            elif not self.method.uses_deltas and inp.is_delta:
                x.add_(base)
            out.append(x)
        return base, out

    def _raw_deltas(self, srcs, base: torch.Tensor, start: int, stop: int, check: bool):
        """Every input's task-vector chunk as raw bfloat16 bits (`merging.fused.RawDelta`), or None where that does
        not apply to all of them (see `_bf16_delta`) or a chunk holds a NaN/inf (the float path then names it)."""
        from merging import fused

        if not self.method.uses_deltas or any(
            inp.is_delta or not src.bf16_file for src, inp in zip(srcs, self.inputs, strict=True)
        ):  # decided before reading anything
            return None
        out = []
        for src in srcs:
            bits = self._bf16_bits(src, start, stop)
            if bits is None or (check and fused.nonfinite16(bits)):
                return None
            out.append(fused.RawDelta(bits, base))
        return out

    def _bf16_delta(self, src: TensorSource, base: torch.Tensor, start: int, stop: int, check: bool):
        """The task-vector chunk of a bfloat16 file's tensor in one fused pass over its raw bits (merging.fused
        .decode_sub), or None where that does not apply (not a bfloat16 file, numba unavailable, a small chunk) or
        the chunk holds a NaN/inf (the torch path then names it)."""
        from merging import fused

        bits = self._bf16_bits(src, start, stop)
        return None if bits is None else fused.decode_sub(bits, base, check=check)

    def _bf16_bits(self, src: TensorSource, start: int, stop: int) -> np.ndarray | None:
        """The raw bits of a bfloat16 file's chunk for the fused loops, or None where they do not apply (not such a
        file, numba unavailable, a chunk under `_FUSED_READ_MIN` elements)."""
        from merging import fused

        if stop - start < _FUSED_READ_MIN or not src.bf16_file or not fused.available():
            return None
        bits = np.empty(stop - start, dtype=np.uint16)
        self.files.read_into(src.leaf, start, stop, bits)
        return bits

    def job(self, name: str, **kw) -> TensorJob:
        leaf = self.ref[name]
        model_params = [i.params for i in self.inputs]
        if self.resolver is not None:  # per-layer gradients / per-tensor filters: this tensor's parameters
            t = self.positions.get(name, 0.0)
            kw.setdefault("params", self.resolver.shared(name, t))
            model_params = self.resolver.models(self.source_names.get(name, name), t)
        return TensorJob(
            name, tuple(leaf.shape), model_params, labels=self.labels, chunked=leaf.numel > self.chunk_size, **kw
        )

    def float_names(self) -> list[str]:
        return [n for n, leaf in self.ref.items() if leaf.dtype.is_floating_point]

    def checked(self, out: torch.Tensor, name: str, start: int) -> torch.Tensor:
        if not self.allow_nonfinite:
            check_finite_chunk(out, where=f"the {self.method.name} merge", name=name, start=start)
        return out

    # ------------------------------------------------------------------------------------------------
    # what prepare sees
    # ------------------------------------------------------------------------------------------------
    def scan(self, fn, kind: str = FULL, names: Sequence[str] | None = None) -> None:
        """Stream every float tensor (or those in `names`) into `fn(job, start, base, chunks)`: chunk by chunk, or
        1/64 samples for SAMPLE."""
        names = self.float_names() if names is None else list(names)
        bar_ = self.bar(len(names), f"{self.method.name} statistics ({kind} pass)", unit="tensor")
        with intra_op_threads(self.threads), bar_ as bar:
            for name in names:
                numel = self.ref[name].numel
                if kind == SAMPLE:
                    ranges, rate = sample_ranges(numel)
                else:
                    ranges, rate = list(chunk_ranges(numel, self.chunk_size)), 1.0
                job = self.job(name, sample_rate=rate)
                base_src, srcs = self.sources(name)
                for s, e in ranges:
                    base, chunks = self.read(name, base_src, srcs, s, e)
                    fn(job, s, base, chunks)
                bar.update(1)

    def merge_inputs(self, extra: Mapping[str, Any] | None = None) -> MergeInputs:
        """The `MergeInputs` for `method.prepare`: lazy trees and the streaming `scan`."""
        base = self.base
        return MergeInputs(
            base=base,
            models=[apply(base, i.tree) if i.is_delta else i.tree for i in self.inputs],
            deltas=[i.tree if i.is_delta else delta(i.tree, base) if base is not None else i.tree for i in self.inputs],
            model_params=[i.params for i in self.inputs],
            labels=self.labels,
            extra=dict(extra or {}),
            scan=self.scan,
        )

    # ------------------------------------------------------------------------------------------------
    # one output tensor
    # ------------------------------------------------------------------------------------------------
    def tensor_chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The merged tensor `name`, flat, chunk by chunk, cast to `dtype`."""
        numel = self.ref[name].numel
        base_src, srcs = self.sources(name)
        if self.method.uses_deltas and all(s.leaf is None for s in srcs):  # no input changes it: the base, cast
            for s, e in chunk_ranges(numel, self.chunk_size):
                x = base_src.read(s, e)
                if not self.allow_nonfinite:
                    check_finite_chunk(x, where=base_src.where, name=name, start=s)
                yield x.to(dtype)
            return
        job = self.job(name)
        if not self.method.streaming:  # a whole-tensor method: one read of the whole tensor
            base, ts = self.read(name, base_src, srcs, 0, numel)
            shape = job.shape
            out = self.method.merge_tensor(
                name, None if base is None else base.view(shape), [t.view(shape) for t in ts], job.model_params
            )
            yield self.checked(out.reshape(-1), name, 0).to(dtype)
            return
        from merging.fused import raw  # the bfloat16 raw-bits path; numba is imported by its first loop only

        plan = raw.plan(self, job, base_src, srcs, dtype)
        if plan is not None:
            yield from raw.chunks(self, job, base_src, srcs, dtype, plan)
            return
        start = 0
        for out in drive(
            self.method,
            job,
            lambda s, e: self.read(name, base_src, srcs, s, e),
            self.chunk_size,
            raw_read=lambda s, e: self.read(name, base_src, srcs, s, e, raw=True),
        ):
            yield self._output(out, name, start, dtype)
            start += out.numel()

    def _output(self, out: torch.Tensor, name: str, start: int, dtype: torch.dtype) -> torch.Tensor:
        """A merged float32 chunk checked and cast to the output dtype: one fused pass for a large bfloat16 chunk."""
        if dtype == torch.bfloat16 and out.numel() >= _FUSED_READ_MIN and out.dtype == torch.float32:
            from merging import fused

            if fused.available():
                x = fused.to_bf16(out, check=not self.allow_nonfinite)
                if x is not None:
                    return x
        return self.checked(out, name, start).to(dtype)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = False) -> None:
        pass


def _as_tree(x: Mapping[str, torch.Tensor] | Tree, label: str, is_delta: bool) -> Tree:
    if isinstance(x, Tree):
        return x
    return Tree(x, source=label, meta={TREE_KIND_KEY: "delta"} if is_delta else None)


def in_memory(
    method: MergeMethod,
    base: Mapping[str, torch.Tensor] | Tree | None,
    models: Sequence[Mapping[str, torch.Tensor] | Tree],
    model_params: Sequence[Any] | None = None,
    *,
    deltas: bool = False,
    names: Sequence[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> MergeStreams:
    """`MergeStreams` over in-memory trees (see `merge_trees` for the arguments); the caller closes it."""
    if model_params is None:
        model_params = [method.ModelParams() for _ in models]
    sub = (lambda m: {n: m[n] for n in names if n in m}) if names is not None else (lambda m: m)
    base_tree = None if base is None else _as_tree(sub(base), "base", False)
    inputs = [
        Input(f"model {i}", _as_tree(sub(m), f"model {i}", deltas), deltas, p)
        for i, (m, p) in enumerate(zip(models, model_params, strict=True))
    ]
    return MergeStreams(method, base_tree, inputs, base_label="base", chunk_size=chunk_size, allow_nonfinite=True)


def merge_trees(
    method: MergeMethod,
    base: Mapping[str, torch.Tensor] | Tree | None,
    models: Sequence[Mapping[str, torch.Tensor] | Tree],
    model_params: Sequence[Any] | None = None,
    *,
    deltas: bool = False,
    names: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, torch.Tensor]:
    """Merge in-memory models with the executor's code (prepare, statistic passes, chunks), no files.

    Args:
        method: the merge method (its `params` set).
        base: name -> tensor of the base model (None for methods without one).
        models: per input, name -> tensor: full models, or task vectors with `deltas=True`.
        model_params: per-model parameters (default: the method's defaults).
        deltas: the models are task vectors `θ_t − θ_0` (names missing from one count as zero).
        names: the tensors to merge (default: every float tensor of the base, else of the first model).
        extra: `MergeInputs.extra` for `prepare` (e.g. AdaMerging's `lambdas`).
    Returns:
        name -> merged float32 tensor (the full parameter, shaped as the base's).
    """
    streams = in_memory(method, base, models, model_params, deltas=deltas, names=names, chunk_size=chunk_size)
    try:
        method.prepare(streams.merge_inputs(extra))
        out = {}
        for n in streams.float_names():
            shape = streams.ref[n].shape
            out[n] = torch.cat(list(streams.tensor_chunks(n, torch.float32))).reshape(shape)
        return out
    finally:
        streams.close()
