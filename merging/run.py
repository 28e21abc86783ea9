"""`run_merge(recipe, out_dir)`: check -> prepare -> stream tensor by tensor into a temporary dir -> rename.

1. Validate the recipe (`merging.recipe`), open every input lazily (headers only) and check that they line
   up: same tensor names and shapes (every mismatch reported at once), adapters only touching base tensors.
2. Enter `atomic_output_dir`: everything is written into a temporary dir beside OUT_DIR that is renamed into
   place only when complete; an exception, Ctrl-C, SIGTERM or a full disk removes it.
3. Start hashing the input files in a background thread (sha256, overlapped with the merge).
4. `method.prepare(inputs)` (whole-model statistics; `inputs.scan` streams the model for it).
5. Stream: for each tensor, in the base model's order, read chunks of the base and of every input (float32,
   task vectors for methods that take them), run the method's statistic passes and `merge_chunk`, check the
   result is finite, cast to the output dtype and append it to the current shard. Non-float tensors (int
   buffers) are copied from the base unchanged. Peak memory is a few chunks, not a few models.
6. Write the method's `artifacts()` files if it has any, copy config/tokenizer files from the base, record
   the recipe with the input hashes in the safetensors headers (written with fixed-width placeholders,
   patched in place once the hashes are known) and in `merge_recipe.yaml`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from merging.base import FULL, SAMPLE, MergeInputs, TensorJob
from merging.recipe import DTYPE_NAMES, Recipe, load_recipe
from merging.stream import FileTable, TensorSource, check_finite_chunk, chunk_ranges, sample_ranges, tuned_malloc
from peft_lab.errors import UserError
from peft_lab.tree import (
    Lazy,
    Thunk,
    Tree,
    apply,
    atomic_output_dir,
    copy_files,
    delta,
    is_delta,
    load_tree,
    mismatches,
    model_weight_files,
    save_tree,
)
from peft_lab.tree.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLE_SUFFIXES

__all__ = ["run_merge", "RECIPE_KEY", "RECIPE_FILE", "COPIED_FILES"]

RECIPE_KEY = "peft_lab.merge_recipe"  # safetensors header metadata key holding the recipe (JSON)
RECIPE_FILE = "merge_recipe.yaml"
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)  # fmt: skip


def run_merge(recipe: str | os.PathLike | Mapping[str, Any] | Recipe, out_dir: str | os.PathLike, **options: Any) -> Path:
    """Merge as a recipe says and write an HF-loadable model dir to `out_dir` (what `peft-lab merge` does).

    Args:
        recipe: a mergekit-style dict, a path to a YAML file holding one, or a parsed `Recipe`.
        out_dir: the output dir; must not exist or be empty unless `overwrite=True`.
        **options: run options (`merging.recipe.Options`): overwrite, allow_pickle, allow_nonfinite, progress,
            max_shard_size, hash, chunk_size.
    Returns:
        The output dir.
    """
    return _Merge(load_recipe(recipe, **options)).run(Path(out_dir))


@dataclass
class _Input:
    path: str
    tree: Tree
    is_delta: bool
    params: Any


def input_files(path: str | os.PathLike) -> list[Path]:
    """The files whose content an input is: the file itself, a model dir's weights (+ index), an adapter's
    config and weights."""
    p = Path(path)
    if p.is_file():
        return [p]
    for cfg, weights in (("adapter_config.json", "adapter_model.safetensors"), (ADAPTER_CONFIG, ADAPTER_WEIGHTS)):
        if (p / cfg).exists():
            return [f for f in (p / cfg, p / weights) if f.exists()]
    try:
        files = model_weight_files(p)
    except UserError:  # a pickle-only dir, loaded because allow_pickle=true
        return sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    index = [f for f in p.glob("*.safetensors.index.json")]
    return index + files


class _Hasher(threading.Thread):
    """sha256 of every input file, in a background thread (hashlib releases the GIL on large buffers)."""

    CHUNK = 1 << 20  # read into one reused buffer that stays in cache (a fresh 8 MB bytes object per read cost page faults)

    def __init__(self, files: list[Path], kind: str):
        super().__init__(daemon=True, name="peft-lab-hash")
        self.files, self.kind = files, kind
        self.digests: dict[Path, str] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            buf = bytearray(self.CHUNK)
            view = memoryview(buf)
            for f in self.files:
                h = hashlib.sha256()
                with open(f, "rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        h.update(view[:n])
                self.digests[f] = f"sha256:{h.hexdigest()}"
        except BaseException as e:  # reported by the main thread
            self.error = e

    @staticmethod
    def placeholder(kind: str) -> str:
        return f"{kind}:" + "0" * 64


class _MergedLeaf(Thunk):
    """One output tensor, computed chunk by chunk when the writer asks for it."""

    def __init__(self, merge: _Merge, name: str, shape, dtype: torch.dtype):
        super().__init__(lambda: None, [], shape, dtype, name=name)
        self._merge = merge

    def chunks(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        return self._merge.tensor_chunks(self.name, dtype)

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        out = torch.cat(list(self.chunks(self.dtype))).reshape(self.shape)
        return out if dtype is None else out.to(dtype)


class _Merge:
    def __init__(self, recipe: Recipe):
        self.r = recipe
        self.method = recipe.method
        self.opts = recipe.options
        self.files = FileTable()

    # ------------------------------------------------------------------------------------------------
    # inputs
    # ------------------------------------------------------------------------------------------------
    def open_inputs(self) -> None:
        r, allow = self.r, self.opts.allow_pickle
        paths = ([r.base] if r.base else []) + [m.path for m in r.models]
        missing = list(dict.fromkeys(p for p in paths if not Path(p).exists()))
        if missing:
            raise UserError(f"No such file or directory: {', '.join(missing)}. Check the paths in the recipe.")
        self.base = load_tree(r.base, allow_pickle=allow) if r.base else None
        if self.base is not None and is_delta(self.base):
            raise UserError(f"base_model {r.base} is an adapter (a set of changes); base_model must be a full model.")
        self.inputs: list[_Input] = []
        for m in r.models:
            tree = load_tree(m.path, base=self.base, allow_pickle=allow)
            if is_delta(tree) and self.base is None:
                raise UserError(
                    f"{m.path} is an adapter (changes to a base model); give base_model, the model it was trained on."
                )
            self.inputs.append(_Input(m.path, tree, is_delta(tree), m.params))
        self.ref = self.base if self.base is not None else next(i.tree for i in self.inputs if not i.is_delta)
        self.labels = [i.path for i in self.inputs]

    def check(self) -> None:
        lines: list[str] = []
        for inp in self.inputs:
            if inp.tree is self.ref:
                continue
            lines += mismatches(self.ref, {inp.path: inp.tree}, allow_subset=inp.is_delta)
        if lines:
            shown = lines[:50] + ([f"... and {len(lines) - 50} more"] if len(lines) > 50 else [])
            raise UserError(
                f"The models do not line up with {self.ref.source} ({len(lines)} problem(s)); they must share the "
                "architecture (tensor names and shapes):\n  " + "\n  ".join(shown)
            )
        out = Path(self.out).resolve()
        for p in [self.r.base, *self.labels]:
            q = Path(p).resolve() if p is not None else None
            if q is not None and (out == q or out in q.parents):
                raise UserError(f"The output dir {out} would contain or replace the input {p}; choose another output dir.")

    def sources(self, name: str) -> tuple[TensorSource | None, list[TensorSource]]:
        base = TensorSource(self.base[name], self.files, self.r.base) if self.base is not None else None
        srcs = [TensorSource(i.tree.get(name), self.files, i.path) for i in self.inputs]
        return base, srcs

    def read(self, name: str, base_src, srcs, start: int, stop: int):
        """float32 chunks [start, stop) of the base and of each input (task vectors if the method takes them)."""
        check = not self.opts.allow_nonfinite
        base = None
        if base_src is not None:
            base = base_src.read(start, stop)
            if check:
                check_finite_chunk(base, where=base_src.where, name=name, start=start)
        out = []
        for src, inp in zip(srcs, self.inputs, strict=True):
            x = src.read(start, stop)
            if check and src.leaf is not None:
                check_finite_chunk(x, where=src.where, name=name, start=start)
            if self.method.uses_deltas and not inp.is_delta:
                x.sub_(base)
            elif not self.method.uses_deltas and inp.is_delta:
                x.add_(base)
            out.append(x)
        return base, out

    def job(self, name: str, **kw) -> TensorJob:
        leaf = self.ref[name]
        return TensorJob(
            name, tuple(leaf.shape), [i.params for i in self.inputs], labels=self.labels,
            chunked=leaf.numel > self.opts.chunk_size, **kw,
        )  # fmt: skip

    def float_names(self) -> list[str]:
        return [n for n, leaf in self.ref.items() if leaf.dtype.is_floating_point]

    # ------------------------------------------------------------------------------------------------
    # statistics for prepare
    # ------------------------------------------------------------------------------------------------
    def scan(self, fn, kind: str = FULL) -> None:
        """Stream every float tensor (chunks, or 1/64 samples for SAMPLE) into `fn(job, start, base, chunks)`."""
        names = self.float_names()
        with self.bar(len(names), f"{self.method.name} statistics ({kind} pass)", unit="tensor") as bar:
            for name in names:
                numel = self.ref[name].numel
                ranges, rate = sample_ranges(numel) if kind == SAMPLE else (list(chunk_ranges(numel, self.opts.chunk_size)), 1.0)
                job = self.job(name, sample_rate=rate)
                base_src, srcs = self.sources(name)
                for s, e in ranges:
                    base, chunks = self.read(name, base_src, srcs, s, e)
                    fn(job, s, base, chunks)
                bar.update(1)

    # ------------------------------------------------------------------------------------------------
    # one output tensor
    # ------------------------------------------------------------------------------------------------
    def tensor_chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        leaf = self.ref[name]
        numel, chunk = leaf.numel, self.opts.chunk_size
        base_src, srcs = self.sources(name)
        m = self.method
        untouched = all(s.leaf is None for s in srcs)
        if m.uses_deltas and untouched:  # no input changes it (adapters elsewhere): the base, cast
            for s, e in chunk_ranges(numel, chunk):
                x = base_src.read(s, e)
                if not self.opts.allow_nonfinite:
                    check_finite_chunk(x, where=base_src.where, name=name, start=s)
                yield x.to(dtype)
            return
        if not m.streaming:  # whole-tensor methods
            base, ts = self.read(name, base_src, srcs, 0, numel)
            shape = tuple(leaf.shape)
            out = m.merge_tensor(name, None if base is None else base.view(shape), [t.view(shape) for t in ts],
                                 [i.params for i in self.inputs])  # fmt: skip
            yield self.checked(out.reshape(-1), name, 0).to(dtype)
            return
        job = self.job(name)
        raw = self.raw_plan(job, base_src, srcs, dtype)
        if raw is not None:
            yield from self.raw_chunks(job, base_src, srcs, dtype, raw)
            return
        cached = None
        i = 0
        while (kind := m.next_pass(job, i)) is not None:
            if not job.chunked:
                cached = cached or self.read(name, base_src, srcs, 0, numel)
                m.observe(job, i, 0, *cached)
            else:
                ranges, job.sample_rate = sample_ranges(numel) if kind == SAMPLE else (chunk_ranges(numel, chunk), 1.0)
                for s, e in ranges:
                    m.observe(job, i, s, *self.read(name, base_src, srcs, s, e))
            i += 1
        for s, e in chunk_ranges(numel, chunk):
            base, ts = cached if cached is not None else self.read(name, base_src, srcs, s, e)
            cached = None
            out = m.merge_chunk(job, s, base, ts)
            yield self.checked(out, name, s).to(dtype)

    # linear / task arithmetic / slerp on bfloat16 files: fused passes over the raw bits (merging/fused.py)
    RAW_MIN_NUMEL = 1 << 16  # smaller tensors take the torch path (and do not import numba for it)

    def raw_plan(self, job: TensorJob, base_src, srcs, dtype: torch.dtype) -> dict | None:
        """The method's `raw_spec` when the fused pass applies to this tensor (bfloat16 files, no adapters, a
        float32 or bfloat16 output, numba available), else None."""
        spec = self.method.raw_spec(job)
        if spec is None or job.numel < self.RAW_MIN_NUMEL or dtype not in (torch.bfloat16, torch.float32):
            return None
        srcs_ok = all(isinstance(s.leaf, Lazy) and s.leaf.dtype == torch.bfloat16 for s in srcs)
        base_ok = base_src is None or (isinstance(base_src.leaf, Lazy) and base_src.leaf.dtype == torch.bfloat16)
        if not srcs_ok or not base_ok or any(i.is_delta for i in self.inputs) or len(srcs) == 0:
            return None
        if spec["mode"] in ("task_arithmetic", "slerp") and base_src is None:
            return None
        if spec["mode"] != "slerp" and self.method.next_pass(job, 0) is not None:
            return None
        from merging import fused  # numba is imported by its first loop only

        return spec if fused.available() else None

    def raw_chunks(self, job: TensorJob, base_src, srcs, dtype: torch.dtype, spec: dict) -> Iterator[torch.Tensor]:
        import numpy as np

        from merging import fused

        if spec["mode"] == "slerp":
            yield from self.raw_slerp_chunks(job, base_src, srcs[0], dtype, spec["t"])
            return
        check = not self.opts.allow_nonfinite
        chunk = min(job.numel, self.opts.chunk_size)
        xs = np.empty((len(srcs), chunk), dtype=np.uint16)
        bb = np.empty(chunk if base_src is not None else 0, dtype=np.uint16)
        for s, e in chunk_ranges(job.numel, self.opts.chunk_size):
            n = e - s
            if base_src is not None:
                self.files.read_into(base_src.leaf, s, e, bb[:n])
            for t, src in enumerate(srcs):
                self.files.read_into(src.leaf, s, e, xs[t, :n])
            out = fused.raw_merge(xs[:, :n], bb[:n] if base_src is not None else None, spec["mode"],
                                  spec["weights"], normalize=spec["normalize"], lam=spec.get("lam", 1.0),
                                  out_dtype=dtype, check=check)  # fmt: skip
            if out is None:  # NaN/inf in an input or the result: the torch path raises the error that names it
                base, ts = self.read(job.name, base_src, srcs, s, e)
                out = self.checked(self.method.merge_chunk(job, s, base, ts), job.name, s).to(dtype)
            yield out

    RAW_WHOLE_NUMEL = 1 << 25  # slerp reads a tensor up to this size once (2 x 64 MB of bfloat16), larger twice

    def raw_slerp_chunks(self, job: TensorJob, base_src, src, dtype: torch.dtype, t: float) -> Iterator[torch.Tensor]:
        import numpy as np

        from merging import fused
        from merging.methods.slerp import slerp_coefficients

        check = not self.opts.allow_nonfinite
        n, chunk = job.numel, self.opts.chunk_size
        whole = n <= max(chunk, self.RAW_WHOLE_NUMEL)
        size = n if whole else chunk
        x0, x1 = np.empty(size, dtype=np.uint16), np.empty(size, dtype=np.uint16)

        def load(s: int, e: int, again: bool):
            if whole:
                if not again:
                    self.files.read_into(base_src.leaf, s, e, x0[s:e])
                    self.files.read_into(src.leaf, s, e, x1[s:e])
                return x0[s:e], x1[s:e]
            self.files.read_into(base_src.leaf, s, e, x0[: e - s])
            self.files.read_into(src.leaf, s, e, x1[: e - s])
            return x0[: e - s], x1[: e - s]

        dot = n0 = n1 = 0.0
        for s, e in chunk_ranges(n, chunk):
            stats = fused.raw_dot3(*load(s, e, False), check=check)
            if stats is None:  # NaN/inf in an input: the torch path's reader names it
                self.read(job.name, base_src, [src], s, e)
                raise RuntimeError(f"{job.name}: non-finite input not reported by the reader")
            dot, n0, n1 = dot + stats[0], n0 + stats[1], n1 + stats[2]
        c0, c1 = slerp_coefficients(t, dot, n0, n1)
        for s, e in chunk_ranges(n, chunk):
            a, b = load(s, e, True)
            out = fused.raw_lerp(a, b, c0, c1, out_dtype=dtype, check=check)
            if out is None:  # NaN/inf in the result: the same values in float32 for the error message
                f0, f1 = (torch.from_numpy(v.copy()).view(torch.bfloat16).float() for v in (a, b))
                self.checked(f0.mul_(c0).add_(f1, alpha=c1), job.name, s)
                raise RuntimeError(f"{job.name}: non-finite result not reported by the check")
            yield out

    def checked(self, out: torch.Tensor, name: str, start: int) -> torch.Tensor:
        if not self.opts.allow_nonfinite:
            check_finite_chunk(out, where=f"the {self.method.name} merge", name=name, start=start)
        return out

    # ------------------------------------------------------------------------------------------------
    # the run
    # ------------------------------------------------------------------------------------------------
    def bar(self, total: int, desc: str, unit: str = "B"):
        from tqdm.auto import tqdm

        show = self.opts.progress if self.opts.progress is not None else sys.stderr.isatty()
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024, disable=not show,
                    file=sys.stderr, dynamic_ncols=True, mininterval=0.5)  # fmt: skip

    def record(self, digests: dict[Path, str] | None) -> dict[str, Any]:
        from peft_lab import __version__

        rec = self.r.to_dict()
        kind = self.opts.hash
        inputs = []
        for role, path in ([("base", self.r.base)] if self.r.base else []) + [("model", p) for p in self.labels]:
            entry: dict[str, Any] = {"model": path, "role": role}
            if role == "model":
                entry["kind"] = "delta" if self.inputs[self.labels.index(path)].is_delta else "model"
            if kind != "none":
                root = Path(path)
                entry["files"] = {
                    (f.name if root.is_dir() else str(f)): (digests[f] if digests else _Hasher.placeholder(kind))
                    for f in input_files(path)
                }
            inputs.append(entry)
        rec["inputs"] = inputs
        rec["hash"] = kind
        if self.opts.allow_nonfinite:
            rec["allow_nonfinite"] = True
        rec["tool"] = f"peft-lab {__version__}"
        return rec

    def run(self, out: Path) -> Path:
        self.out = out
        self.open_inputs()
        self.check()
        m = self.method
        names = list(self.ref)
        out_dtype = {n: (self.r.dtype or leaf.dtype) if leaf.dtype.is_floating_point else leaf.dtype for n, leaf in self.ref.items()}
        merged = Tree(
            {n: _MergedLeaf(self, n, self.ref[n].shape, out_dtype[n]) if self.ref[n].dtype.is_floating_point else self.ref[n] for n in names},
            source="merge",
        )
        total = sum(leaf.numel * out_dtype[n].itemsize for n, leaf in self.ref.items())
        all_files = list(dict.fromkeys(f for p in ([self.r.base] if self.r.base else []) + self.labels for f in input_files(p)))
        hasher = _Hasher(all_files, self.opts.hash) if self.opts.hash != "none" else None
        placeholder = json.dumps(self.record(None), separators=(",", ":"))
        config_src = self.config_source()
        stem = self.weight_stem(config_src)
        t0 = time.perf_counter()
        try:
            with tuned_malloc(), atomic_output_dir(out, overwrite=self.opts.overwrite) as tmp:
                if hasher is not None:
                    hasher.start()
                m.prepare(MergeInputs(
                    base=self.base,
                    models=[apply(self.base, i.tree) if i.is_delta else i.tree for i in self.inputs],
                    deltas=[i.tree if i.is_delta else delta(i.tree, self.base) if self.base is not None else i.tree for i in self.inputs],
                    model_params=[i.params for i in self.inputs],
                    labels=self.labels,
                    extra={} if self.r.data is None else {"data": self.r.data},
                    scan=self.scan,
                ))  # fmt: skip
                with self.bar(total, f"{m.name} -> {out.name}") as bar:
                    done = [0]

                    def progress(_key: str, nbytes: int) -> None:
                        done[0] += 1
                        bar.set_postfix_str(f"{done[0]}/{len(names)} tensors", refresh=False)
                        bar.update(nbytes)

                    written = save_tree(merged, tmp, metadata={RECIPE_KEY: placeholder}, max_shard_size=self.opts.max_shard_size,
                                        stem=stem, on_tensor=progress)  # fmt: skip
                # files a method writes beside the model (e.g. AdaMerging's learned coefficients)
                for fname, text in (getattr(m, "artifacts", lambda: {})() or {}).items():
                    (tmp / fname).write_text(text)
                if config_src is not None:
                    copied = copy_files(config_src, tmp, COPIED_FILES)
                    if "config.json" in copied and self.r.dtype is not None:
                        self.set_config_dtype(tmp / "config.json", DTYPE_NAMES[self.r.dtype])
                digests = None
                if hasher is not None:
                    hasher.join()
                    if hasher.error is not None:
                        raise UserError(f"Could not read an input file to hash it: {hasher.error}")
                    digests = hasher.digests
                final = json.dumps(self.record(digests), separators=(",", ":"))
                if final != placeholder:
                    _patch_metadata(written, tmp, placeholder, final)
                (tmp / RECIPE_FILE).write_text(
                    "# written by peft-lab merge; `peft-lab merge --config " + RECIPE_FILE + " --out DIR` re-runs it\n"
                    + yaml.safe_dump(self.record(digests), sort_keys=False)
                )
        finally:
            self.files.close()
        self.seconds = time.perf_counter() - t0
        return out

    def config_source(self) -> Path | None:
        """The dir config/tokenizer files come from: the base model's, else the first full model's."""
        for p in ([self.r.base] if self.r.base else []) + [i.path for i in self.inputs if not i.is_delta]:
            if Path(p).is_dir():
                return Path(p)
        return None

    @staticmethod
    def weight_stem(src: Path | None) -> str:
        if src is not None and any(src.glob("diffusion_pytorch_model*.safetensors")):
            return "diffusion_pytorch_model"
        return "model"

    @staticmethod
    def set_config_dtype(path: Path, name: str) -> None:
        cfg = json.loads(path.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg]
        if keys:
            for k in keys:
                cfg[k] = name
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _patch_metadata(files: list[Path], out_dir: Path, old: str, new: str) -> None:
    """Replace the recipe in each written safetensors header (same length: only hash digits differ) and in
    the shard index."""
    old_b, new_b = json.dumps(old)[1:-1].encode(), json.dumps(new)[1:-1].encode()
    if len(old_b) != len(new_b):
        raise RuntimeError("recipe metadata changed length while patching hashes")
    for f in files:
        with open(f, "r+b") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            head = fh.read(n)
            at = head.find(old_b)
            if at < 0:
                raise RuntimeError(f"{f}: recipe metadata not found in its header")
            fh.seek(8 + at)
            fh.write(new_b)
            fh.flush()
            os.fsync(fh.fileno())
    for index in out_dir.glob("*.safetensors.index.json"):
        idx = json.loads(index.read_text())
        if idx.get("metadata", {}).get(RECIPE_KEY) == old:
            idx["metadata"][RECIPE_KEY] = new
            index.write_text(json.dumps(idx, indent=2) + "\n")


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe recorded in a merged model's safetensors header (a file or a model dir)."""
    from peft_lab.tree import read_header

    p = Path(path)
    f = p if p.is_file() else model_weight_files(p)[0]
    _, meta = read_header(f)
    if RECIPE_KEY not in meta:
        raise UserError(f"{f}: no peft-lab merge recipe in its metadata.")
    return json.loads(meta[RECIPE_KEY])

