"""Embedding and LM-head rows for the output vocabulary (`merging.vocab`), as mergekit 0.1.5 builds them.

For one tensor indexed by token (rows along dim 0) and the models that merge it (a slice's sources, or the models
and the base), each model's tensor is reordered to the output vocabulary: row i is the model's row for output token
i. A token a model lacks (or a token whose row the recipe forces) takes a default row, the first rule that applies:

    1. the recipe's `tokens:` entry: a model's row for it, a model's row for another token or id, or zeros;
    2. the token is in exactly one model: that model's row;
    3. in none: zeros (warned);
    4. the base model has it: the base's row;
    5. else the mean of the rows of the models that have it (summed in model order, divided by their count).

Rows beyond the vocabulary (`pad_to_multiple_of`) are the mean of the model's first len(vocabulary) rows. The
merge method then merges the reordered tensors as any others. Each reordered tensor is a `Thunk` leaf over the
model's own leaf: it is built when the tensor is merged, one model's tensor at a time; the default rows are read
once per tensor.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from merging.architecture import layer_index
from merging.grammar import ModelRef
from merging.plan import Group
from merging.vocab import TokenSource, Vocab
from peft_lab.errors import UserError
from peft_lab.tree import Leaf, Thunk

__all__ = ["VocabRows", "vocab_size", "check_vocab_sizes", "with_vocab"]

log = logging.getLogger(__name__)


class VocabRows:
    """One vocabulary tensor of the models of a group, reordered to the output vocabulary.

    Args:
        vocab: the output vocabulary and the models' permutations.
        name: the tensor's name (for messages).
        models: (reference, leaf) of each model whose tensor is merged, in merge order.
        base: the group's base model (rule 4), if any.
    """

    def __init__(self, vocab: Vocab, name: str, models: Sequence[tuple[ModelRef, Leaf]], base: ModelRef | None):
        self.vocab, self.name, self.models, self.base = vocab, name, list(models), base
        self._defaults: dict[int, torch.Tensor] | None = None
        self.perms = [vocab.perms[r.key] for r, _ in self.models]
        for (r, leaf), perm in zip(self.models, self.perms, strict=True):
            top = max(perm, default=-1)
            if top >= leaf.shape[0]:
                raise UserError(
                    f"{r}: tensor {name} has {leaf.shape[0]} rows but its tokenizer gives ids up to {top}; the "
                    "model's vocab_size (config.json) must cover its tokenizer's tokens."
                )

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.vocab.rows, *self.models[0][1].shape[1:])

    def leaf(self, j: int) -> Thunk:
        """Model j's reordered tensor (a lazy leaf)."""
        src = self.models[j][1]
        return Thunk(lambda x, _j=j: self._permuted(_j, x), [src], self.shape, src.dtype, name=self.name)

    # ------------------------------------------------------------------------------------------------------
    def _permuted(self, j: int, x: torch.Tensor) -> torch.Tensor:
        perm, forced = self.perms[j], self._forced()
        n = len(self.vocab.tokens)
        out = torch.zeros(self.shape, dtype=torch.float32)
        new = [i for i in range(n) if perm[i] >= 0 and i not in forced]
        out[new] = x[[perm[i] for i in new]]
        defaults = self.defaults()
        for i in range(n):
            if (perm[i] < 0 or i in forced) and i in defaults:
                out[i] = defaults[i]
            elif perm[i] < 0 and i not in defaults:
                log.error("no row for token %r in %s of %s", self._token(i), self.name, self.models[j][0])
        if self.vocab.rows > n:
            out[n:] = torch.mean(out[:n], dim=0)
        return out

    def _token(self, i: int) -> str:
        return next(t for t, k in self.vocab.tokens.items() if k == i)

    def _forced(self) -> set[int]:
        return {self.vocab.tokens[t] for t, s in self.vocab.spec.tokens.items() if s.force}

    def _rules(self) -> tuple[dict[int, TokenSource], set[int]]:
        """Per output id needing a default row, its source (rules 1-4), and the ids to average (rule 5)."""
        spec, forced = self.vocab.spec.tokens, self._forced()
        sources: dict[int, TokenSource] = {}
        average: set[int] = set()
        base_j = next((j for j, (r, _) in enumerate(self.models) if r.same(self.base)), None)
        for t, i in self.vocab.tokens.items():
            has = [p[i] >= 0 for p in self.perms]
            if all(has) and i not in forced:
                continue  # every model keeps its own row
            if t in spec:
                sources[i] = spec[t]
            elif sum(has) == 1:
                sources[i] = TokenSource("model", self.models[has.index(True)][0])
            elif not any(has):
                sources[i] = TokenSource("zero")
                log.warning("token %r is in none of the models: its row in %s is zeros", t, self.name)
            elif base_j is not None and has[base_j]:
                sources[i] = TokenSource("model", self.models[base_j][0])
            else:
                average.add(i)
        return sources, average

    def defaults(self) -> dict[int, torch.Tensor]:
        """output id -> the default row (computed once: one model's tensor in memory at a time)."""
        if self._defaults is not None:
            return self._defaults
        sources, average = self._rules()
        out: dict[int, torch.Tensor] = {}
        sums = {i: [torch.zeros(self.shape[1:]), 0] for i in sorted(average)}
        for j, (ref, leaf) in enumerate(self.models):
            wanted = [(i, s) for i, s in sources.items() if s.kind in ("model", "model_token") and s.model.same(ref)]
            if not wanted and not any(self.perms[j][i] >= 0 for i in sums):
                continue
            x = leaf.dense(torch.float32)
            for i, s in wanted:
                out[i] = x[self._source_row(j, i, s, x.shape[0])].clone()
            for i, acc in sums.items():
                if self.perms[j][i] >= 0:
                    acc[0] = acc[0] + x[self.perms[j][i]]
                    acc[1] += 1
        for i, s in sources.items():
            if s.kind == "zero":
                out[i] = torch.zeros(self.shape[1:])
            elif i not in out:
                raise UserError(
                    f"tokenizer.tokens[{self._token(i)!r}]: the row comes from {s.model}, which does not merge "
                    f"tensor {self.name} here (its models: {', '.join(str(r) for r, _ in self.models)})."
                )
        for i, (total, count) in sums.items():
            out[i] = total / count
        self._defaults = out
        return out

    def _source_row(self, j: int, i: int, s: TokenSource, rows: int) -> int:
        ref = self.models[j][0]
        if s.kind == "model":
            if self.perms[j][i] < 0:
                raise UserError(f"tokenizer.tokens[{self._token(i)!r}]: {ref} does not have that token.")
            return self.perms[j][i]
        row = s.token_id if s.token_id is not None else self.vocab.vocabs[ref.key].get(s.token, -1)
        if not 0 <= row < rows:
            what = f"token_id {s.token_id}" if s.token_id is not None else f"token {s.token!r}"
            raise UserError(
                f"tokenizer.tokens[{self._token(i)!r}]: {ref} has no {what} (its {self.name} has {rows} rows)."
            )
        return row


