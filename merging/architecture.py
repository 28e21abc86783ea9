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
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_lab.errors import UserError

__all__ = ["LayerIndex", "layer_index", "layer_positions", "config_layers", "LAYER_COUNT_KEYS"]

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
    declared = config_layers(config)
    if declared is not None and counts and max(counts.values()) != declared:
        stack = max(counts, key=counts.get)
        example = next(n for n, loc in where.items() if loc is not None and loc.stack == stack)
        raise UserError(
            f"The tensor names put {counts[stack]} layers in the stack {stack!r} (e.g. {example}) but the model's "
            f"config declares {declared}: the layer position of each tensor, which a per-layer gradient in the "
            "recipe needs, cannot be decided. Give scalar parameters, or check the model files."
        )
    out = {}
    for n, loc in where.items():
        if loc is None:
            out[n] = 0.0
        else:
            count = counts[loc.stack]
            out[n] = loc.index / (count - 1) if count > 1 else 1.0
    return out
