"""Writing trees as safetensors, streaming one tensor at a time.

`save_tree` plans the shards and writes each file's header from the declared shapes and dtypes, then computes and
writes the tensors one at a time (`peft_lab.tree.safetensors.write_safetensors`), so peak memory is one tensor, not
one model. Structured leaves are written as their factors under `<name>.<factor>`, with their kind and meta in the
header metadata (`LEAVES_KEY`), and `load_safetensors` reads them back as the same leaves.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from peft_lab.errors import UserError
from peft_lab.tree.core import Tree
from peft_lab.tree.leaves import Dense, Lazy, Leaf
from peft_lab.tree.safetensors import FORMAT_KEY, LEAVES_KEY, TREE_FORMAT, Entry, nbytes, write_safetensors

__all__ = ["save_tree", "parse_size"]


def parse_size(size: int | str | None) -> int | None:
    """'5GB', '500MB', '2GiB' or an int of bytes -> bytes (None = no sharding)."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.I)
    if not m:
        raise UserError(f"max_shard_size: cannot read {size!r} (use e.g. '5GB' or '500MB').")
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


def _leaf_entries(name: str, leaf: Leaf, dtype: torch.dtype | None) -> tuple[list[Entry], dict[str, Any] | None]:
    """The file entries of one leaf (a structured leaf becomes its factors) and its metadata record."""
    if isinstance(leaf, (Dense, Lazy)) or leaf.kind == "thunk":
        out = dtype if (dtype is not None and leaf.dtype.is_floating_point) else leaf.dtype
        # a leaf with `chunks(dtype)` (e.g. a merged tensor computed slice by slice) is written as it streams
        chunks = getattr(leaf, "chunks", None)
        return [(name, out, leaf.shape, (lambda: chunks(out)) if chunks else (lambda: leaf.dense(out)))], None
    entries = []
    for fname, t in leaf.factors().items():
        out = dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype
        entries.append((f"{name}.{fname}", out, tuple(t.shape), lambda t=t, out=out: t.to(out)))
    return entries, {"kind": leaf.kind, "meta": leaf.meta()}


def save_tree(
    tree: Tree,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | str | None = None,
    stem: str = "model",
    on_tensor: Callable[[str, int], None] | None = None,
) -> list[Path]:
    """Write a tree as safetensors, streaming one tensor at a time.

    Args:
        path: a `*.safetensors` file, or a directory that receives `{stem}.safetensors` or, past
            `max_shard_size`, `{stem}-0000i-of-0000n.safetensors` shards plus `{stem}.safetensors.index.json`
            (the layout transformers and diffusers load).
        dtype: cast floating leaves to this dtype (default: each leaf's own dtype).
        metadata: string metadata for every file header (`format: pt` is always added).
        on_tensor: progress callback `(name, bytes_written)`.
    Returns:
        The files written.
    """
    entries: list[Entry] = []
    structured: dict[str, Any] = {}
    for name, leaf in tree.items():
        e, rec = _leaf_entries(name, leaf, dtype)
        entries.extend(e)
        if rec is not None:
            structured[name] = rec
    meta = {"format": "pt", **(metadata or {})}
    if structured:
        meta[FORMAT_KEY] = TREE_FORMAT
        meta[LEAVES_KEY] = json.dumps(structured, separators=(",", ":"))

    path = Path(path)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, entries, meta, on_tensor)
        return [path]

    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = nbytes(e[1], e[2])
        # structured factors of one leaf stay in one shard (they are read back together)
        if limit and shards[-1] and size + n > limit and not _same_leaf(shards[-1][-1][0], e[0], structured):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    if len(shards) == 1:
        f = path / f"{stem}.safetensors"
        write_safetensors(f, shards[0], meta, on_tensor)
        return [f]
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        f = path / f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard_meta = dict(meta)
        if structured:  # each shard records only its own structured leaves
            own = {n: r for n, r in structured.items() if any(_belongs(k, n) for k, *_ in shard)}
            shard_meta[LEAVES_KEY] = json.dumps(own, separators=(",", ":"))
        write_safetensors(f, shard, shard_meta, on_tensor)
        files.append(f)
        for key, dt, shape, _ in shard:
            weight_map[key] = f.name
            total += nbytes(dt, shape)
    index = {
        "metadata": {"total_size": total, **{k: v for k, v in meta.items() if k != LEAVES_KEY}},
        "weight_map": weight_map,
    }
    (path / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _belongs(key: str, name: str) -> bool:
    return key == name or key.startswith(name + ".")


def _same_leaf(prev_key: str, key: str, structured: Mapping[str, Any]) -> bool:
    return any(_belongs(prev_key, n) and _belongs(key, n) for n in structured)
