"""Opening inputs as trees, lazily.

A safetensors file, an HF model dir (sharded through its index or not) or a diffusers model dir becomes a tree of
`Lazy` leaves after reading only the JSON headers; files written by `save_tree` with structured leaves get those
leaves back; a Kohya/LyCORIS adapter file becomes a delta tree on the base (`peft_lab.tree.kohya`). A PEFT adapter
dir (LoRA, DoRA, LoKr) or a peft-lab adapter dir becomes a tree of structured deltas (`LowRank`, `Kronecker`, ...)
keyed by the base model's parameter names, marked as a delta tree.

Pickle files (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused unless `allow_pickle=True`: loading them can run
arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peft_lab.errors import UserError
from peft_lab.tree.core import Tree
from peft_lab.tree.dora import dora_delta
from peft_lab.tree.kohya import is_kohya, load_kohya
from peft_lab.tree.leaves import Dense, Kronecker, Lazy, Leaf, LowRank
from peft_lab.tree.ops import delta
from peft_lab.tree.safetensors import LEAVES_KEY, ST_TO_TORCH, TREE_KIND_KEY, read_header, read_tensor

__all__ = [
    "load_tree",
    "load_safetensors",
    "load_model_dir",
    "load_peft_dir",
    "load_own_adapter_dir",
    "model_weight_files",
    "is_delta",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PICKLE_SUFFIXES",
]

# peft-lab's own adapter dirs (adapters PEFT does not implement): this JSON + a delta tree in ADAPTER_WEIGHTS
ADAPTER_CONFIG = "peft_lab_adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# weight file stems written by transformers and diffusers
WEIGHT_STEMS = ("model", "diffusion_pytorch_model", "adapter_model")


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
        'safetensors once, from a source you trust: `python -c "import torch, safetensors.torch as st; '
        f"st.save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\"` "
        "(for a transformers model: `AutoModel.from_pretrained(dir).save_pretrained(dir, "
        "safe_serialization=True)`), or pass allow_pickle=true to load it anyway."
    )


def _load_pickle(path: Path) -> Tree:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as e:
        # a damaged or foreign file (MemoryError and KeyboardInterrupt are not the file's fault: they propagate)
        raise UserError(f"{path}: cannot load even with allow_pickle ({type(e).__name__}: {e}).") from None
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
            return load_kohya(p, base) if is_kohya(p) else load_safetensors(p)
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
        bad = [
            f"{k} {tuple(v.shape)} vs base {tuple(base[k].shape)}"
            for k, v in leaves.items()
            if tuple(v.shape) != tuple(base[k].shape)
        ]
        if bad:
            raise UserError(f"{d}: the adapter's deltas do not fit the base model: {'; '.join(bad[:10])}.")
    return Tree(leaves, source=str(d), meta={**raw.meta, TREE_KIND_KEY: "delta"})


# ---------------------------------------------------------------------------------------------------------
# PEFT adapter dirs -> delta trees
# ---------------------------------------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."
_LORA_PARTS = "lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
_LORA_RX = re.compile(rf"^(?P<mod>.+)\.(?P<part>{_LORA_PARTS})(\.[^.]+)?\.(?P<p>weight|bias)$")
_LORA_EMB_RX = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.[^.]+)?$")
_LOKR_RX = re.compile(
    r"^(?P<mod>.+)\.(?P<part>lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2)(\.[^.]+)?$"
)


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
    and fan_in_fan_out layouts transposed into the weight's layout); DoRA -> the exact delta of its merged weight
    (`peft_lab.tree.dora`, which needs `base`); LoKr -> `Kronecker(w1, w2, alpha/r)`
    (low-rank factors multiplied out: they are small). Fully trained modules (`modules_to_save`) become the
    delta `saved − base`, which needs `base`.
    """
    d = Path(adapter_dir)
    cfg = _peft_config(d)
    kind = cfg["peft_type"]
    groups, full = _peft_groups(_peft_weights(d, allow_pickle), kind)
    base_names = set(base) if base is not None else None
    where = str(d)
    r_default, a_default = cfg.get("r", 8), cfg.get("lora_alpha", cfg.get("alpha", 8))
    leaves: dict[str, Leaf] = {}
    for mod, parts in groups.items():
        r = _pattern_value(mod, cfg.get("rank_pattern"), r_default)
        alpha = _pattern_value(mod, cfg.get("alpha_pattern"), a_default)
        if kind == "LORA":
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            _add_lora(leaves, mod, parts, scale, bool(cfg.get("fan_in_fan_out")), base, base_names, where)
        else:
            _add_lokr(leaves, mod, parts, alpha / r, base, base_names, where)
    if full:
        if base is None:
            raise UserError(
                f"{d}: the adapter also saves whole modules ({', '.join(list(full)[:5])}); their delta needs the "
                "base model (give base_model)."
            )
        resolved = {_resolve(k, base_names, where): leaf for k, leaf in full.items()}
        leaves.update(delta(Tree(resolved, source=where), base).items())
    return Tree(leaves, source=where, meta={"peft_type": kind, TREE_KIND_KEY: "delta"})


