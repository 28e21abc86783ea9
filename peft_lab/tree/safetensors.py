"""The safetensors file format: header parsing and validation, the one tensor reader, and the streaming writer.

A file is 8 bytes (little-endian u64) of header length N, N bytes of JSON `{name: {dtype, shape, data_offsets:
[b, e]}, "__metadata__": {str: str}}`, then the tensors' bytes, offsets counted from the data start 8 + N.

Reading: `TensorReader` reads with positioned reads (`os.preadv`) into fresh buffers the caller owns, from
descriptors it keeps open with each file's already-parsed header. Nothing is memory-mapped, so resident memory is
what the caller keeps (a memory map adds every page it touches to the process's RSS until it is unmapped). The
merge executor reads chunks of a tensor (`read`, `read_into`); `Lazy` leaves read whole tensors (`read_tensor`)
through a shared reader that checks each file's identity, so a file rewritten at the same path is read afresh.
Reads are POSIX (`os.preadv`, or `os.pread` where there is no `preadv`).

Writing: `write_safetensors` writes the header from declared dtypes and shapes, then each tensor as it is
produced, on a second thread, so peak memory is about one tensor (`safetensors.torch.save_file` needs the whole
dict in memory).

This is the bottom layer of `peft_lab.tree`: it imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from peft_lab.errors import UserError

__all__ = [
    "read_header",
    "read_tensor",
    "TensorReader",
    "write_safetensors",
    "Entry",
    "nbytes",
    "ST_TO_TORCH",
    "TORCH_TO_ST",
    "FORMAT_KEY",
    "TREE_FORMAT",
    "LEAVES_KEY",
    "TREE_KIND_KEY",
]

# header metadata of peft-lab's tree format (written by `save_tree`, read by `load_safetensors`)
FORMAT_KEY = "peft_lab.format"
TREE_FORMAT = "tree/1"
LEAVES_KEY = "peft_lab.leaves"  # JSON {name: {kind, meta}} of the structured leaves stored as <name>.<factor>
# "delta" marks a tree of changes to a base model (task vector, adapter delta); anything else is a full model
TREE_KIND_KEY = "peft_lab.tree_kind"

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
MAX_HEADER = 100 * 2**20
Header = dict[str, dict[str, Any]]


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * dtype.itemsize


# ---------------------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------------------
def read_header(path: str | os.PathLike) -> tuple[Header, dict[str, str]]:
    """Parse a safetensors header without touching the data: ({name: {dtype, shape, data_offsets}}, metadata).

    Checks what can be checked cheaply, so a truncated or corrupt file is caught before any work starts:
    header length, JSON, offsets inside the file, dtypes known.
    """
    f = _File(os.fspath(path))
    try:
        return f.header, f.meta
    finally:
        f.close()


def _pread(fd: int, n: int, pos: int) -> bytes:
    out = b""
    while len(out) < n and (chunk := os.pread(fd, n - len(out), pos + len(out))):
        out += chunk
    return out


def _parse(fd: int, path: str, size: int) -> tuple[Header, dict[str, str], int]:
    """(header, metadata, data start) of the open file `fd` of `size` bytes, validated."""
    head = _pread(fd, 8, 0)
    if len(head) < 8:
        raise UserError(f"{path}: not a safetensors file (only {size} bytes). Re-save or re-download it.")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > MAX_HEADER:
        raise UserError(
            f"{path}: corrupt or truncated safetensors file (header of {n} bytes in a {size}-byte file). "
            "Re-save or re-download it."
        )
    try:
        header = json.loads(_pread(fd, n, 8))
        meta = header.pop("__metadata__", None) or {}
        meta = {str(k): str(v) for k, v in meta.items()}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as e:
        raise UserError(f"{path}: corrupt safetensors header ({e}). Re-save or re-download it.") from None
    data_size = size - 8 - n
    end_max = 0
    for name, info in header.items():
        try:
            b, e = (int(x) for x in info["data_offsets"])
            numel = math.prod(int(s) for s in info["shape"])
            size_ok = e - b == numel * ST_TO_TORCH[info["dtype"]].itemsize
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors entry for tensor {name!r}: {info}.") from None
        if not size_ok or b < 0 or numel < 0:
            raise UserError(f"{path}: corrupt safetensors entry for tensor {name!r} (offsets {b}..{e}).")
        end_max = max(end_max, e)
    if end_max > data_size:
        raise UserError(
            f"{path}: truncated safetensors file: its header describes {end_max} bytes of data but only "
            f"{data_size} are present. Re-save or re-download it."
        )
    return header, meta, 8 + n


class _File:
    """One open safetensors file: a read-only descriptor, its validated header, where its data starts, and its
    identity (device, inode, mtime, size). The descriptor is closed by `close()` or when the object goes away,
    so a reader that drops a file from its cache never closes it under another thread still reading it."""

    def __init__(self, path: str):
        self.fd = -1
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(self.fd)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file.") from None
        except OSError as e:
            raise UserError(f"{path}: cannot open ({e.strerror or e}).") from None
        try:
            self.header, self.meta, self.data_start = _parse(self.fd, path, st.st_size)
        except BaseException:
            self.close()
            raise
        self.path, self.ident = path, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------------
class TensorReader:
    """Reads tensors, whole or in flat slices, out of safetensors files it keeps open.

    A tensor is named by a leaf-like object with `path`, `key` and `dtype` (a `Lazy` leaf) or by a tuple
    `(path, key, dtype)`; `dtype` (the stored dtype, None = take the file's) is checked against the header.

    Args:
        max_open: the most files kept open; the least recently used is dropped first (None: no limit).
        revalidate: on every access, check that the path still names the same file (one `stat`) and reopen it
            when it was rewritten. Off for a merge, whose inputs are fixed; on for `Lazy` leaves.
    """

    def __init__(self, *, max_open: int | None = None, revalidate: bool = False):
        self.max_open, self.revalidate = max_open, revalidate
        self._files: OrderedDict[str, _File] = OrderedDict()
        self._lock = threading.Lock()

    def _file(self, path: str) -> _File:
        f = self._files.get(path)  # one dict read: atomic under the GIL, so no lock on the hot path
        if f is not None and self.revalidate and _identity(path) != f.ident:
            f = None
        if f is None:
            f = _File(path)
            with self._lock:
                self._files[path] = f
                while self.max_open is not None and len(self._files) > self.max_open:
                    self._files.popitem(last=False)
        elif self.max_open is not None:
            with self._lock, contextlib.suppress(KeyError):
                self._files.move_to_end(path)
        return f

    def _locate(self, src: Any) -> tuple[_File, str, int, torch.dtype, list[int]]:
        """(file, key, absolute offset of the data, stored dtype, shape)."""
        path, key, dtype = src if isinstance(src, tuple) else (src.path, src.key, src.dtype)
        f = self._file(os.fspath(path))
        info = f.header.get(key)
        if info is None:
            raise UserError(f"{f.path}: no tensor {key!r} in the file (was it rewritten since it was opened?).")
        stored = ST_TO_TORCH[info["dtype"]]
        if dtype is not None and stored != dtype:
            raise UserError(
                f"{f.path}: tensor {key!r} is {stored} in the file but was opened as {dtype} (was the file rewritten "
                "since it was opened?)."
            )
        return f, key, f.data_start + info["data_offsets"][0], stored, info["shape"]

    @staticmethod
    def _fill(f: _File, key: str, pos: int, view: memoryview) -> None:
        got = 0
        try:
            while got < len(view):
                k = _read_at(f.fd, view[got:], pos + got)
                if k <= 0:
                    raise UserError(f"{f.path}: the file ended while reading tensor {key} (was it truncated?).")
                got += k
        except OSError as e:  # an I/O error of the file; MemoryError and Ctrl-C propagate as they are
            raise UserError(f"{f.path}: cannot read tensor {key!r} ({e.strerror or e}).") from None

    def read_into(self, src: Any, start: int, stop: int, out) -> None:
        """The raw bytes of elements [start, stop) of the flattened tensor into `out` (a C-contiguous buffer of
        exactly that many bytes, e.g. a numpy array)."""
        f, key, pos, dtype, shape = self._locate(src)
        view = memoryview(out).cast("B")
        if not 0 <= start <= stop <= math.prod(shape) or len(view) != (stop - start) * dtype.itemsize:
            raise ValueError(f"{key}: elements [{start}, {stop}) into {len(view)} bytes of a {dtype}{tuple(shape)}")
        self._fill(f, key, pos + start * dtype.itemsize, view)

    def read(self, src: Any, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor as float32 (a fresh tensor the caller owns)."""
        f, key, pos, dtype, shape = self._locate(src)
        if not 0 <= start <= stop <= math.prod(shape):
            raise ValueError(f"{key}: elements [{start}, {stop}) of a tensor of shape {tuple(shape)}")
        if dtype == torch.float32:
            out = torch.empty(stop - start)
            self._fill(f, key, pos + 4 * start, memoryview(out.numpy()).cast("B"))
            return out
        raw = torch.empty((stop - start) * dtype.itemsize, dtype=torch.uint8)
        self._fill(f, key, pos + start * dtype.itemsize, memoryview(raw.numpy()))
        return raw.view(dtype).float()

    def read_tensor(
        self, path: str | os.PathLike, key: str, dtype: torch.dtype | None = None, shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The whole tensor, in its stored dtype and shape (a fresh tensor); `dtype`/`shape`, when given, must be
        what the file holds (they are what the caller opened it as)."""
        f, key, pos, stored, file_shape = self._locate((path, key, dtype))
        if shape is not None and tuple(shape) != tuple(file_shape):
            raise UserError(
                f"{f.path}: tensor {key!r} has shape {tuple(file_shape)} in the file but was opened as "
                f"{tuple(shape)} (was the file rewritten since it was opened?)."
            )
        raw = torch.empty(nbytes(stored, file_shape), dtype=torch.uint8)
        self._fill(f, key, pos, memoryview(raw.numpy()))
        return raw.view(stored).reshape(tuple(file_shape))

    def close(self) -> None:
        """Close every file (call it once no read is in flight)."""
        with self._lock:
            files, self._files = list(self._files.values()), OrderedDict()
        for f in files:
            f.close()


def _read_at(fd: int, view: memoryview, pos: int) -> int:
    if _PREADV:
        return os.preadv(fd, [view], pos)
    data = os.pread(fd, len(view), pos)
    view[: len(data)] = data
    return len(data)


_PREADV = hasattr(os, "preadv")
# `Lazy` leaves read through this one: files stay open across reads (a model's tensors share a few files), at most
# 32 of them; a file rewritten at the same path (a re-run writing its output again) is reopened
_SHARED = TensorReader(max_open=32, revalidate=True)


def read_tensor(
    path: str | os.PathLike, key: str, dtype: torch.dtype | None = None, shape: Sequence[int] | None = None
) -> torch.Tensor:
    """One whole tensor of a safetensors file (see `TensorReader.read_tensor`), through the shared reader."""
    return _SHARED.read_tensor(path, key, dtype, shape)


# ---------------------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------------------
# One entry of a file to write: (key, dtype, shape, producer). The producer is called once, in order.
Entry = tuple[str, torch.dtype, Sequence[int], Callable[[], Any]]


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
        n = nbytes(dtype, shape)
        header[key] = {
            "dtype": TORCH_TO_ST[dtype],
            "shape": [int(s) for s in shape],
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        w = _Writer(f)
        try:
            for key, dtype, shape, produce in entries:
                written = _put(w, key, dtype, shape, produce())
                if on_tensor is not None:
                    on_tensor(key, written)
        except BaseException:
            w.close(check=False)
            raise
        w.close()
        f.flush()
        os.fsync(f.fileno())


def _put(w: _Writer, key: str, dtype: torch.dtype, shape: Sequence[int], t: Any) -> int:
    """Queue one produced tensor (or its chunks) for writing; returns its byte count."""
    if isinstance(t, torch.Tensor):
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"{key}: produced {t.dtype}{tuple(t.shape)}, declared {dtype}{tuple(shape)}")
        return w.put(t)
    written = 0
    for chunk in t:
        if chunk.dtype != dtype or chunk.dim() != 1:
            raise RuntimeError(f"{key}: produced a {chunk.dtype} chunk of shape {tuple(chunk.shape)}, declared {dtype}")
        written += w.put(chunk)
    if written != nbytes(dtype, shape):
        raise RuntimeError(f"{key}: chunks hold {written} bytes, declared {nbytes(dtype, shape)}")
    return written


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
