"""Which modules an adapter adapts, and which it trains in full (`modules_to_save`).

Patterns follow `peft_lab.tree.matches` on module names: a dotted suffix (`query` matches
`bert.encoder.layer.0.attention.self.query`), a glob on the full name (`*.attn1.to_q`), or `re:<regex>`.
Defaults when `target_modules` is None:
- transformers models: PEFT's LoRA table by `config.model_type` (BERT: `query`, `value`; LLaMA: `q_proj`,
  `v_proj`; ...), the convention PEFT users know;
- diffusers models: the attention projections `to_q`, `to_k`, `to_v`, `to_out.0` (what the diffusers LoRA
  training scripts and DiffuseKronA adapt);
- anything else (or a model type PEFT does not list): every layer of a type the adapter supports, except
  the `modules_to_save`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from peft_lab.errors import UserError
from peft_lab.tree import matches

__all__ = ["resolve_targets", "resolve_modules_to_save", "default_targets", "DIFFUSERS_TARGETS", "HEAD_NAMES"]

log = logging.getLogger("peft_lab.adapters")

DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# task heads of transformers task models (PEFT's SEQ_CLS/TOKEN_CLS/QUESTION_ANS defaults)
HEAD_NAMES = ("classifier", "score", "qa_outputs")


def _is_diffusers(model: nn.Module) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(model).__mro__)


def _is_transformers(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def default_targets(model: nn.Module) -> list[str] | None:
    """Default patterns for `model`'s family; None = every supported layer."""
    if _is_diffusers(model):
        return list(DIFFUSERS_TARGETS)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is not None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

        if model_type in table:
            return list(table[model_type])
    return None


def resolve_modules_to_save(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Full names of the modules trained in full (None = the task head of a transformers task model)."""
    names = [n for n, _ in model.named_modules() if n]
    if patterns is None:
        if not _is_transformers(model):
            return []
        children = dict(model.named_children())
        return [h for h in HEAD_NAMES if h in children and any(True for _ in children[h].parameters())]
    out = [n for n in names if matches(n, patterns)]
    if not out:
        raise UserError(
            f"adapter.modules_to_save {patterns} match no module of {type(model).__name__}; "
            f"its top-level modules are: {', '.join(dict(model.named_children()))}."
        )
    # keep the outermost match only (a pattern may match a module and its children)
    return [n for n in out if not any(n.startswith(o + ".") for o in out if o != n)]


def _has_own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def resolve_targets(
    model: nn.Module,
    patterns: list[str] | None,
    exclude: Sequence[str],
    supported: tuple[type[nn.Module], ...],
    adapter: str,
    skip: Sequence[str] = (),
) -> list[str]:
    """Full names of the modules to adapt.

    Args:
        patterns: `target_modules` (None = `default_targets(model)`).
        exclude: `exclude_modules` patterns.
        supported: module types the adapter can adapt.
        adapter: the adapter's name, for messages.
        skip: module names (and their subtrees) never targeted, e.g. the `modules_to_save`.
    Returns:
        Matching module names in model order.
    Raises:
        UserError: nothing matches (listing what exists), or a matched layer has a type the adapter does not
        support (modules without parameters of their own, e.g. containers and dropouts, are passed over).
    """
    if patterns is None:
        patterns = default_targets(model)
        if patterns is not None:
            log.info("%s: default target_modules for %s: %s", adapter, type(model).__name__, patterns)
    skipped = tuple(skip)
    targets, unsupported = [], []
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skipped):
            continue
        if patterns is None:
            hit = isinstance(module, supported)
        else:
            hit = matches(name, patterns)
        if not hit or (exclude and matches(name, exclude)):
            continue
        if isinstance(module, supported):
            targets.append(name)
        elif _has_own_params(module):
            unsupported.append(f"{name} ({type(module).__name__})")
    types = ", ".join(t.__name__ for t in supported)
    if unsupported:
        raise UserError(
            f"{adapter}: target_modules {patterns} match layer(s) of a type it cannot adapt: "
            f"{', '.join(unsupported[:8])}{' ...' if len(unsupported) > 8 else ''}. It supports {types}; "
            "narrow target_modules or add these to exclude_modules."
        )
    if not targets:
        raise UserError(
            f"{adapter}: target_modules {patterns} match no {types} layer of {type(model).__name__}. "
            f"Its {types} layers are named like: {_layer_summary(model, supported)}."
        )
    return targets


def _layer_summary(model: nn.Module, supported: tuple[type[nn.Module], ...], limit: int = 12) -> str:
    """Distinct last name components of the supported layers, each with one full example name."""
    seen: dict[str, str] = {}
    for name, m in model.named_modules():
        if name and isinstance(m, supported):
            seen.setdefault(name.rsplit(".", 1)[-1], name)
    if not seen:
        return "(none: the model has no such layers)"
    items = [f"{k} (e.g. {v})" if k != v else k for k, v in list(seen.items())[:limit]]
    return ", ".join(items) + (" ..." if len(seen) > limit else "")
