"""Reading and writing trees.

Reading is lazy: a safetensors file, an HF model dir (sharded through its index or not) or a diffusers
model dir becomes a tree of `Lazy` leaves after reading only the JSON headers; a PEFT adapter dir becomes a
tree of structured deltas (`LowRank`, `Kronecker`) keyed by the base model's parameter names.

Writing streams: `save_tree` plans the shards and writes each safetensors header from the declared shapes and
dtypes, then computes and writes tensors one at a time, so peak memory is one tensor, not one model
(`safetensors.torch.save_file` needs the whole dict in memory). Structured leaves are written as their
factors under `<name>.<factor>` with their kind in the header metadata (`peft_lab.leaves`), and read back
as the same leaves.

Pickle files (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused unless `allow_pickle=True`: loading them can run
arbitrary code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import queue
import re
import secrets
import shutil
import signal
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from peft_lab.errors import UserError
from peft_lab.tree.core import Tree
from peft_lab.tree.leaves import Dense, Kronecker, Lazy, Leaf, LowRank

__all__ = [
    "load_tree",
    "load_safetensors",
    "load_model_dir",
    "load_peft_dir",
    "read_header",
    "read_tensor",
    "save_tree",
    "write_safetensors",
    "atomic_output_dir",
    "model_weight_files",
    "parse_size",
    "is_delta",
    "FORMAT_KEY",
    "TREE_KIND_KEY",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LEAVES_KEY",
]

FORMAT_KEY = "peft_lab.format"
LEAVES_KEY = "peft_lab.leaves"
# "delta" marks a tree of changes to a base model (task vector, adapter delta); anything else is a full model
TREE_KIND_KEY = "peft_lab.tree_kind"
# peft-lab's own adapter dirs (adapters PEFT does not implement): this JSON + a delta tree in ADAPTER_WEIGHTS
ADAPTER_CONFIG = "peft_lab_adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
TREE_FORMAT = "tree/1"

ST_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# weight file stems written by transformers and diffusers
WEIGHT_STEMS = ("model", "diffusion_pytorch_model", "adapter_model")


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
def read_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse a safetensors header without touching the data: ({name: {dtype, shape, data_offsets}}, metadata).

    Checks what can be checked cheaply, so a truncated or corrupt file is caught before any work starts:
    header length, JSON, offsets inside the file, dtypes known.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (only {size} bytes). Re-save or re-download it.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise UserError(
                f"{path}: corrupt or truncated safetensors file (header of {n} bytes in a {size}-byte file). "
                "Re-save or re-download it."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt safetensors header ({e}). Re-save or re-download it.") from None
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    end_max = 0
    for name, info in header.items():
        try:
            b, e = info["data_offsets"]
            dtype = ST_TO_TORCH[info["dtype"]]
            numel = math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors entry for tensor {name!r}: {info}.") from None
        if e - b != numel * torch.empty((), dtype=dtype).element_size() or b < 0:
            raise UserError(f"{path}: corrupt safetensors entry for tensor {name!r} (offsets {b}..{e}).")
        end_max = max(end_max, e)
    if end_max > data_size:
        raise UserError(
            f"{path}: truncated safetensors file: its header describes {end_max} bytes of data but only "
            f"{data_size} are present. Re-save or re-download it."
        )
    return header, {str(k): str(v) for k, v in meta.items()}


class _Handles:
    """A small LRU cache of open (memory-mapped) safetensors files, so streaming reads reuse handles."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._open: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str):
        from safetensors import safe_open

        # keyed by the file's identity too: a file replaced at the same path (a re-run writing its output
        # again) must not be read through the old file's memory map
        try:
            st = os.stat(path)
        except OSError as e:
            raise UserError(f"{path}: cannot open ({e.strerror}).") from None
        key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            h = self._open.get(key)
            if h is not None:
                self._open.move_to_end(key)
                return h
            try:
                h = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error type for corrupt files
                raise UserError(f"{path}: cannot open as safetensors ({e}).") from None
            self._open[key] = h
            while len(self._open) > self.capacity:
                self._open.popitem(last=False)
            return h

    def forget(self, path: str | None = None) -> None:
        with self._lock:
            if path is None:
                self._open.clear()
            else:
                for key in [k for k in self._open if k[0] == path]:
                    del self._open[key]


_HANDLES = _Handles()


