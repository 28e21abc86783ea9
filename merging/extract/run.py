"""`run_extract(base, model, out, ...)`: what `peft-lab extract` does.

A full fine-tune (HF dir, sharded or not, or a .safetensors file) and its base become a LoRA: each changed
matrix's delta `fine-tuned − base` is read (two tensors), factored by a truncated SVD (`peft_lab.tree.lowrank`) and
dropped, one matrix at a time; the adapter's factors are all that is kept. The input may also be an adapter dir
(LoKr, sparse, LoRA of another rank, DoRA: any delta tree) on `base`. Everything is written into a temporary dir
that is renamed to OUT_DIR only when complete (`peft_lab.tree.fs.atomic_output_dir`), with the per-tensor report
(`adapter_report.csv`) and `extract.json` (inputs, settings, summary) beside the adapter.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from merging.extract.builder import AdapterBuilder
from merging.extract.modules import ModuleMap, module_map
from merging.extract.settings import AdapterSettings, adapter_keys_to_dict
from merging.extract.writers import kohya_component, write_kohya, write_peft, write_report
from peft_lab.errors import UserError
from peft_lab.params import build
from peft_lab.tree import Dense, Lazy, Leaf, Tree, apply, atomic_output_dir, is_delta, load_tree
from peft_lab.tree.fs import guard_output

__all__ = ["run_extract", "write_adapter", "EXTRACT_KIND", "EXTRACT_RECORD"]

log = logging.getLogger("peft_lab.extract")

EXTRACT_KIND = "extract"
EXTRACT_RECORD = "extract.json"
SETTING_KEYS = (
    "rank",
    "energy",
    "max_rank",
    "rank_pattern",
    "format",
    "bias",
    "embeddings",
    "svd",
    "dtype",
    "component",
)


def run_extract(
    base: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool | None = None,
    **settings: Any,
) -> Path:
    """Extract a LoRA from `model` (a fine-tune of `base`, or an adapter dir on it) into `out`.

    Args:
        base: the base model (HF dir or .safetensors file).
        model: the fine-tuned model, or an adapter dir on `base`.
        out: the output dir (a PEFT LoRA dir, or a dir holding a Kohya file with `format="kohya"`).
        **settings: `AdapterSettings` fields: rank | energy [+ max_rank], rank_pattern, format, bias, embeddings,
            svd, dtype, component.
    Returns:
        The output dir.
    """
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise UserError(f"peft-lab extract: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_KEYS)}.")
    s = build(AdapterSettings, {k: v for k, v in settings.items() if v is not None}, where="peft-lab extract")
    if s.needs_rank:
        raise UserError("peft-lab extract: give --rank R, or --energy F (with --max-rank R), or a rank_pattern.")
    for p in (base, model):
        if not Path(p).exists():
            raise UserError(f"{p}: no such file or directory.")
    base_tree = load_tree(base, allow_pickle=allow_pickle)
    if is_delta(base_tree):
        raise UserError(f"--base {base} is an adapter (a set of changes); the base must be a full model.")
    tuned = load_tree(model, base=base_tree, allow_pickle=allow_pickle)
    target = guard_output(out, [base, model], kind=EXTRACT_KIND, overwrite=overwrite)
    pairs = _pairs(tuned, base_tree, is_delta(tuned))
    ref = base_tree if is_delta(tuned) else tuned
    shapes = {n: tuple(leaf.shape) for n, leaf in ref.items() if leaf.dtype.is_floating_point}
    dirs = [base] if is_delta(tuned) else [model, base]
    modules = module_map(dirs, shapes)
    builder = AdapterBuilder(s, modules, ref)
    builder.check_ranks(shapes)
    component = kohya_component(s.component, base if Path(base).is_dir() else None) if s.format == "kohya" else None
    t0 = time.perf_counter()
    with atomic_output_dir(target, kind=EXTRACT_KIND, overwrite=overwrite) as tmp:
        with _bar(progress, len(pairs)) as bar:
            for name, delta, final, new in pairs:
                builder.add(name, delta(), final, new=new)
                _trim()
                bar.update(1)
        builder.finish()
        write_adapter(tmp, builder, s, str(base), modules, component)
        record = {
            "base": str(base),
            "model": str(model),
            "settings": adapter_keys_to_dict(s),
            "seconds": round(time.perf_counter() - t0, 3),
            "summary": builder.summary(),
        }
        (tmp / EXTRACT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    _log_summary(builder)
    return target


def write_adapter(
    tmp: Path,
    b: AdapterBuilder,
    s: AdapterSettings,
    base: str | None,
    modules: ModuleMap,
    component: str | None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """The adapter (PEFT dir or Kohya file) and the report into `tmp`; returns the weight files."""
    if s.format == "kohya":
        files = write_kohya(tmp, b, component or "unet", metadata)
    else:
        names = set(modules.infos) | {n.rpartition(".")[0] for n in b.base}
        files = write_peft(tmp, b, base, names, metadata)
    write_report(tmp, b.rows)
    return files


def _pairs(tuned: Tree, base: Tree, delta_input: bool) -> list[tuple[str, Any, Leaf | None, str]]:
    """(name, delta() -> Leaf | None, final value, why it is new or "") for each float tensor, in order."""
    out = []
    if delta_input:
        full = apply(base, tuned)
        for name, leaf in base.items():
            if leaf.dtype.is_floating_point and name in tuned:
                out.append((name, lambda d=tuned[name]: d, full[name], ""))
        return out
    base_names = set(base)
    for name, leaf in tuned.items():
        if not leaf.dtype.is_floating_point:
            continue
        b = _counterpart(name, base_names)
        if b is None:
            out.append((name, lambda: None, leaf, "not in the base model"))
        elif tuple(base[b].shape) != tuple(leaf.shape):
            why = f"shape {tuple(leaf.shape)}, the base's {tuple(base[b].shape)}"
            out.append((name, lambda: None, leaf, why))
        else:
            out.append((name, lambda t=leaf, b=base[b]: _delta(t, b), leaf, ""))
    return out


def _delta(tuned: Leaf, base: Leaf) -> Leaf | None:
    d = tuned.dense(torch.float32)
    b = base.dense(None)  # in its own dtype: the subtraction casts element by element, no float32 copy of the base
    if isinstance(tuned, Lazy) or tuned.dtype != torch.float32:  # a fresh tensor: subtract in place
        d.sub_(b)
    else:
        d = d - b.float()
    return Dense(d) if bool(d.any()) else None


def _counterpart(name: str, base_names: set[str]) -> str | None:
    """The base's name for a fine-tuned tensor: the same, or with a task model's prefix dropped or added
    (`bert.encoder…` in a classifier against `encoder…` in a bare model, or the other way round)."""
    if name in base_names:
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[i:]) in base_names:
            return ".".join(parts[i:])
    hits = [b for b in base_names if b.endswith("." + name)]
    return hits[0] if len(hits) == 1 else None


def _trim() -> None:
    """Give the freed heap back to the system after each matrix: glibc keeps blocks under its mmap threshold (up to
    32 MB) in the heap, and a model's worth of them would otherwise raise the resident set (measured: 1.45–1.77 GB
    peak on a 0.4B model without, the live set of the largest matrix with)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _bar(progress: bool | None, total: int):
    show = progress if progress is not None else sys.stderr.isatty()
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="extract", unit="tensor", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def _log_summary(b: AdapterBuilder) -> None:
    s = b.summary()
    log.info(
        "%d LoRA matrices (ranks %s, %s parameters), relative error mean %.4g, max %.4g; %d module(s) saved whole; "
        "%d tensor(s) not carried",
        s["lora_matrices"],
        ",".join(map(str, s["ranks"])),
        f"{s['lora_params']:,}",
        s["mean_error"],
        s["max_error"],
        len(s["saved_modules"]),
        len(s["not_carried"]),
    )
