"""Kohya / LyCORIS single-file adapters (the format of kohya sd-scripts and the diffusion UIs) as delta trees.

One safetensors file; each adapted module is `<prefix><module path with . as _>.<factor>`, the prefix naming the
component: `lora_unet_` (the UNet), `lora_te_` / `lora_te1_` (the text encoder), `lora_te2_` (SDXL's second one).

- LoRA / LoCon: `lora_down.weight` A (r, in[, k…]), `lora_up.weight` B (out, r[, 1…]), `alpha`:
  ΔW = alpha/r · B A (no alpha: 1).
- LoHa: `hada_w1_a` (out, r), `hada_w1_b` (r, in·k…), `hada_w2_a`, `hada_w2_b`, `alpha`:
  ΔW = alpha/r · (w1_a w1_b) ⊙ (w2_a w2_b).
- LoKr: `lokr_w1` or `lokr_w1_a` `lokr_w1_b`, `lokr_w2` or `lokr_w2_a` `lokr_w2_b`, `alpha`: ΔW = scale · w1 ⊗ w2,
  scale = alpha/r when a factor is rank-decomposed (r its inner size, w2's first), else 1 (LyCORIS; diffusers
  reads it the same way).

Names are mapped onto the base model's: first exactly (sd-scripts names a module by its diffusers path with `.` as
`_`), then, for UNets saved in the original (SGM/LDM) layout, through diffusers' own key conversion
(`_maybe_map_sgm_blocks_to_diffusers`, `_convert_unet_lora_key`). Entries of a component the base is not (a text
encoder's, on a UNet base) are left out with a warning; keys that map to nothing are an error naming them.
Tucker factors (`hada_t1`, `lokr_t2`, `lora_mid`) and DoRA scales (`dora_scale`) are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from peft_lab.errors import UserError
from peft_lab.tree.core import Tree
from peft_lab.tree.leaves import Dense, Leaf, LowRank, Thunk
from peft_lab.tree.safetensors import TREE_KIND_KEY, read_header, read_tensor

__all__ = ["is_kohya", "load_kohya", "KOHYA_PREFIXES"]

log = logging.getLogger("peft_lab.tree")

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
_FACTORS = {
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
_REFUSED = {
    "hada_t1": "LoHa with Tucker factors",
    "hada_t2": "LoHa with Tucker factors",
    "lokr_t2": "LoKr with a Tucker factor",
    "lora_mid.weight": "LoCon with a Tucker (mid) factor",
    "dora_scale": "DoRA",
}
_KNOWN = {f for fs in _FACTORS.values() for f in fs} | {"alpha"} | set(_REFUSED)


def is_kohya(path: str | os.PathLike) -> bool:
    """A safetensors file whose keys are Kohya/LyCORIS adapter keys (`lora_unet_…`, `lora_te…`)."""
    header, _ = read_header(path)
    return bool(header) and all(k.startswith(KOHYA_PREFIXES) for k in header)


def _prefix(module: str) -> str:
    return next(p for p in KOHYA_PREFIXES if module.startswith(p))


def _groups(header: dict) -> dict[str, dict[str, str]]:
    """{kohya module: {factor: key}} (a module is the key up to its first dot)."""
    out: dict[str, dict[str, str]] = {}
    for key in header:
        module, _, factor = key.partition(".")
        out.setdefault(module, {})[factor] = key
    return out


def _table(base: Tree) -> dict[str, str]:
    """underscored module path -> module, for every module of the base with a weight."""
    return {n[: -len(".weight")].replace(".", "_"): n[: -len(".weight")] for n in base if n.endswith(".weight")}


def _unet_config(base: Tree) -> SimpleNamespace | None:
    cfg = Path(base.source) / "config.json"
    if not cfg.is_file():
        return None
    raw = json.loads(cfg.read_text())
    return SimpleNamespace(**raw) if "layers_per_block" in raw else None


def _via_diffusers(modules: list[str], base: Tree) -> dict[str, str]:
    """Kohya UNet modules in the SGM/LDM layout -> base modules, through diffusers' own key conversion."""
    try:
        from diffusers.loaders.lora_conversion_utils import (
            _convert_unet_lora_key,
            _maybe_map_sgm_blocks_to_diffusers,
        )
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return {}
    cfg = _unet_config(base)
    keys = {f"{m}.lora_down.weight": m for m in modules if m.startswith("lora_unet_")}
    if not keys:
        return {}
    try:  # the values travel with the renamed keys: {new key: kohya module}
        mapped = _maybe_map_sgm_blocks_to_diffusers(dict(keys), cfg) if cfg is not None else dict(keys)
    except (ValueError, KeyError, IndexError, AttributeError):
        mapped = dict(keys)
    table = _table(base)
    out = {}
    for new, module in mapped.items():
        body = new[len("lora_unet_") : -len(".lora_down.weight")]
        if body in table:
            out[module] = table[body]
            continue
        name = _convert_unet_lora_key(new)
        name = re.sub(r"(_lora|\.lora|\.lora_linear_layer)\.down\.weight$", "", name).replace(".processor.", ".")
        name = re.sub(r"\.to_out$", ".to_out.0", name)
        if f"{name}.weight" in base:
            out[module] = name
    return out