def read_tensor(path: str, key: str) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return _HANDLES.get(path).get_tensor(key)
    except (OSError, ValueError, SafetensorError) as e:  # a bad file; MemoryError and Ctrl-C propagate
        raise UserError(f"{path}: cannot read tensor {key!r} ({e}).") from None


def load_safetensors(path: str | os.PathLike) -> Tree:
    """A safetensors file as a tree: plain tensors become `Lazy` leaves; files written by `save_tree` with
    structured leaves get those leaves back (their small factors are read eagerly)."""
    path = str(path)
    header, meta = read_header(path)
    specs = {k: (ST_TO_TORCH[v["dtype"]], v["shape"]) for k, v in header.items()}
    structured: dict[str, dict[str, Any]] = json.loads(meta.get(LEAVES_KEY, "{}"))
    # keep the writer's order: the header is a JSON object, whose order python's json preserves
    leaves: dict[str, Leaf] = {}
    claimed: set[str] = set()
    for name, info in structured.items():
        keys = [k for k in specs if k == name or k.startswith(name + ".")]
        factors = {k[len(name) + 1 :] if k != name else "": read_tensor(path, k) for k in keys}
        try:
            leaves[name] = Leaf.from_factors(info["kind"], factors, info.get("meta", {}))
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path}: structured tensor {name!r} is malformed ({e}).") from None
        claimed.update(keys)
    ordered: dict[str, Leaf] = {}
    for k, (dtype, shape) in specs.items():
        if k in claimed:
            owner = next(n for n in structured if k == n or k.startswith(n + "."))
            if owner not in ordered:
                ordered[owner] = leaves[owner]
        else:
            ordered[k] = Lazy(path, k, dtype, shape)
    return Tree(ordered, source=path, meta=meta)


def model_weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files holding an HF/diffusers model dir's weights (through the index when sharded).
    Refuses dirs that only have pickle weights, saying how to convert them."""
    d = Path(model_dir)
    for stem in WEIGHT_STEMS:
        index = d / f"{stem}.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e}).") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (d / f).exists()]
            if missing:
                raise UserError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}.")
            return [d / f for f in files]
        single = d / f"{stem}.safetensors"
        if single.exists():
            return [single]
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES) if d.is_dir() else []
    if pickles:
        raise UserError(_pickle_message(d / pickles[0]))
    raise UserError(
        f"{d}: no model weights found (expected model.safetensors, diffusion_pytorch_model.safetensors, "
        "or a *.safetensors.index.json with shards)."
    )


def load_model_dir(model_dir: str | os.PathLike) -> Tree:
    """An HF transformers/diffusers model dir (sharded or not) as one lazy tree, in index order."""
    files = model_weight_files(model_dir)
    leaves: dict[str, Leaf] = {}
    meta: dict[str, str] = {}
    for f in files:
        t = load_safetensors(f)
        meta = meta or t.meta
        for k, leaf in t.items():
            if k in leaves:
                raise UserError(f"{model_dir}: tensor {k!r} appears in two shards ({leaves[k]} and {f}).")
            leaves[k] = leaf
    return Tree(leaves, source=str(model_dir), meta=meta)


def _pickle_message(path: Path) -> str:
    return (
        f"{path} is a pickle file; loading it can execute arbitrary code, so peft-lab refuses it. Convert it to "
        "safetensors once, from a source you trust: `python -c \"import torch, safetensors.torch as st; "
        f"st.save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\"` "
        "(for a transformers model: `AutoModel.from_pretrained(dir).save_pretrained(dir, "
        "safe_serialization=True)`), or pass allow_pickle=true to load it anyway."
    )


def _load_pickle(path: Path) -> Tree:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: cannot load even with allow_pickle ({e}).") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a state dict, found {type(sd).__name__}.")
    return Tree({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, source=str(path))


def load_tree(path: str | os.PathLike, *, base: Tree | None = None, allow_pickle: bool = False) -> Tree:
    """Open any supported input as a tree: a `.safetensors` file, an HF/diffusers model dir, or a PEFT
    adapter dir (as a delta tree on `base`, whose names it resolves against)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory.")
    if p.is_file():
        if p.suffix == ".safetensors":
            return load_safetensors(p)
        if p.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise UserError(_pickle_message(p))
            return _load_pickle(p)
        raise UserError(f"{p}: unsupported file type (expected .safetensors, an HF model dir or a PEFT adapter dir).")
    if (p / "adapter_config.json").exists():
        return load_peft_dir(p, base=base, allow_pickle=allow_pickle)
    if (p / ADAPTER_CONFIG).exists():
        return load_own_adapter_dir(p, base=base)
    if allow_pickle:
        try:
            return load_model_dir(p)
        except UserError:
            bins = sorted(x for x in p.iterdir() if x.suffix in PICKLE_SUFFIXES)
            if not bins:
                raise
            trees = [_load_pickle(b) for b in bins]
            return Tree([kv for t in trees for kv in t.items()], source=str(p))
    return load_model_dir(p)