def vocab_size(config: Mapping[str, Any] | None) -> int | None:
    """A model's embedding rows as its config declares them (`vocab_size`, or its text config's)."""
    if not config:
        return None
    for d in (config, config.get("text_config") or {}):
        if isinstance(d.get("vocab_size"), int):
            return d["vocab_size"]
    return None


def check_vocab_sizes(models: Sequence[tuple[str, int | None]]) -> None:
    """Without a tokenizer setting, the models must share their vocabulary size."""
    known = [(m, n) for m, n in models if n is not None]
    if len({n for _, n in known}) > 1:
        shown = ", ".join(f"{m}: {n}" for m, n in known)
        raise UserError(
            f"The models' vocabularies differ in size ({shown} tokens, by vocab_size in their config.json): their "
            "embedding and LM-head rows do not line up. Give tokenizer_source: union (one tokenizer with every "
            "model's tokens), base or one of the models, and the rows are rebuilt for that tokenizer."
        )


def with_vocab(group: Group, vocab: Vocab, configs: Mapping[tuple, Mapping[str, Any] | None]) -> Group:
    """The group with each vocabulary tensor (dim 0 = the vocabulary) of each model reordered to `vocab`."""
    ref_tree = group.base if group.base is not None else group.inputs[0].tree
    ref = group.base_ref if group.base is not None else group.refs[0]
    n_ref = vocab_size(configs.get(ref.key)) or len(vocab.vocabs[ref.key])
    names = [
        n
        for n in group.names
        if n in ref_tree and layer_index(n) is None and ref_tree[n].dtype.is_floating_point
        and len(ref_tree[n].shape) >= 1 and ref_tree[n].shape[0] == n_ref
    ]  # fmt: skip
    trees = [dict(i.tree.items()) for i in group.inputs]
    base = dict(group.base.items()) if group.base is not None else None
    for n in names:
        models = [(r, t[n]) for r, t in zip(group.refs, trees, strict=True) if n in t]
        if base is not None and n in base:
            models.append((group.base_ref, base[n]))
        rows = VocabRows(vocab, n, models, group.base_ref)
        j = 0
        for t in trees:
            if n in t:
                t[n] = rows.leaf(j)
                j += 1
        if base is not None and n in base:
            base[n] = rows.leaf(j)
    inputs = [dataclasses.replace(i, tree=i.tree.replace(t)) for i, t in zip(group.inputs, trees, strict=True)]
    return dataclasses.replace(group, inputs=inputs, base=None if base is None else group.base.replace(base))
