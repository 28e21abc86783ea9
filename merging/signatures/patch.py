"""Patching signatures into model files, and taking them off again bit for bit.

    patch     θ' = θ + Σ α_c·σ_c on the signatures' tensors (`merging.signatures.signature.apply_signatures`); the
              original bytes of every touched tensor are kept in a restore file beside the weights, and the
              header metadata `peft_lab.rws_patches` records the step: signature names, hashes and scales.
    unpatch   when the signatures and scales given are exactly the last patch step, the touched tensors are
              copied back from the restore file: the original bytes, for every dtype. Otherwise the
              signatures are subtracted (θ'·exp(−Σ α·σ) for log-ratio tensors), which is within one rounding
              step of the original (float32 arithmetic, one cast back).

Patched models therefore form a stack: patch A, patch B, unpatch B, unpatch A returns the original bytes;
taking A off first subtracts it and gives up bitwise restoration of the steps above it.

What can be detected: with a record, unpatching a signature it does not list (or at another scale) is refused
and the message lists what the record holds. A model re-saved by another tool carries no record; whether a
signature was ever added to it cannot be known from the weights, so unpatch refuses unless `force=True`, and
then subtracts. The record also holds a hash of the touched tensors: if they changed outside peft-lab, the
copies are not used (that would undo those changes) and the signatures are subtracted instead.

Layout: a model dir gives a model dir (same weight file stem, sharded like the input, other files such as
config.json and tokenizer copied, plus `rws_restore.safetensors`); a single `X.safetensors` gives a single
file plus `X.rws_restore.safetensors`. Outputs are written atomically; inputs are only read, and an output that is,
holds or sits inside an input is refused (`peft_lab.tree.fs.guard_output`); `overwrite` replaces only a previous
patch or unpatch output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.signatures.signature import Signature, apply_signatures, content_hash
from peft_lab.errors import UserError
from peft_lab.tree import Dense, Tree, atomic_output_dir, is_delta, load_tree, model_weight_files, save_tree
from peft_lab.tree.fs import OUTPUT_KEY, atomic_file, guard_output
from peft_lab.tree.safetensors import FORMAT_KEY, LEAVES_KEY

__all__ = ["PATCHES_KEY", "RESTORE_FILE", "PatchResult", "patch", "unpatch", "read_record"]

PATCHES_KEY = "peft_lab.rws_patches"
RESTORE_FILE = "rws_restore.safetensors"
RESTORE_SUFFIX = ".rws_restore.safetensors"
PATCH_OUTPUT = "signature patch"  # the output kind of patch and unpatch (`peft_lab.tree.fs.OUTPUT_KEY`/`MARKER`)
Pairs = Sequence[tuple[Signature, float]]


@dataclass
class PatchResult:
    """What a patch/unpatch wrote: the output, the tensors it changed, and how ("patched", "restored"
    bitwise from the kept copies, or "subtracted"), with notes worth telling the user."""

    out: Path
    touched: list[str]
    how: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Layout:
    path: Path
    is_dir: bool
    stem: str
    max_shard_size: int | None
    restore: Path
    weight_files: tuple[Path, ...]


def _layout(model_path: str | os.PathLike) -> _Layout:
    p = Path(model_path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"{p}: a model to patch is an HF model dir or a .safetensors file.")
        return _Layout(p, False, p.stem, None, _sidecar(p), (p,))
    files = model_weight_files(p)
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", files[0].name.removesuffix(".safetensors"))
    shard = max(f.stat().st_size for f in files) if len(files) > 1 else None
    return _Layout(p, True, stem, shard, p / RESTORE_FILE, tuple(files))


def _sidecar(p: Path) -> Path:
    return p.with_name(p.name.removesuffix(".safetensors") + RESTORE_SUFFIX)


def read_record(tree: Tree) -> dict[str, Any]:
    """The patch record of a model tree (an empty one when it was never patched by peft-lab)."""
    raw = tree.meta.get(PATCHES_KEY)
    if not raw:
        return {"version": 1, "next_id": 0, "steps": [], "state": None}
    try:
        rec = json.loads(raw)
        rec["steps"]  # noqa: B018 - shape check
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{tree.source}: corrupt {PATCHES_KEY} metadata ({e}).") from None
    return rec


def _union(steps: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for st in steps for k in st["keys"]))


def _open(model_path, out, pairs: Pairs, overwrite: bool) -> tuple[_Layout, Tree, dict, Tree, list[str]]:
    lay = _layout(model_path)
    out = Path(out)
    if not lay.is_dir and out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the model is a single .safetensors file, so the output must be one too.")
    sig_files = [p for s, _ in pairs if Path(p := str(s.tree.source).partition("::")[0]).exists()]
    guard_output(
        out,
        [lay.path, lay.restore if lay.restore.exists() else None, *sig_files],
        kind=PATCH_OUTPUT,
        overwrite=overwrite,
        side_files=() if lay.is_dir else (_sidecar(out),),
    )
    model = load_tree(lay.path)
    if is_delta(model):
        raise UserError(f"{lay.path} is an adapter or a delta; patch a full model.")
    rec = read_record(model)
    restore = load_tree(lay.restore) if lay.restore.is_file() else Tree()
    notes = []
    for st in rec["steps"]:  # copies lost (e.g. only the weights were copied): no bitwise restore for that step
        if st.get("restore") and any(f"{st['id']}/{k}" not in restore for k in st["keys"]):
            st["restore"] = False
    if rec["steps"] and rec.get("state") != content_hash(model, _union(rec["steps"])):
        # changed outside peft-lab after patching: copying the originals back would silently undo that change
        notes.append(
            "the patched tensors changed after patching (outside peft-lab); their kept copies are no longer used"
        )
        for st in rec["steps"]:
            st["restore"] = False
    return lay, model, rec, restore, notes


def _entries(pairs: Pairs) -> list[dict[str, Any]]:
    return [{"name": s.name, "hash": s.hash, "scale": float(a), "source": str(s.tree.source)} for s, a in pairs]


def _finish(
    lay: _Layout, model: Tree, new: Tree, touched: list[str], rec: dict, restore: dict, out, overwrite: bool
) -> Path:
    """Materialise the touched tensors, record the state hash, write weights + restore copies atomically."""
    vals = {k: Dense(new[k].dense(None)) for k in touched}
    new = new.replace((k, vals.get(k, leaf)) for k, leaf in new.items())
    meta = {k: v for k, v in model.meta.items() if k not in (LEAVES_KEY, FORMAT_KEY, PATCHES_KEY, OUTPUT_KEY)}
    if rec["steps"]:
        rec["state"] = content_hash(new, _union(rec["steps"]))
        meta[PATCHES_KEY] = json.dumps(rec, separators=(",", ":"))
    restore_tree = Tree(restore)
    out = Path(out)
    if lay.is_dir:
        with atomic_output_dir(out, kind=PATCH_OUTPUT, overwrite=overwrite) as tmp:
            save_tree(new, tmp, metadata=meta, max_shard_size=lay.max_shard_size, stem=lay.stem)
            if len(restore_tree):
                save_tree(restore_tree, tmp / RESTORE_FILE)
            skip = {f.name for f in lay.weight_files} | {RESTORE_FILE, f"{lay.stem}.safetensors.index.json"}
            for f in lay.path.iterdir():
                if f.name in skip:
                    continue
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        return out
    side = _sidecar(out)  # `_open` checked that `out` and `side` may be written
    with atomic_file(out) as t_out:  # a file output is marked in its metadata (a dir output by its marker file)
        save_tree(new, t_out, metadata={**meta, OUTPUT_KEY: PATCH_OUTPUT})
        if len(restore_tree):
            with atomic_file(side) as t_side:  # renamed first, so the weights never point at missing copies
                save_tree(restore_tree, t_side, metadata={OUTPUT_KEY: PATCH_OUTPUT})
    if not len(restore_tree) and side.exists():  # an older output's copies no longer describe this one
        side.unlink()
    return out


def patch(
    model_path: str | os.PathLike, pairs: Pairs, out: str | os.PathLike, *, overwrite: bool = False
) -> PatchResult:
    """Write `model + Σ scale·signature` to `out`, keeping copies of the touched tensors for `unpatch`.

    Args:
        model_path: an HF model dir or a .safetensors file (possibly patched before: steps stack up).
        pairs: (signature, scale) per signature; several compose, in any order, to the same bytes.
        out: the output dir (or .safetensors file for a file input).
    """
    if not pairs:
        raise UserError("patch: give at least one --signature.")
    lay, model, rec, restore, notes = _open(model_path, out, pairs, overwrite)
    new = apply_signatures(model, pairs)
    touched = [k for k in model if k in {k for s, _ in pairs for k in s.tree}]
    keep = {f"{st['id']}/{k}": restore[f"{st['id']}/{k}"] for st in rec["steps"] if st["restore"] for k in st["keys"]}
    sid = rec["next_id"]
    keep.update((f"{sid}/{k}", model[k]) for k in touched)  # the original bytes, as stored
    rec["steps"].append({"id": sid, "signatures": _entries(pairs), "keys": touched, "restore": True})
    rec["next_id"] = sid + 1
    path = _finish(lay, model, new, touched, rec, keep, out, overwrite)
    return PatchResult(path, touched, "patched", notes)


def _describe(steps: list[dict]) -> str:
    items = [f"{e['name']} (hash {e['hash'][:12]}, scale {e['scale']:g})" for st in steps for e in st["signatures"]]
    return ", ".join(items) or "nothing"


def unpatch(
    model_path: str | os.PathLike,
    pairs: Pairs,
    out: str | os.PathLike,
    *,
    force: bool = False,
    overwrite: bool = False,
) -> PatchResult:
    """Take signatures off a patched model (see the module docstring for when it is bitwise).

    Args:
        pairs: (signature, scale) as they were patched.
        force: subtract even when the model's record does not list them (or it has no record).
    """
    if not pairs:
        raise UserError("unpatch: give at least one --signature.")
    lay, model, rec, restore, notes = _open(model_path, out, pairs, overwrite)
    steps = rec["steps"]
    given = Counter((s.hash, float(a)) for s, a in pairs)
    top = steps[-1] if steps else None
    if (
        top is not None
        and top["restore"]
        and Counter((e["hash"], float(e["scale"])) for e in top["signatures"]) == given
    ):
        new = model.replace((k, restore[f"{top['id']}/{k}"] if k in top["keys"] else leaf) for k, leaf in model.items())
        keep = {f"{st['id']}/{k}": restore[f"{st['id']}/{k}"] for st in steps[:-1] if st["restore"] for k in st["keys"]}
        rec["steps"] = steps[:-1]
        path = _finish(lay, model, new, list(top["keys"]), rec, keep, out, overwrite)
        return PatchResult(path, list(top["keys"]), "restored")
    if not steps and not force:
        raise UserError(
            f"{lay.path} carries no record of patched signatures (it was not patched by peft-lab, or was re-saved by "
            "another tool), so peft-lab cannot tell whether these signatures were ever added to it; subtracting one "
            "that was not would damage the model. If you know they were patched in at these scales, pass --force."
        )
    lowest, unknown = len(steps), []
    for (h, a), n in given.items():
        for _ in range(n):
            hit = next(
                (
                    (i, e)
                    for i in reversed(range(len(steps)))
                    for e in steps[i]["signatures"]
                    if e["hash"] == h and float(e["scale"]) == a
                ),
                None,
            )
            if hit is not None:
                steps[hit[0]]["signatures"].remove(hit[1])
                lowest = min(lowest, hit[0])
                continue
            sig = next(s for s, x in pairs if s.hash == h and float(x) == a)
            others = [e["scale"] for st in steps for e in st["signatures"] if e["hash"] == h]
            if others and not force:
                raise UserError(
                    f"{sig.name} was patched into {lay.path} at scale {', '.join(f'{x:g}' for x in others)}, "
                    f"not {a:g}; unpatch it with --scale {others[-1]:g}."
                )
            unknown.append(f"{sig.name} (hash {h[:12]}, scale {a:g})")
    if unknown and not force:
        raise UserError(
            f"{', '.join(unknown)}: never patched into {lay.path}, whose record lists {_describe(steps)}. "
            "Pass the signatures and scales it lists (or --force to subtract anyway)."
        )
    if unknown:
        notes.append(f"subtracted {', '.join(unknown)} although the record does not list it (--force)")
    if not notes:
        notes.append(
            "subtracted, so within one rounding step of the original rather than bitwise: "
            + (
                "the model has no patch record"
                if not steps
                else "taken off out of patch order"
                if lowest < len(steps) - 1
                else "the copies of the last patch step are missing"
                if not steps[-1]["restore"]
                else "only part of the last patch step (taking off the rest later restores the original bytes)"
            )
        )
    for st in steps[lowest + 1 :]:  # their copies include the signatures just subtracted
        st["restore"] = False
    rec["steps"] = [st for st in steps if st["signatures"]]
    new = apply_signatures(model, pairs, sign=-1.0)
    touched = [k for k in model if k in {k for s, _ in pairs for k in s.tree}]
    keep = {f"{st['id']}/{k}": restore[f"{st['id']}/{k}"] for st in rec["steps"] if st["restore"] for k in st["keys"]}
    path = _finish(lay, model, new, touched, rec, keep, out, overwrite)
    return PatchResult(path, touched, "subtracted", notes)
