"""The output's config.json: the donor's (the base model's, else the first model's), rewritten to match the output.

- dtype: `dtype` / `torch_dtype` set to the recipe's output dtype, when one is given.
- layers (`slices:` / `modules:`): the layer-count key of each stack (`num_hidden_layers`, `n_layer`, T5's
  `num_layers` / `num_decoder_layers`) set to the output's count; every per-layer list (`layer_types`, and any
  other list with one entry per layer whose key names layers or windows) rebuilt from the entry of each output
  layer's source layer, read from that source model's config. (mergekit 0.1.5 sets the count only, which
  transformers refuses for models with `layer_types`.)
- vocabulary (a built tokenizer): `vocab_size` set to the output's embedding rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merging.architecture import LAYER_COUNT_KEYS
from merging.grammar import ModelRef

__all__ = ["rewrite_config"]

log = logging.getLogger(__name__)


def _scopes(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The dicts a model's settings live in: the config and its text config (multimodal models)."""
    return [cfg] + ([cfg["text_config"]] if isinstance(cfg.get("text_config"), dict) else [])


def _count_key(cfg: dict[str, Any], stack: str, count: int) -> tuple[dict[str, Any], str] | None:
    """(dict, key) of the layer count of `stack` (whose input has `count` layers)."""
    for d in _scopes(cfg):
        keys = [k for k in LAYER_COUNT_KEYS if d.get(k) == count and not isinstance(d.get(k), bool)]
        if "decoder" in stack and "num_decoder_layers" in keys:
            return d, "num_decoder_layers"
        keys = [k for k in keys if k != "num_decoder_layers"] or keys
        if keys:
            return d, keys[0]
    return None


def _per_layer(d: Mapping[str, Any], count: int) -> list[str]:
    return [k for k, v in d.items() if isinstance(v, list) and len(v) == count and ("layer" in k or "window" in k)]


def _source_list(cfg: Mapping[str, Any] | None, where: int, key: str, count: int | None) -> list | None:
    if not cfg:
        return None
    scopes = _scopes(dict(cfg))
    d = scopes[where] if where < len(scopes) else None
    v = d.get(key) if d is not None else None
    return v if isinstance(v, list) and (count is None or len(v) == count) else None


def _rewrite_layers(
    cfg: dict[str, Any],
    stack: str,
    layers: Sequence[tuple[ModelRef, int]],
    in_count: int,
    configs: Mapping[tuple, Mapping[str, Any] | None],
    counts: Mapping[tuple, int],
) -> None:
    found = _count_key(cfg, stack, in_count)
    if found is None:
        log.warning("config.json: no layer count of %d for %s; set it to %d by hand", in_count, stack, len(layers))
        return
    d, key = found
    where = _scopes(cfg).index(d)
    for lk in _per_layer(d, in_count):
        donor = d[lk]
        new = []
        for ref, i in layers:
            src = _source_list(configs.get(ref.key), where, lk, counts.get(ref.key))
            new.append((src or donor)[i] if i < len(src or donor) else donor[-1])
        d[lk] = new
    d[key] = len(layers)


def rewrite_config(
    path: Path,
    *,
    dtype: str | None,
    layers: Mapping[str, Sequence[tuple[ModelRef, int]]] | None = None,
    in_counts: Mapping[str, int] | None = None,
    configs: Mapping[tuple, Mapping[str, Any] | None] | None = None,
    model_counts: Mapping[tuple, Mapping[str, int]] | None = None,
    vocab_rows: int | None = None,
) -> None:
    """Rewrite the output's config.json in place (module docstring).

    Args:
        path: the output's config.json.
        dtype: the output dtype's name (None: unchanged).
        layers: stack -> (source model, source layer) of each output layer.
        in_counts: stack -> the donor's layer count.
        configs: model key -> its config (for per-layer lists).
        model_counts: model key -> stack -> its layer count.
        vocab_rows: the output's embedding rows, when a tokenizer was built.
    """
    cfg = json.loads(path.read_text())
    for stack, out_layers in (layers or {}).items():
        counts = {k: c.get(stack, 0) for k, c in (model_counts or {}).items()}
        _rewrite_layers(cfg, stack, out_layers, (in_counts or {})[stack], configs or {}, counts)
    if vocab_rows is not None:
        scopes = [d for d in _scopes(cfg) if "vocab_size" in d] or [cfg]
        scopes[-1]["vocab_size"] = vocab_rows
    if dtype is not None:
        for d in _scopes(cfg):
            for k in ("dtype", "torch_dtype"):
                if k in d:
                    d[k] = dtype
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
