"""Which layers a robust weight signature keeps (`--layers`), counted in the model's own layer order.

A *module* is a parameter name without its last component (`conv1.weight` -> `conv1`); a *weight layer* is a
module with a float `weight` of dim >= 2 (linear, conv, embedding). Norm layers and biases ride along with the
weight layer before them. Files written by the safetensors library list tensors sorted by name, not in
forward order, so `in_forward_order` recovers the order from the model class named in `config.json` (built
on the meta device: no memory, no weights) before anything is counted.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from peft_lab.errors import UserError
from peft_lab.tree import Tree, matches

__all__ = ["LayerSelection", "weight_layers", "in_forward_order", "modules"]


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def modules(tree: Tree) -> dict[str, list[str]]:
    """module -> its float tensor names, in order of first appearance (state-dict order = forward order)."""
    out: dict[str, list[str]] = {}
    for name, leaf in tree.items():
        if leaf.dtype.is_floating_point:
            out.setdefault(_module(name), []).append(name)
    return out


def weight_layers(tree: Tree) -> list[str]:
    """Modules that own a float `weight` of dim >= 2 (linear, conv, embedding), in order: what `--layers N`
    counts. Norm layers and biases ride along with the weight layer before them."""
    return [
        m for m, names in modules(tree).items() if any(n.endswith("weight") and len(tree[n].shape) >= 2 for n in names)
    ]


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _registered_order(model_dir: Path) -> list[str] | None:
    """The state-dict order of the transformers/diffusers class named in `config.json`, built on the meta
    device (no memory, no weights); None when that is not possible."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        with torch.device("meta"):
            if cfg.get("architectures"):
                import transformers

                cls = getattr(transformers, cfg["architectures"][0])
                model = cls(transformers.AutoConfig.from_pretrained(model_dir))
            elif cfg.get("_class_name"):
                import diffusers

                model = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
            else:
                return None
        return list(model.state_dict())
    except Exception:  # any failure means: fall back to what the file tells
        return None


def in_forward_order(tree: Tree) -> tuple[Tree, str]:
    """`tree` reordered into the model's registration (≈ forward) order, which `--layers N` counts in, and
    where that order came from. Files written by the safetensors library list tensors sorted by name, so:
    "model class" (an HF/diffusers dir whose config names its class), "file" (a file that keeps the order it
    was written in, e.g. by peft-lab or `Tree.from_module`), or "natural" (a sorted file: names in natural
    order, numbers compared as numbers; check the kept layers, or select by pattern)."""
    names = list(tree)
    src = Path(str(tree.source))
    order = _registered_order(src) if (src / "config.json").is_file() else None
    if order and set(names) <= set(order):
        return tree.replace((n, tree[n]) for n in order if n in tree), "model class"
    if names != sorted(names):
        return tree, "file"
    return tree.replace((n, tree[n]) for n in sorted(names, key=_natural)), "natural"


@dataclass(frozen=True)
class LayerSelection:
    """Which modules a signature keeps. Exactly one rule, parsed from `--layers`:

    - `N` (int): every module up to the N-th weight layer (norm layers and biases after it in the
      state-dict order are kept with it, up to the next weight layer);
    - `PATTERN[,PATTERN...]`: modules or tensors matching a glob (`conv*`, `features.0.*`) or `re:REGEX`;
    - `rel:R`: modules whose change ‖θ_c − θ_clean‖/‖θ_clean‖ is at least R;
    - `all`; default (None): the shallow half, the first ⌈L/2⌉ of L weight layers (the paper keeps 7 of
      VGG-16's 16).
    """

    depth: int | None = None
    patterns: tuple[str, ...] = ()
    min_relative: float | None = None
    everything: bool = False

    def __post_init__(self):
        rules = sum([self.depth is not None, bool(self.patterns), self.min_relative is not None, self.everything])
        if rules > 1:
            raise UserError("--layers: give one rule (a depth N, patterns, rel:R or all), not several.")
        if self.depth is not None and self.depth < 1:
            raise UserError(f"--layers {self.depth}: the depth must be at least 1.")
        if self.min_relative is not None and not (self.min_relative >= 0):
            raise UserError(f"--layers rel:{self.min_relative}: R must be a non-negative number.")

    @classmethod
    def parse(cls, spec: str | int | None) -> LayerSelection:
        if spec is None or spec == "":
            return cls()
        if isinstance(spec, int):
            return cls(depth=spec)
        s = spec.strip()
        if s.isdigit():
            return cls(depth=int(s))
        if s == "all":
            return cls(everything=True)
        if s.startswith("rel:"):
            try:
                return cls(min_relative=float(s[4:]))
            except ValueError:
                raise UserError(f"--layers {spec!r}: rel: needs a number, e.g. rel:0.05.") from None
        return cls(patterns=tuple(p.strip() for p in s.split(",") if p.strip()))

    @property
    def counts_layers(self) -> bool:
        """True for the rules that count weight layers (and so depend on the model's layer order)."""
        return not (self.patterns or self.min_relative is not None or self.everything)

    def describe(self) -> str:
        if self.depth is not None:
            return f"depth:{self.depth}"
        if self.patterns:
            return "pattern:" + ",".join(self.patterns)
        if self.min_relative is not None:
            return f"rel:{self.min_relative:g}"
        return "all" if self.everything else "shallow-half"

    def modules(self, clean: Tree, robust: Tree) -> list[str]:
        """The kept modules of `clean` (checked against `robust` for `rel:`)."""
        mods = modules(clean)
        if self.everything:
            return list(mods)
        if self.patterns:
            kept = [
                m
                for m, names in mods.items()
                if matches(m, self.patterns) or any(matches(n, self.patterns) for n in names)
            ]
            if not kept:
                raise UserError(
                    f"--layers {','.join(self.patterns)}: no tensor of {clean.source} matches. Modules are named "
                    f"like {', '.join(list(mods)[:6])}; use a glob such as '{next(iter(mods), 'conv1')}*' or re:REGEX."
                )
            return kept
        if self.min_relative is not None:
            rel = {m: _relative_change(clean, robust, names) for m, names in mods.items()}
            kept = [m for m, r in rel.items() if r >= self.min_relative]
            if not kept:
                top = max(rel.items(), key=lambda kv: kv[1], default=("-", 0.0))
                raise UserError(
                    f"--layers rel:{self.min_relative:g}: no module changed that much between {clean.source} and "
                    f"{robust.source} (largest: {top[0]} at {top[1]:.3g}). Lower R."
                )
            return kept
        wl = weight_layers(clean)
        if not wl:
            raise UserError(f"{clean.source} has no weight layers (2-D+ weights) to count; select layers by pattern.")
        n = self.depth if self.depth is not None else math.ceil(len(wl) / 2)
        if n > len(wl):
            raise UserError(
                f"--layers {n}: {clean.source} has only {len(wl)} weight layers ({', '.join(wl[:8])}"
                f"{' ...' if len(wl) > 8 else ''}). Use a depth up to {len(wl)}, or 'all'."
            )
        stop = wl[n] if n < len(wl) else None
        kept = []
        for m in mods:
            if m == stop:
                break
            kept.append(m)
        return kept


def _relative_change(clean: Tree, robust: Tree, names: list[str]) -> float:
    num = den = 0.0
    for n in names:
        c = clean[n].dense()
        num += float((robust[n].dense() - c).double().pow(2).sum())
        den += float(c.double().pow(2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else (math.inf if num > 0 else 0.0)