def is_delta(tree: Tree) -> bool:
    """True for trees of changes to a base (PEFT/peft-lab adapter dirs, files saved with tree_kind=delta)."""
    return tree.meta.get(TREE_KIND_KEY) == "delta"


def load_own_adapter_dir(adapter_dir: str | os.PathLike, *, base: Tree | None = None) -> Tree:
    """A peft-lab adapter dir (`peft_lab_adapter.json` + `adapter.safetensors` holding its delta tree with
    structured leaves) as a delta tree; names are resolved against `base` when given."""
    d = Path(adapter_dir)
    weights = d / ADAPTER_WEIGHTS
    if not weights.exists():
        raise UserError(f"{d}: {ADAPTER_CONFIG} is present but {ADAPTER_WEIGHTS} is missing.")
    raw = load_safetensors(weights)
    names = set(base) if base is not None else None
    leaves = {_resolve(k, names, str(d)): leaf for k, leaf in raw.items()}
    if base is not None:
        bad = [f"{k} {tuple(v.shape)} vs base {tuple(base[k].shape)}" for k, v in leaves.items() if tuple(v.shape) != tuple(base[k].shape)]
        if bad:
            raise UserError(f"{d}: the adapter's deltas do not fit the base model: {'; '.join(bad[:10])}.")
    return Tree(leaves, source=str(d), meta={**raw.meta, TREE_KIND_KEY: "delta"})


# ---------------------------------------------------------------------------------------------------------
# PEFT adapter dirs -> delta trees
# ---------------------------------------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."
_LORA_RX = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?\.(?P<p>weight|bias)$")
_LORA_EMB_RX = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(\.[^.]+)?$")
_LOKR_RX = re.compile(r"^(?P<mod>.+)\.(?P<part>lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2)(\.[^.]+)?$")


def _pattern_value(module: str, patterns: Mapping[str, Any], default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name as a dotted-suffix regex."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _resolve(name: str, base_names: set[str] | None, where: str) -> str:
    """Map a parameter name from a PEFT file onto the base model's names (prefixes may differ:
    `bert.encoder...` in a task model vs `encoder...` in a bare `BertModel`)."""
    if base_names is None or name in base_names:
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[i:]) in base_names:
            return ".".join(parts[i:])
    hits = [b for b in base_names if b.endswith("." + name)]
    if len(hits) == 1:
        return hits[0]
    raise UserError(
        f"{where}: the adapter modifies {name!r}, which the base model does not have"
        + (f" (several candidates: {', '.join(sorted(hits)[:5])})" if hits else "")
        + ". Is this adapter for this base model?"
    )