def _resolve(groups: dict[str, dict[str, str]], base: Tree, where: str) -> dict[str, str]:
    """kohya module -> base module for the components the base holds (module docstring)."""
    bad = [m for m in groups if not m.startswith(KOHYA_PREFIXES)]
    table = _table(base)
    found = {m: table[m[len(_prefix(m)) :]] for m in groups if m not in bad and m[len(_prefix(m)) :] in table}
    rest = [m for m in groups if m not in found and m not in bad]
    found.update(_via_diffusers(rest, base))
    by_prefix: dict[str, list[str]] = {}
    for m in groups:
        if m not in bad:
            by_prefix.setdefault(_prefix(m), []).append(m)
    used = {p for p, ms in by_prefix.items() if any(m in found for m in ms)}
    unmapped = bad + [m for p in used for m in by_prefix[p] if m not in found]
    if unmapped or not used:
        first = unmapped or list(groups)
        raise UserError(
            f"{where}: cannot map these Kohya keys onto the base model {base.source} (its modules have other names, "
            f"or the layout is not Kohya/LyCORIS's): {', '.join(first[:5])}"
            + (f" and {len(first) - 5} more" if len(first) > 5 else "")
            + ". Is this adapter for this base model (a UNet file on the UNet, a text-encoder file on the text "
            "encoder)?"
        )
    for p in set(by_prefix) - used:
        log.warning(
            "%s: %d %s* module(s) are for another component than %s; left out", where, len(by_prefix[p]), p, base.source
        )
    return found


def _t(path: str, key: str) -> torch.Tensor:
    return read_tensor(path, key).float()


def _alpha(path: str, factors: dict[str, str], rank: int) -> float:
    return float(_t(path, factors["alpha"]).reshape(-1)[0]) / rank if "alpha" in factors else 1.0


def _leaf(path: str, factors: dict[str, str], shape: tuple[int, ...], where: str) -> Leaf:
    if {"lora_down.weight", "lora_up.weight"} <= set(factors):
        A, B = _t(path, factors["lora_down.weight"]), _t(path, factors["lora_up.weight"])
        return LowRank(B, A, _alpha(path, factors, A.shape[0]), shape)
    if set(_FACTORS["loha"]) <= set(factors):
        w = {f: Dense(_t(path, factors[f])) for f in _FACTORS["loha"]}
        scale = _alpha(path, factors, w["hada_w1_b"].shape[0])

        def loha(w1a, w1b, w2a, w2b):
            prod = (w1a @ w1b.reshape(w1b.shape[0], -1)) * (w2a @ w2b.reshape(w2b.shape[0], -1))
            return (scale * prod).reshape(shape)

        return Thunk(loha, [w[f] for f in _FACTORS["loha"]], shape, torch.float32, name="loha")
    has = set(factors)
    if ({"lokr_w1"} <= has or {"lokr_w1_a", "lokr_w1_b"} <= has) and (
        {"lokr_w2"} <= has or {"lokr_w2_a", "lokr_w2_b"} <= has
    ):
        return _lokr(path, factors, shape)
    raise UserError(f"{where}: incomplete adapter factors for one module: {', '.join(sorted(factors.values()))}.")


def _lokr(path: str, factors: dict[str, str], shape: tuple[int, ...]) -> Leaf:
    def factor(i: int) -> tuple[torch.Tensor, int | None]:
        if f"lokr_w{i}" in factors:
            return _t(path, factors[f"lokr_w{i}"]), None
        a, b = _t(path, factors[f"lokr_w{i}_a"]), _t(path, factors[f"lokr_w{i}_b"])
        return a @ b.reshape(b.shape[0], -1), b.shape[0]

    w1, r1 = factor(1)
    w2, r2 = factor(2)
    rank = r2 if r2 is not None else r1
    scale = _alpha(path, factors, rank) if rank is not None else 1.0
    K = torch.kron(w1, w2.reshape(w2.shape[0], -1))
    if K.numel() != math.prod(shape):
        raise UserError(f"{path}: LoKr factors {tuple(w1.shape)} ⊗ {tuple(w2.shape)} do not fit a weight of {shape}.")
    return Dense((scale * K).reshape(shape))


def load_kohya(path: str | os.PathLike, base: Tree | None) -> Tree:
    """A Kohya/LyCORIS adapter file as a delta tree keyed by the base model's weight names (module docstring)."""
    path = str(path)
    if base is None:
        raise UserError(
            f"{path} is a Kohya-format adapter (changes to a model); its module names are mapped onto the base "
            "model's: give the base model (base_model)."
        )
    header, _ = read_header(path)
    groups = _groups(header)
    odd = sorted({f for fs in groups.values() for f in fs if f not in _KNOWN})
    refused = sorted({_REFUSED[f] for fs in groups.values() for f in fs if f in _REFUSED})
    if odd or refused:
        what = f"unknown factor(s) {', '.join(odd[:5])}" if odd else f"{', '.join(refused)} (not supported)"
        raise UserError(f"{path}: {what}. Supported: LoRA/LoCon, LoHa and LoKr without Tucker factors.")
    names = _resolve(groups, base, path)
    leaves: dict[str, Leaf] = {}
    for kohya, module in names.items():
        wname = f"{module}.weight"
        leaves[wname] = _leaf(path, groups[kohya], tuple(base[wname].shape), path)
    order = [n for n in base if n in leaves]
    return Tree({n: leaves[n] for n in order}, source=path, meta={TREE_KIND_KEY: "delta", "format": "kohya"})
