"""Writing what `AdapterBuilder` collected: a PEFT LoRA dir, or a Kohya-format LoRA file, plus the report.

PEFT (`write_peft`): `adapter_config.json` (made by PEFT's own `LoraConfig`: r = the largest rank with lora_alpha = r,
so the scaling is 1, and `rank_pattern`/`alpha_pattern` entries for the modules of other ranks, anchored to their
full names) and `adapter_model.safetensors` with PEFT's keys (`base_model.model.<module>.lora_A.weight`, ...,
`lora_embedding_A/B`, `lora_B.bias` with lora_bias, and the saved modules' tensors under their own names), so that
`PeftModel.from_pretrained(base, dir)` loads it.

Kohya (`write_kohya`): `pytorch_lora_weights.safetensors` (the file name diffusers' `load_lora_weights(dir)` looks
for) with `<prefix><module with . as _>.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` = rank (scaling
1); the prefix names the component: `lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from merging.extract.builder import AdapterBuilder, Row
from peft_lab.errors import UserError
from peft_lab.tree.safetensors import write_safetensors

__all__ = ["write_peft", "write_kohya", "write_report", "kohya_component", "REPORT_FILE", "KOHYA_FILE", "PREFIXES"]

REPORT_FILE = "adapter_report.csv"
KOHYA_FILE = "pytorch_lora_weights.safetensors"
PEFT_PREFIX = "base_model.model."
PREFIXES = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}


def _nothing(b: AdapterBuilder) -> None:
    if not b.entries:
        changed = [r.name for r in b.rows if r.action not in ("unchanged",)]
        raise UserError(
            "No matrix of the model changed, so there is no LoRA to write"
            + (f" (only {', '.join(changed[:5])} changed)." if changed else ": the models are identical.")
            + " Check that the two models differ."
        )


def _targets(modules: list[str], all_modules: Iterable[str]) -> list[str] | str:
    """target_modules: the full names, or a regex PEFT full-matches when its suffix matching would take others."""
    chosen = set(modules)
    if not any(n not in chosen and any(n.endswith("." + t) for t in modules) for n in all_modules):
        return list(modules)
    return "(?:" + "|".join(re.escape(t) for t in modules) + ")"


def write_peft(
    out: Path,
    b: AdapterBuilder,
    base_path: str | None,
    all_modules: Iterable[str],
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """The PEFT LoRA dir (module docstring). Returns the weight files written."""
    from peft import LoraConfig

    _nothing(b)
    entries = list(b.entries.values())
    r = max(e.rank for e in entries)
    pattern = {"^" + re.escape(e.module): e.rank for e in entries if e.rank != r}
    saved_modules = sorted(b.saved_modules)
    cfg = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=_targets([e.module for e in entries], all_modules),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        modules_to_save=saved_modules or None,
        lora_bias=b.lora_bias,
        fan_in_fan_out=any(e.kind == "conv1d_hf" for e in entries),
        base_model_name_or_path=base_path,
        inference_mode=True,
        init_lora_weights=True,
    )
    tensors: list = []
    for e in entries:
        p = PEFT_PREFIX + e.module
        if e.kind == "embedding":
            tensors += [(f"{p}.lora_embedding_A", e.A), (f"{p}.lora_embedding_B", e.B)]
            continue
        tensors += [(f"{p}.lora_A.weight", e.A), (f"{p}.lora_B.weight", e.B)]
        if b.lora_bias:
            bias = e.bias if e.bias is not None else torch.zeros(e.B.shape[0])
            tensors.append((f"{p}.lora_B.bias", bias.to(e.B.dtype)))
    entries_ = [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors]
    for name, leaf in b.saved_tensors().items():
        entries_.append((PEFT_PREFIX + name, leaf.dtype, tuple(leaf.shape), lambda leaf=leaf: leaf.dense(leaf.dtype)))
    weights = out / "adapter_model.safetensors"
    write_safetensors(weights, entries_, {"format": "pt", **(metadata or {})})
    cfg.save_pretrained(str(out))
    return [weights]


def kohya_component(component: str, base_dir: str | Path | None) -> str:
    """The Kohya component of the model the adapter is for: as given, or from its config (`auto`)."""
    if component != "auto":
        return component
    cfg = Path(base_dir) / "config.json" if base_dir is not None else None
    raw = json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else {}
    cls = raw.get("_class_name") or (raw.get("architectures") or [""])[0]
    if cls == "CLIPTextModelWithProjection":
        return "te2"
    if cls.startswith("CLIPTextModel") or raw.get("model_type") == "clip_text_model":
        return "te"
    if "_class_name" in raw:
        return "unet"
    raise UserError(
        f"adapter_format kohya: cannot tell from {cfg or 'the base'} whether the base is a UNet or a text encoder "
        "(its config names no diffusers or CLIP text class); give the component (unet, te, te1, te2)."
    )


def write_kohya(out: Path, b: AdapterBuilder, component: str, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """The Kohya-format LoRA file (module docstring). Returns the files written."""
    _nothing(b)
    prefix = PREFIXES[component]
    tensors = []
    for e in b.entries.values():
        k = prefix + e.module.replace(".", "_")
        tensors += [
            (f"{k}.alpha", torch.tensor(float(e.rank))),
            (f"{k}.lora_down.weight", e.A),
            (f"{k}.lora_up.weight", e.B),
        ]
    path = out / KOHYA_FILE
    entries = [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors]
    write_safetensors(path, entries, {"format": "pt", **(metadata or {})})
    return [path]


def write_report(out: Path, rows: list[Row]) -> Path:
    """The per-tensor report, one CSV row per changed (or not carried) tensor."""
    path = out / REPORT_FILE
    keep = [r for r in rows if r.action != "unchanged"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Row("", (), "", "").as_dict()))
        w.writeheader()
        for r in keep:
            w.writerow(r.as_dict())
    return path
