"""Compatibility check of several trees, run before any work: every mismatch is reported at once."""

from __future__ import annotations

from collections.abc import Mapping

from peft_lab.errors import UserError
from peft_lab.tree.core import Tree

__all__ = ["check_compatible", "mismatches"]


def mismatches(
    reference: Tree,
    others: Mapping[str, Tree],
    *,
    allow_subset: bool = False,
    check_dtype_kind: bool = True,
) -> list[str]:
    """Problems between `reference` and each tree of `others` (label -> tree), as readable lines.

    Args:
        allow_subset: the others may hold fewer names than the reference (e.g. adapter deltas that touch a
            few weights); names the reference lacks are always reported.
        check_dtype_kind: a float tensor in one tree and an integer one in another is reported.
    """
    lines: list[str] = []
    ref_names = set(reference)
    for label, tree in others.items():
        names = set(tree)
        extra = [n for n in tree if n not in ref_names]
        missing = [] if allow_subset else [n for n in reference if n not in names]
        if extra:
            lines.append(f"{label}: {len(extra)} tensor(s) not in {reference.source}: {_few(extra)}")
        if missing:
            lines.append(f"{label}: {len(missing)} tensor(s) of {reference.source} missing: {_few(missing)}")
        for n in tree:
            if n not in ref_names:
                continue
            a, b = reference[n], tree[n]
            if tuple(a.shape) != tuple(b.shape):
                lines.append(f"{label}: tensor {n} has shape {tuple(b.shape)}, {reference.source} has {tuple(a.shape)}")
            elif check_dtype_kind and a.dtype.is_floating_point != b.dtype.is_floating_point:
                lines.append(f"{label}: tensor {n} is {b.dtype}, {reference.source} has {a.dtype}")
    return lines


def check_compatible(reference: Tree, others: Mapping[str, Tree], **kw) -> None:
    """Raise one `UserError` listing every mismatch (see `mismatches`)."""
    lines = mismatches(reference, others, **kw)
    if lines:
        shown = lines[:50]
        more = f"\n  ... and {len(lines) - 50} more" if len(lines) > 50 else ""
        raise UserError(
            f"The inputs do not line up with {reference.source} ({len(lines)} problem(s)); they must be the same "
            "architecture with the same tensor names and shapes:\n  " + "\n  ".join(shown) + more
        )


def _few(names: list[str], k: int = 8) -> str:
    return ", ".join(names[:k]) + (f" ... (+{len(names) - k})" if len(names) > k else "")
