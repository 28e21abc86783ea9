"""Robust Weight Signatures (Cai et al., "Robust Weight Signatures: Gaining Robustness as Easy as Patching
Weights?", ICML 2023, https://arxiv.org/abs/2302.12480): the robustness a model gains by fine-tuning on
corrupted data lives mostly in its shallow layers, as a weight difference that can be cut out, stored small
and patched into another model.

    signature      σ_c = θ_c − θ_clean                     on the kept (shallow) layers  (default, "difference")
                   σ_c = v − (⟨v, a⟩/⟨a, a⟩)·a,  v = θ_c − θ_pre,  a = θ_clean − θ_pre     ("projection", the
                   official code's form, when a pre-trained θ_pre is given)
    patch          θ = θ_model + Σ_c α_c·σ_c              (linear α_c: the paper's semantics; the official
                   code squares its coefficient)
    unpatch        θ_model restored bitwise from the copies kept at patch time (see `merging.signatures.patch`)

Normalisation statistics are not additive parameters: a `*.running_var` is stored as the log-ratio
log(var_c) − log(var_clean) and patched multiplicatively, var·exp(Σ α_c·σ_c), so it stays positive at any
scale and several signatures still compose in any order; `*.running_mean` is additive; integer counters
(`num_batches_tracked`) are never touched. (The official code instead overwrites every BN tensor with the
mean over the robust models, which cannot be undone.)

Difference is the default: it needs no pre-trained model, reproduces θ_c exactly at α = 1 on the kept
layers, and when the robust model is fine-tuned from the clean one (θ_pre = θ_clean) the projection reduces
to it anyway. Use the projection when clean and robust models are siblings fine-tuned from one θ_pre.

A signature file is one safetensors file: its tensors keyed by parameter name (a bank of several prefixes
each with `<name>/`), structured leaves for quantized tensors (`peft_lab.tree.quantized`), and the
metadata `peft_lab.signatures`: {name: record} with the format version, source model content hashes,
kept layers and tensors, bits, scheme, and the signature's own content hash (checked on load).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.signatures.layers import LayerSelection, in_forward_order, modules, weight_layers
from peft_lab import __version__
from peft_lab.errors import UserError
from peft_lab.tree import Dense, Leaf, Thunk, Tree, apply, check_compatible, is_delta, load_tree, quantize, save_tree
from peft_lab.tree.fs import OUTPUT_KEY, atomic_file, guard_output
from peft_lab.tree.safetensors import TREE_KIND_KEY

__all__ = [
    "FORMAT",
    "SIGNATURES_KEY",
    "LayerSelection",
    "Signature",
    "extract",
    "apply_signatures",
    "save_signatures",
    "load_signatures",
    "resolve_signature",
    "content_hash",
    "weight_layers",
    "in_forward_order",
]

FORMAT = "rws/1"
SIGNATURES_KEY = "peft_lab.signatures"
SIGNATURE_OUTPUT = "signature file"  # the output kind of extract and pack (`peft_lab.tree.fs.OUTPUT_KEY`)
BITS = (32, 16, 8, 4)
# tensors stored as log-ratios and patched multiplicatively (they must stay positive)
MULTIPLICATIVE_SUFFIXES = ("running_var",)
STAT_SUFFIXES = ("running_mean", "running_var")
NAME_RX = re.compile(r"^[A-Za-z0-9_.+-]+$")
_TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signature:
    """A signature: its tensors (a tree keyed by the model's parameter names) and its record.

    `tree[k]` is the stored value of key k: a difference (op "add") or a log-ratio (op "mul"), as a float32 or
    float16 `Dense` leaf or a `Quantized` one. `record` is what goes into the file's metadata.
    """

    name: str
    tree: Tree
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return self.record["hash"]

    @property
    def ops(self) -> dict[str, str]:
        mul = set(self.record.get("multiplicative", []))
        return {k: "mul" if k in mul else "add" for k in self.tree}

    @property
    def nbytes(self) -> int:
        return self.tree.nbytes

    def __repr__(self) -> str:
        r = self.record
        return (
            f"Signature({self.name!r}, {len(self.tree)} tensors, {r.get('bits')} bits, {self.nbytes} bytes, "
            f"mode={r.get('mode')}, hash={self.hash[:12]})"
        )


def _is_mul(name: str) -> bool:
    return name.endswith(MULTIPLICATIVE_SUFFIXES)


def _update(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def content_hash(tree: Tree, names: Iterable[str] | None = None) -> str:
    """sha256 over (name, dtype, shape, bytes) of the tensors, by sorted name: independent of file layout,
    sharding and metadata. Structured leaves hash their stored factors. Reads every tensor it hashes."""
    h = hashlib.sha256()
    for name in sorted(tree if names is None else names):
        leaf = tree[name]
        if isinstance(leaf, Dense) or leaf.kind in ("lazy", "thunk"):
            _update(h, name, leaf.dense(None))
        else:
            h.update(f"{name}|{leaf.kind}|{json.dumps(leaf.meta(), sort_keys=True)}|".encode())
            for f, t in sorted(leaf.factors().items()):
                _update(h, f"{name}.{f}", t)
    return h.hexdigest()


def _signature_hash(tree: Tree, multiplicative: Sequence[str]) -> str:
    return hashlib.sha256((content_hash(tree) + "|mul:" + ",".join(sorted(multiplicative))).encode()).hexdigest()


def _transform(name: str, x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(_TINY)) if _is_mul(name) else x


def _finite(x: torch.Tensor, name: str, where: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise UserError(f"{where}: tensor {name} has NaN or Inf values; a signature cannot be extracted from it.")
    return x


def _store(v: torch.Tensor, bits: int, name: str) -> Leaf:
    if bits == 32:
        return Dense(v.contiguous())
    if bits == 16:
        if v.abs().max() > torch.finfo(torch.float16).max:
            raise UserError(f"tensor {name}: the difference exceeds the float16 range; extract with --bits 32.")
        return Dense(v.half().contiguous())
    return quantize(v, bits)


def extract(
    clean: Tree,
    robust: Tree,
    *,
    layers: LayerSelection | str | int | None = None,
    bits: int = 32,
    pretrained: Tree | None = None,
    name: str = "signature",
    stats: bool = True,
) -> Signature:
    """Cut the signature of `robust` against `clean` on the kept layers.

    Args:
        clean, robust: full models of one architecture (a PEFT/peft-lab adapter dir for `robust` is taken as
            a delta on `clean`).
        layers: a `LayerSelection` or its `--layers` string (default: the shallow half).
        bits: 32 (float32), 16 (float16), 8 or 4 (per-channel symmetric int, float32 scales).
        pretrained: θ_pre, which switches to the projection form (module docstring).
        name: the signature's name in files and banks.
        stats: keep the normalisation running statistics of the kept layers (False leaves them out).
    Returns:
        The `Signature` (tensors in memory: signatures are small by construction).
    """
    if bits not in BITS:
        raise UserError(f"--bits {bits}: use one of {', '.join(map(str, BITS))}.")
    if not NAME_RX.match(name):
        raise UserError(f"signature name {name!r}: use letters, digits and . _ + - only.")
    sel = layers if isinstance(layers, LayerSelection) else LayerSelection.parse(layers)
    if is_delta(clean):
        raise UserError(f"{clean.source} is an adapter or a delta; --clean must be a full model.")
    robust_src = robust
    if is_delta(robust):
        robust = apply(clean, robust)  # an adapter trained from the clean model: θ_c = θ_clean + Δ
    others = {f"robust model {robust.source}": robust}
    if pretrained is not None:
        others[f"pretrained model {pretrained.source}"] = pretrained
    check_compatible(clean, others)

    order = "file"
    if sel.counts_layers:
        clean, order = in_forward_order(clean)
    kept = sel.modules(clean, robust)
    tensors = modules(clean)
    keys = [n for m in kept for n in tensors[m] if stats or not n.endswith(STAT_SUFFIXES)]
    leaves: dict[str, Leaf] = {}
    max_err = 0.0
    for k in keys:
        c = _finite(clean[k].dense(), k, clean.source)
        r = _finite(robust[k].dense(), k, robust.source)
        if pretrained is None:
            v = _transform(k, r) - _transform(k, c)  # float32
        else:
            p = _transform(k, _finite(pretrained[k].dense(), k, pretrained.source))
            v, a = (_transform(k, r) - p).double(), (_transform(k, c) - p).double()
            aa = float((a * a).sum())
            # remove the component along the clean model's own change (official get_projection)
            v = (v - (float((v * a).sum()) / aa) * a if aa > 0 else v).float()
        leaves[k] = _store(v, bits, k)
        max_err = max(max_err, float((leaves[k].dense() - v).abs().max()) if v.numel() else 0.0)
    tree = Tree(leaves, source=name)
    mul = [k for k in keys if _is_mul(k)]
    record = {
        "format": FORMAT,
        "name": name,
        "mode": "projection" if pretrained is not None else "difference",
        "layers": kept,
        "keys": keys,
        "selection": sel.describe(),
        "order": order,
        "multiplicative": mul,
        "bits": bits,
        "scheme": {32: "float32", 16: "float16"}.get(
            bits,
            f"int{bits} symmetric per-channel (dim 0), round-to-nearest, float32 scales; "
            f"|error| <= max|x_c|/{2 * (2 ** (bits - 1) - 1)}",
        ),
        "max_abs_error": max_err,
        "sources": {
            "clean": {"path": str(clean.source), "hash": content_hash(clean)},
            "robust": {"path": str(robust_src.source), "hash": content_hash(robust_src)},
            **(
                {"pretrained": {"path": str(pretrained.source), "hash": content_hash(pretrained)}}
                if pretrained is not None
                else {}
            ),
        },
        "hash": _signature_hash(tree, mul),
        "tool": f"peft-lab {__version__}",
    }
    return Signature(name, tree, record)


# ---------------------------------------------------------------------------------------------------------
# Applying signatures to a tree (the math; `merging.signatures.patch` adds files, records and restore copies)
# ---------------------------------------------------------------------------------------------------------
def check_fit(model: Tree, pairs: Sequence[tuple[Signature, float]]) -> None:
    """One `UserError` naming every tensor of every signature that the model lacks or holds in another shape."""
    lines = []
    for sig, _ in pairs:
        for k, leaf in sig.tree.items():
            if k not in model:
                lines.append(f"{sig.name}: {k} is not in the model")
            elif tuple(model[k].shape) != tuple(leaf.shape):
                lines.append(
                    f"{sig.name}: {k} is {tuple(leaf.shape)} in the signature, {tuple(model[k].shape)} in the model"
                )
            elif not model[k].dtype.is_floating_point:
                lines.append(f"{sig.name}: {k} is {model[k].dtype} in the model, not a float tensor")
    if lines:
        raise UserError(
            f"The signature(s) do not fit {model.source} ({len(lines)} tensor(s)); a signature patches models of the "
            "architecture it was extracted from:\n  "
            + "\n  ".join(lines[:40])
            + (f"\n  ... and {len(lines) - 40} more" if len(lines) > 40 else "")
        )


def apply_signatures(model: Tree, pairs: Sequence[tuple[Signature, float]], *, sign: float = 1.0) -> Tree:
    """θ + sign·Σ α·σ (multiplicative keys: θ·exp(sign·Σ α·σ)), lazily, float32 arithmetic, one cast back.

    Contributions to a tensor are summed in a canonical order (by signature hash, then scale), so the result
    does not depend on the order the signatures are given in, bit for bit.
    """
    check_fit(model, pairs)
    ops: dict[str, str] = {}
    contrib: dict[str, list[tuple[str, float, Leaf]]] = {}
    for sig, scale in pairs:
        for k, op in sig.ops.items():
            if ops.setdefault(k, op) != op:
                raise UserError(
                    f"{k}: one signature stores it as a difference, another as a log-ratio; "
                    "they were made by incompatible tools and cannot be composed."
                )
            contrib.setdefault(k, []).append((sig.hash, float(scale), sig.tree[k]))
    out = {}
    for name, leaf in model.items():
        if name not in contrib:
            out[name] = leaf
            continue
        parts = sorted(contrib[name], key=lambda t: (t[0], t[1]))

        def fn(w, *ds, _parts=parts, _mul=ops[name] == "mul"):
            acc = torch.zeros_like(w)
            for (_, s, _), d in zip(_parts, ds, strict=True):
                acc += s * d
            return w * torch.exp(sign * acc) if _mul else w + sign * acc

        out[name] = Thunk(fn, [leaf] + [p[2] for p in parts], leaf.shape, leaf.dtype, name=name)
    return model.replace(out)


# ---------------------------------------------------------------------------------------------------------
# Files and banks
# ---------------------------------------------------------------------------------------------------------
def save_signatures(
    sigs: Sequence[Signature],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write one signature (keys = parameter names, readable as a delta tree by `load_tree`) or a bank of
    several (keys `<name>/<param>`) as one safetensors file, atomically.

    Args:
        overwrite: replace an existing file, only if it is a signature file written by peft-lab (its metadata
            marks it as a `SIGNATURE_OUTPUT`; `peft_lab.tree.fs.guard_output`).
        inputs: the paths the signatures were read or extracted from: the file must not be one of them.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: a signature file must end in .safetensors.")
    guard_output(path, inputs, kind=SIGNATURE_OUTPUT, overwrite=overwrite)
    names = [s.name for s in sigs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(
            f"two signatures are named {', '.join(dup)}; a bank needs distinct names (extract with --name)."
        )
    bank = len(sigs) > 1
    leaves, records = {}, {}
    for s in sigs:
        prefix = f"{s.name}/" if bank else ""
        records[s.name] = {**s.record, "prefix": prefix}
        leaves.update((prefix + k, leaf) for k, leaf in s.tree.items())
    meta = {SIGNATURES_KEY: json.dumps(records, separators=(",", ":")), OUTPUT_KEY: SIGNATURE_OUTPUT}
    if not bank:
        meta[TREE_KIND_KEY] = "delta"
    with atomic_file(path) as tmp:
        save_tree(Tree(leaves), tmp, metadata=meta)
    return path


def _read_file(path: Path, verify: bool) -> list[Signature]:
    tree = load_tree(path)
    raw = tree.meta.get(SIGNATURES_KEY)
    if raw is None:
        raise UserError(
            f"{path}: not a signature file (no {SIGNATURES_KEY} metadata). Make one with `peft-lab signature extract`."
        )
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt signature metadata ({e}).") from None
    sigs = []
    for name, rec in records.items():
        if rec.get("format") != FORMAT:
            raise UserError(
                f"{path}: signature {name!r} has format {rec.get('format')!r}; this peft-lab reads {FORMAT}."
            )
        prefix = rec.get("prefix", "")
        leaves = {k[len(prefix) :]: leaf for k, leaf in tree.items() if k.startswith(prefix)}
        if list(leaves) != rec["keys"]:
            raise UserError(
                f"{path}: signature {name!r} lists {len(rec['keys'])} tensors but the file holds "
                f"{len(leaves)} under its prefix; the file is corrupt."
            )
        sub = Tree(leaves, source=f"{path}::{name}" if prefix else str(path))
        if verify and _signature_hash(sub, rec.get("multiplicative", [])) != rec["hash"]:
            raise UserError(
                f"{path}: the tensors of signature {name!r} do not match its recorded hash; the file "
                "was edited or is corrupt. Extract it again."
            )
        sigs.append(Signature(name, sub, rec))
    return sigs


def load_signatures(path: str | os.PathLike, *, verify: bool = True) -> list[Signature]:
    """Every signature in a signature file, a bank file, or a folder of them (sorted by file name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".safetensors")
        sigs = [s for f in files for s in _read_file(f, verify)]
        if not sigs:
            raise UserError(f"{p}: no signature files (*.safetensors) in this folder.")
        return sigs
    if not p.exists():
        raise UserError(f"{p}: no such signature file or folder.")
    return _read_file(p, verify)


def resolve_signature(spec: str | os.PathLike) -> Signature:
    """`PATH` (a file or folder holding one signature) or `PATH::NAME` (one signature of a bank)."""
    s = str(spec)
    path, _, name = s.partition("::")
    sigs = load_signatures(path)
    if name:
        hits = [x for x in sigs if x.name == name]
        if len(hits) != 1:
            raise UserError(
                f"{path}: {'no' if not hits else 'several'} signature(s) named {name!r}; it holds "
                f"{', '.join(x.name for x in sigs)}."
            )
        return hits[0]
    if len(sigs) > 1:
        raise UserError(
            f"{path} holds {len(sigs)} signatures ({', '.join(x.name for x in sigs)}); pick one with {path}::NAME."
        )
    return sigs[0]
