"""What a merged model records about how it was made: the recipe, its inputs' content hashes, the tool version.

The record goes into every output safetensors header (metadata key `RECIPE_KEY`, JSON) and into
`merge_recipe.yaml` beside the weights, which `peft-lab merge --config merge_recipe.yaml` re-runs. Input files are
hashed (sha256) in a background thread while the merge streams (`Hasher`); the headers are written first with
fixed-width placeholder digests and patched in place once the digests are known (`patch_metadata`), so the
weights are never written twice. `read_recipe` reads the record back from a merged model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from peft_lab.errors import UserError
from peft_lab.tree import model_weight_files, read_header
from peft_lab.tree.load import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLE_SUFFIXES

__all__ = [
    "RECIPE_KEY",
    "RECIPE_FILE",
    "Hasher",
    "input_files",
    "record",
    "patch_metadata",
    "write_recipe_file",
    "read_recipe",
]

RECIPE_KEY = "peft_lab.merge_recipe"  # safetensors header metadata key holding the recipe (JSON)
RECIPE_FILE = "merge_recipe.yaml"


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
    return list(p.glob("*.safetensors.index.json")) + files


class Hasher(threading.Thread):
    """sha256 of every input file, in a background thread (hashlib releases the GIL on large buffers).
    `stop()` ends it early (a failed merge does not keep reading its inputs)."""

    CHUNK = (
        1 << 20
    )  # read into one reused buffer that stays in cache (a fresh 8 MB bytes object per read cost page faults)

    def __init__(self, files: Sequence[Path], kind: str):
        super().__init__(daemon=True, name="peft-lab-hash")
        self.files, self.kind = list(files), kind
        self.digests: dict[Path, str] = {}
        self.error: BaseException | None = None
        self._cancel = threading.Event()

    def run(self) -> None:
        try:
            buf = bytearray(self.CHUNK)
            view = memoryview(buf)
            for f in self.files:
                h = hashlib.sha256()
                with open(f, "rb", buffering=0) as fh:
                    while not self._cancel.is_set() and (n := fh.readinto(buf)):
                        h.update(view[:n])
                if self._cancel.is_set():
                    return
                self.digests[f] = f"sha256:{h.hexdigest()}"
        except BaseException as e:  # reported by the main thread
            self.error = e

    def stop(self) -> None:
        self._cancel.set()

    def result(self) -> dict[Path, str]:
        """Wait for the digests; a read error becomes a UserError."""
        self.join()
        if self.error is not None:
            raise UserError(f"Could not read an input file to hash it: {self.error}")
        return self.digests

    @staticmethod
    def placeholder(kind: str) -> str:
        return f"{kind}:" + "0" * 64


def record(
    recipe: dict[str, Any],
    inputs: Sequence[tuple[str, str, bool | None]],
    hash_kind: str,
    digests: dict[Path, str] | None,
    *,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """The recorded recipe: `recipe` (the canonical recipe dict) plus one entry per input
    (`(role, path, is_delta)`, role `base` or `model`) with its files' digests (placeholders until known)."""
    from peft_lab import __version__

    rec = dict(recipe)
    entries = []
    for role, path, is_delta in inputs:
        entry: dict[str, Any] = {"model": path, "role": role}
        if role == "model":
            entry["kind"] = "delta" if is_delta else "model"
        if hash_kind != "none":
            root = Path(path)
            entry["files"] = {
                (f.name if root.is_dir() else str(f)): (digests[f] if digests else Hasher.placeholder(hash_kind))
                for f in input_files(path)
            }
        entries.append(entry)
    rec["inputs"] = entries
    rec["hash"] = hash_kind
    if allow_nonfinite:
        rec["allow_nonfinite"] = True
    rec["tool"] = f"peft-lab {__version__}"
    return rec


def patch_metadata(files: list[Path], out_dir: Path, old: str, new: str) -> None:
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


def write_recipe_file(out_dir: Path, rec: dict[str, Any]) -> None:
    (out_dir / RECIPE_FILE).write_text(
        f"# written by peft-lab merge; `peft-lab merge --config {RECIPE_FILE} --out DIR` re-runs it\n"
        + yaml.safe_dump(rec, sort_keys=False)
    )


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe recorded in a merged model's safetensors header (a file or a model dir)."""
    p = Path(path)
    f = p if p.is_file() else model_weight_files(p)[0]
    _, meta = read_header(f)
    if RECIPE_KEY not in meta:
        raise UserError(f"{f}: no peft-lab merge recipe in its metadata.")
    return json.loads(meta[RECIPE_KEY])