def _peft_config(d: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((d / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{d / 'adapter_config.json'}: invalid JSON ({e}).") from None
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "LOKR"):
        raise UserError(f"{d}: PEFT adapter type {kind!r} is not supported as a delta tree (LORA and LOKR are).")
    return cfg


def _peft_weights(d: Path, allow_pickle: bool) -> Tree:
    weights = d / "adapter_model.safetensors"
    if weights.exists():
        return load_safetensors(weights)
    b = d / "adapter_model.bin"
    if not b.exists():
        raise UserError(f"{d}: no adapter_model.safetensors.")
    if not allow_pickle:
        raise UserError(_pickle_message(b))
    return _load_pickle(b)


def _peft_groups(raw: Tree, kind: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Leaf]]:
    """({module: {factor part: tensor}}, {name: leaf} of fully saved modules) from a PEFT weights file."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, Leaf] = {}
    for key in raw:
        k = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        m = (_LORA_RX.match(k) or _LORA_EMB_RX.match(k)) if kind == "LORA" else _LOKR_RX.match(k)
        if m:
            part = m.group("part") + ("_bias" if m.groupdict().get("p") == "bias" else "")
            groups.setdefault(m.group("mod"), {})[part] = raw[key].dense(None)
        else:
            full[k.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")] = raw[key]
    return groups, full


def _add_lora(
    leaves: dict[str, Leaf],
    mod: str,
    parts: dict[str, torch.Tensor],
    scale: float,
    fan_in_fan_out: bool,
    base: Tree | None,
    base_names: set[str] | None,
    where: str,
) -> None:
    if "lora_embedding_A" in parts:  # A (r, num), B (dim, r); weight (num, dim) = (B A)^T
        leaf = LowRank(parts["lora_embedding_A"].T, parts["lora_embedding_B"].T, scale)
    else:
        A, B = parts["lora_A"], parts["lora_B"]
        if fan_in_fan_out:  # GPT-2 Conv1D stores W^T
            leaf = LowRank(A.reshape(A.shape[0], -1).T, B.reshape(B.shape[0], -1).T, scale)
        else:
            leaf = LowRank(B, A, scale)
        if "lora_B_bias" in parts:
            leaves[_resolve(f"{mod}.bias", base_names, where)] = Dense(scale * parts["lora_B_bias"].float())
    wname = _resolve(f"{mod}.weight", base_names, where)
    if base is not None and tuple(base[wname].shape) != tuple(leaf.shape):
        if leaf.numel != base[wname].numel:
            raise UserError(
                f"{where}: the delta for {wname} has shape {tuple(leaf.shape)} "
                f"but the base has {tuple(base[wname].shape)}."
            )
        leaf = LowRank(leaf.B, leaf.A, leaf.scale, base[wname].shape)  # conv LoRA: (out, in, k, k)
    if "lora_magnitude_vector" in parts:
        if base is None:
            raise UserError(
                f"{where}: a DoRA adapter's change depends on the base weights (their norms); give the base model."
            )
        transposed = "lora_embedding_A" in parts or fan_in_fan_out
        leaf = dora_delta(base[wname], leaf, parts["lora_magnitude_vector"], transposed)
    leaves[wname] = leaf


def _add_lokr(
    leaves: dict[str, Leaf],
    mod: str,
    parts: dict[str, torch.Tensor],
    scale: float,
    base: Tree | None,
    base_names: set[str] | None,
    where: str,
) -> None:
    if "lokr_t2" in parts:
        raise UserError(f"{where}: LoKr with use_effective_conv2d (Tucker factor) is not supported as a delta tree.")
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    wname = _resolve(f"{mod}.weight", base_names, where)
    leaves[wname] = Kronecker(w1, w2, scale, base[wname].shape if base is not None else None)