def load_peft_dir(adapter_dir: str | os.PathLike, *, base: Tree | None = None, allow_pickle: bool = False) -> Tree:
    """A PEFT LoRA or LoKr adapter dir as a delta tree keyed by base parameter names.

    LoRA -> `LowRank(B, A, alpha/r)` (rsLoRA: alpha/sqrt(r); rank_pattern/alpha_pattern honoured; embedding
    and fan_in_fan_out layouts transposed into the weight's layout); LoKr -> `Kronecker(w1, w2, alpha/r)`
    (low-rank factors multiplied out: they are small). Fully trained modules (`modules_to_save`) become the
    delta `saved − base`, which needs `base`.
    """
    d = Path(adapter_dir)
    try:
        cfg = json.loads((d / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{d / 'adapter_config.json'}: invalid JSON ({e}).") from None
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "LOKR"):
        raise UserError(f"{d}: PEFT adapter type {kind!r} is not supported as a delta tree (LORA and LOKR are).")
    if cfg.get("use_dora"):
        raise UserError(f"{d}: DoRA adapters are not plain deltas (their magnitude depends on the base); merge them with PEFT first.")
    weights = d / "adapter_model.safetensors"
    if not weights.exists():
        b = d / "adapter_model.bin"
        if b.exists() and not allow_pickle:
            raise UserError(_pickle_message(b))
        if not b.exists():
            raise UserError(f"{d}: no adapter_model.safetensors.")
        raw = _load_pickle(b)
    else:
        raw = load_safetensors(weights)
    base_names = set(base) if base is not None else None
    where = str(d)

    def name_of(key: str) -> str:
        return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key

    groups: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, Leaf] = {}
    for key in raw:
        k = name_of(key)
        m = (_LORA_RX.match(k) or _LORA_EMB_RX.match(k)) if kind == "LORA" else _LOKR_RX.match(k)
        if m:
            part = m.group("part") + ("_bias" if m.groupdict().get("p") == "bias" else "")
            groups.setdefault(m.group("mod"), {})[part] = raw[key].dense(None)
        else:
            full[k.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")] = raw[key]

    r_default, a_default = cfg.get("r", 8), cfg.get("lora_alpha", cfg.get("alpha", 8))
    leaves: dict[str, Leaf] = {}
    for mod, parts in groups.items():
        r = _pattern_value(mod, cfg.get("rank_pattern"), r_default)
        alpha = _pattern_value(mod, cfg.get("alpha_pattern"), a_default)
        if kind == "LORA":
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            if "lora_embedding_A" in parts:  # A (r, num), B (dim, r); weight (num, dim) = (B A)^T
                leaf = LowRank(parts["lora_embedding_A"].T, parts["lora_embedding_B"].T, scale)
            else:
                A, B = parts["lora_A"], parts["lora_B"]
                if cfg.get("fan_in_fan_out"):  # GPT-2 Conv1D stores W^T
                    leaf = LowRank(A.reshape(A.shape[0], -1).T, B.reshape(B.shape[0], -1).T, scale)
                else:
                    leaf = LowRank(B, A, scale)
                if "lora_B_bias" in parts:
                    leaves[_resolve(f"{mod}.bias", base_names, where)] = Dense(scale * parts["lora_B_bias"].float())
        else:
            if "lokr_t2" in parts:
                raise UserError(f"{d}: LoKr with use_effective_conv2d (Tucker factor) is not supported as a delta tree.")
            w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
            w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
            wname = _resolve(f"{mod}.weight", base_names, where)
            shape = base[wname].shape if base is not None else None
            leaves[wname] = Kronecker(w1, w2, alpha / r, shape)
            continue
        wname = _resolve(f"{mod}.weight", base_names, where)
        if base is not None and tuple(base[wname].shape) != tuple(leaf.shape):
            if leaf.numel == base[wname].numel:  # conv LoRA: (out, in, k, k)
                leaf = LowRank(leaf.B, leaf.A, leaf.scale, base[wname].shape)
            else:
                raise UserError(
                    f"{d}: the delta for {wname} has shape {tuple(leaf.shape)} but the base has {tuple(base[wname].shape)}."
                )
        leaves[wname] = leaf

    if full:
        if base is None:
            raise UserError(
                f"{d}: the adapter also saves whole modules ({', '.join(list(full)[:5])}); their delta needs the "
                "base model (give base_model)."
            )
        from peft_lab.tree.ops import delta as _delta

        resolved = {_resolve(k, base_names, where): leaf for k, leaf in full.items()}
        for k, leaf in _delta(Tree(resolved, source=where), base).items():
            leaves[k] = leaf
    return Tree(leaves, source=where, meta={"peft_type": kind, TREE_KIND_KEY: "delta"})


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def parse_size(size: int | str | None) -> int | None:
    """'5GB', '500MB', '2GiB' or an int of bytes -> bytes (None = no sharding)."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.I)
    if not m:
        raise UserError(f"max_shard_size: cannot read {size!r} (use e.g. '5GB' or '500MB').")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


# One entry of a file to write: (key, dtype, shape, producer). The producer is called once, in order.
Entry = tuple[str, torch.dtype, Sequence[int], Callable[[], torch.Tensor]]


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors(
    path: str | os.PathLike,
    entries: Sequence[Entry],
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> None:
    """Stream tensors into one safetensors file: header first (from declared dtypes/shapes), then each
    producer's bytes in order. Each produced tensor must match its declaration (checked).

    A producer returns either the tensor or an iterable of 1-D chunks of it (row-major order, declared
    dtype), so a huge tensor never has to exist in memory whole."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, dtype, shape, _ in entries:
        n = _nbytes(dtype, shape)
        header[key] = {"dtype": TORCH_TO_ST[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        w = _Writer(f)
        try:
            for key, dtype, shape, produce in entries:
                t = produce()
                if isinstance(t, torch.Tensor):
                    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                        raise RuntimeError(f"{key}: produced {t.dtype}{tuple(t.shape)}, declared {dtype}{tuple(shape)}")
                    written = w.put(t)
                else:
                    written = 0
                    for chunk in t:
                        if chunk.dtype != dtype or chunk.dim() != 1:
                            raise RuntimeError(f"{key}: produced a {chunk.dtype} chunk of shape {tuple(chunk.shape)}, declared {dtype}")
                        written += w.put(chunk)
                    if written != _nbytes(dtype, shape):
                        raise RuntimeError(f"{key}: chunks hold {written} bytes, declared {_nbytes(dtype, shape)}")
                if on_tensor is not None:
                    on_tensor(key, written)
        except BaseException:
            w.close(check=False)
            raise
        w.close()
        f.flush()
        os.fsync(f.fileno())


class _Writer:
    """Writes the tensors' bytes on a second thread, in order, while the caller produces the next ones (a merge
    computing its next chunk overlaps the copy into the page cache; `write` releases the GIL). At most `depth`
    tensors wait; they are the producer's own (fresh) tensors, kept alive until written. An error while
    writing (e.g. a full disk) is raised in the caller's thread at its next `put` or at `close`."""

    def __init__(self, f, depth: int = 2):
        self.f = f
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="peft-lab-write")
        self.thread.start()

    def _run(self) -> None:
        while (t := self.q.get()) is not None:
            if self.error is None:
                try:
                    _write_tensor(self.f, t)
                except BaseException as e:  # reported to the producer
                    self.error = e

    def put(self, t: torch.Tensor) -> int:
        if self.error is not None:
            raise self.error
        if t.numel():
            self.q.put(t)
        return t.numel() * t.element_size()

    def close(self, check: bool = True) -> None:
        self.q.put(None)
        self.thread.join()
        if check and self.error is not None:
            raise self.error


def _write_tensor(f, t: torch.Tensor) -> int:
    t = t.detach().to("cpu").contiguous()
    if t.numel():
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return t.numel() * t.element_size()


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
        n = _nbytes(e[1], e[2])
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
            total += _nbytes(dt, shape)
    index = {"metadata": {"total_size": total, **{k: v for k, v in meta.items() if k != LEAVES_KEY}}, "weight_map": weight_map}
    (path / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _belongs(key: str, name: str) -> bool:
    return key == name or key.startswith(name + ".")


def _same_leaf(prev_key: str, key: str, structured: Mapping[str, Any]) -> bool:
    return any(_belongs(prev_key, n) and _belongs(key, n) for n in structured)


# ---------------------------------------------------------------------------------------------------------
# Atomic output directories
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary dir beside `out`; on success it is renamed to `out`, on any failure (exception,
    Ctrl-C, SIGTERM, disk full) it is deleted and `out` is left as it was.

    Refuses a non-empty existing `out` unless `overwrite` (then the old dir is replaced only after the new one
    is complete).
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty. Choose another output dir or pass overwrite=true.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(out.parent, f".{out.name}.tmp-")
    prev_term = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        prev_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash, out)  # put the previous output back where it was
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"Disk full while writing {out} ({e.filename or tmp}); nothing was written. Free space and run again.") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new empty dir `parent/prefix<random>` with the usual permissions: created with mode 0o777, so the kernel
    applies the process umask (and any default ACL of `parent`) as for any new dir. Nothing reads or sets the umask:
    `os.umask` is process-wide, and setting it even briefly races with other threads creating files."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent / prefix))


def copy_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Copy the listed files that exist in `src_dir` (config, tokenizer, ...) into `dst_dir`."""
    copied = []
    for n in names:
        s = Path(src_dir) / n
        if s.is_file():
            shutil.copy2(s, Path(dst_dir) / n)
            copied.append(n)
    return copied
