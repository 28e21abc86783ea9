"""Where each tensor sits in a model's stack of layers: what a per-layer gradient in a recipe is interpolated over.

Derived from the tensor names rather than a table per architecture: a name whose dotted path has a numeric
component right after a non-numeric one (`model.layers.7.mlp.up_proj.weight`, `transformer.h.3.attn.c_attn.weight`,
`bert.encoder.layer.2.output.dense.bias`, `encoder.block.5.layer.0.SelfAttention.q.weight`) is in layer 7, 3, 2, 5
of the stack named by the path before the number (`model.layers`, `transformer.h`, ...). Each stack counts its
own layers, so an encoder-decoder (T5's `encoder.block` and `decoder.block`) gives both stacks positions from 0
to 1, as mergekit's separate modules do. Only the first number counts (an expert index deeper in the name does
not start a stack). The layer position of layer i in a stack of n is i/(n − 1) (1 when n = 1); every tensor
outside the stacks (embeddings, final norm, head) is at 0, where mergekit plans them.

A model's `config.json` names its layer count (`num_hidden_layers`, `n_layer`, `num_layers`, ...): when the
stack with the most layers disagrees with it, the names cannot be trusted to say where each tensor is, and
`layer_positions` refuses with an error naming a tensor.

Slices need one more fact about the tensors outside the stacks: whether each comes before the layers (embeddings,
which take the first slice's inputs) or after them (final norm, head: the last slice's). `sides` reads it from the
order transformers registers the model's parameters in (the model built from its config on the meta device, so
nothing is allocated), and falls back on the names (`embed`, `wte`, ... before; `norm`, `head`, ... after) for
models transformers cannot build; a tensor neither decides is refused, named.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_lab.errors import UserError

__all__ = ["LayerIndex", "layer_index", "layer_positions", "config_layers", "LAYER_COUNT_KEYS", "sides",
           "stacks_of", "read_config"]  # fmt: skip

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers")
_NUMERIC = re.compile(r"\d+")


@dataclass(frozen=True)
class LayerIndex:
    """A tensor's place in a stack: the stack's name (the path before the layer number) and the layer number."""

    stack: str
    index: int


def layer_index(name: str) -> LayerIndex | None:
    """The stack and layer of a tensor name, or None for a tensor outside every stack."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        if _NUMERIC.fullmatch(parts[i]) and not _NUMERIC.fullmatch(parts[i - 1]):
            return LayerIndex(".".join(parts[:i]), int(parts[i]))
    return None


def config_layers(config: Mapping[str, Any] | str | Path | None) -> int | None:
    """The layer count a model config (a dict, or the path of a model dir / its config.json) declares."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        p = Path(config)
        p = p / "config.json" if p.is_dir() else p
        if p.name != "config.json" or not p.is_file():
            return None
        config = json.loads(p.read_text())
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return config_layers(text) if isinstance(text, Mapping) else None


def _declared_counts(config: Mapping[str, Any] | str | Path | None) -> set[int]:
    """Every layer count a config declares (an encoder-decoder has one per stack)."""
    if config is not None and not isinstance(config, Mapping):
        config = read_config(config if Path(config).is_dir() else Path(config).parent)
    if not config:
        return set()
    out = {config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int) and not isinstance(config[k], bool)}
    text = config.get("text_config")
    return out or (_declared_counts(text) if isinstance(text, Mapping) else set())


def layer_positions(names: Iterable[str], config: Mapping[str, Any] | str | Path | None = None) -> dict[str, float]:
    """name -> layer position t in [0, 1] (module docstring).

    Args:
        names: the model's tensor names.
        config: its config (dict or model dir), to check the layer count the names imply.
    """
    names = list(names)
    where = {n: layer_index(n) for n in names}
    counts: dict[str, int] = {}
    for loc in where.values():
        if loc is not None:
            counts[loc.stack] = max(counts.get(loc.stack, 0), loc.index + 1)
    declared = _declared_counts(config)
    if declared and counts and max(counts.values()) not in declared:
        stack = max(counts, key=counts.get)
        example = next(n for n, loc in where.items() if loc is not None and loc.stack == stack)
        raise UserError(
            f"The tensor names put {counts[stack]} layers in the stack {stack!r} (e.g. {example}) but the model's "
            f"config declares {' or '.join(map(str, sorted(declared)))}: the layer position of each tensor, which a "
            "per-layer gradient in the recipe needs, cannot be decided. Give scalar parameters, or check the model "
            "files."
        )
    out = {}
    for n, loc in where.items():
        if loc is None:
            out[n] = 0.0
        else:
            count = counts[loc.stack]
            out[n] = loc.index / (count - 1) if count > 1 else 1.0
    return out


def read_config(model_dir: str | Path | None) -> dict[str, Any] | None:
    """A model dir's config.json as a dict (None without one)."""
    if model_dir is None:
        return None
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e}).") from None


def stacks_of(names: Iterable[str]) -> dict[str, int]:
    """stack name -> its layer count (from the numbers in the names)."""
    counts: dict[str, int] = {}
    for n in names:
        loc = layer_index(n)
        if loc is not None:
            counts[loc.stack] = max(counts.get(loc.stack, 0), loc.index + 1)
    return counts


@functools.lru_cache(maxsize=16)
def _module_order(model_dir: str) -> tuple[str, ...] | None:
    """The model's parameter names in the order transformers registers them (None when it cannot build it)."""
    cfg = read_config(model_dir) or {}
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        return None
    with contextlib.suppress(Exception):  # an architecture transformers does not know, remote code, ...
        import torch
        import transformers

        cls = getattr(transformers, archs[0], None)
        if cls is None:
            return None
        config = transformers.AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = cls(config)
        return tuple(model.state_dict())
    return None


_BEFORE = ("embed", "wte", "wpe", "shared", "tok_embeddings", "word_embeddings", "position_embeddings")
_AFTER = ("norm", "ln_f", "lm_head", "head", "pooler", "classifier", "score", "predictions", "output")


def _by_name(name: str) -> str | None:
    leaf = name.lower()
    if any(w in leaf for w in _BEFORE):
        return "pre"
    if any(w in leaf for w in _AFTER):
        return "post"
    return None


def sides(names: Sequence[str], stack: str, model_dir: str | Path | None) -> dict[str, str]:
    """For each tensor outside the layer stack `stack` (of those in `names`): "pre" (before the layers) or "post".

    Raises:
        UserError: a tensor whose place neither the model's module order nor its name decides.
    """
    order = _module_order(str(Path(model_dir).resolve())) if model_dir is not None else None
    first = None
    if order is not None:
        first = next((i for i, n in enumerate(order) if n.startswith(f"{stack}.0.")), None)
    pos = {n: i for i, n in enumerate(order or ())}
    out = {}
    for n in names:
        loc = layer_index(n)
        if loc is not None and loc.stack == stack:
            continue
        side = ("pre" if pos[n] < first else "post") if first is not None and n in pos else _by_name(n)
        if side is None:
            raise UserError(
                f"Tensor {n} is outside the layers of {stack!r}, and neither the model's module order "
                "(transformers cannot build it from config.json) nor its name says whether it comes before the "
                "layers (embeddings: taken from the first slice) or after them (final norm, head: from the last "
                "slice); slices cannot be planned for this model. Merge whole models (`models:`) instead."
            )
        out[n] = side
    return out
