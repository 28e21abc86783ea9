"""Merges that output an adapter (`out_format: adapter`): the merge's delta per matrix, as LoRA factors.

Per tensor, in the base model's order:

- exact: when the method is linear in its inputs (`linear`, `task_arithmetic`), every input is a LoRA (or the base
  itself) and the merged model is `θ_0 + Σ_i c_i τ_i` (its coefficient of the base is 1), the merged delta is the
  concatenation of the inputs' factors, B = [B_1 … B_n], A = [c_1 s_1 A_1; …; c_n s_n A_n]: rank Σ r_i, the scaling
  folded in, no SVD. The coefficients c_i (weights, λ, normalisation, per-layer gradients) are the method's own:
  its per-tensor code is run once on a probe (base e_0, task vectors e_1 … e_n), so they cannot drift from what
  `out_format: model` computes;
- otherwise (TIES, DARE, DELLA, slerp, mixed LoRA / LoKr / sparse / full inputs, ...): the merged tensor is computed
  as for a model output (`MergeStreams.tensor_chunks`), its delta to the base is factored by the extraction code
  (`merging.extract.builder`), and dropped before the next tensor.

The output dir holds the adapter (PEFT dir, or a Kohya file), `adapter_report.csv`, and `merge_recipe.yaml`,
whose `adapter_report` records each matrix's rank, kept energy and relative error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from merging.extract.builder import AdapterBuilder
from merging.extract.modules import module_map
from merging.extract.run import write_adapter
from merging.extract.writers import kohya_component
from merging.provenance import RECIPE_KEY, Hasher, input_files, write_recipe_file
from merging.stream import drive, intra_op_threads, tuned_malloc
from peft_lab.errors import UserError
from peft_lab.tree import Leaf, LowRank, Thunk, Tree, atomic_output_dir

if TYPE_CHECKING:
    from merging.sources import MergeStreams

__all__ = ["write_adapter_merge", "LINEAR_METHODS", "check_bases"]

log = logging.getLogger("peft_lab.extract")

LINEAR_METHODS = ("linear", "task_arithmetic")


class _Merged(Thunk):
    """One merged tensor, computed only if the adapter needs its whole value (a module saved whole)."""

    def __init__(self, streams: MergeStreams, name: str, leaf: Leaf):
        super().__init__(lambda: None, [], leaf.shape, leaf.dtype, name=name)
        self._streams = streams

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        out = torch.cat(list(self._streams.tensor_chunks(self.name, torch.float32))).reshape(self.shape)
        return out if dtype is None else out.to(dtype)


def _recorded_base(path: str) -> str | None:
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("base_model_name_or_path") or None
    except json.JSONDecodeError:
        return None


def _same(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def check_bases(streams: MergeStreams) -> None:
    """Adapters whose configs record different base models cannot be merged into one adapter."""
    recorded = [(i.path, b) for i in streams.inputs if i.is_delta and (b := _recorded_base(i.path))]
    if recorded and any(not _same(b, recorded[0][1]) for _, b in recorded[1:]):
        listed = "; ".join(f"{p} on {b}" for p, b in recorded)
        raise UserError(
            f"The adapters were trained on different base models ({listed}), so their changes do not add up to "
            "one adapter. Merge adapters of one base model (its base_model_name_or_path in adapter_config.json)."
        )


class _Exact:
    """The exact path of one merge: whether it applies to a tensor, and the concatenated factors."""

    def __init__(self, streams: MergeStreams, base_path: str):
        self.streams = streams
        m = streams.method
        self.enabled = m.name in LINEAR_METHODS and all(
            i.is_delta or i.tree is streams.base or _same(i.path, base_path) for i in streams.inputs
        )

    def coefficients(self, name: str) -> tuple[float, list[float]]:
        """(the merged model's coefficient of the base, c_i per input) from the method's own code on a probe."""
        s = self.streams
        n = len(s.inputs)
        job = dataclasses.replace(s.job(name), shape=(n + 1,), chunked=False)
        base = torch.zeros(n + 1)
        base[0] = 1.0
        taus = [torch.nn.functional.one_hot(torch.tensor(i + 1), n + 1).float() for i in range(n)]
        xs = taus if s.method.uses_deltas else [base + t for t in taus]
        out = torch.cat(
            list(drive(s.method, job, lambda a, b: (base[a:b].clone(), [x[a:b].clone() for x in xs]), n + 1))
        )
        return float(out[0]), [float(c) for c in out[1:]]

    def leaf(self, name: str) -> LowRank | None:
        """The concatenated LoRA of `name` (None: not exact here)."""
        if not self.enabled:
            return None
        leaves = [i.tree.get(name) if i.is_delta else None for i in self.streams.inputs]
        if not all(x is None or isinstance(x, LowRank) for x in leaves) or all(x is None for x in leaves):
            return None
        a0, coef = self.coefficients(name)
        if abs(a0 - 1.0) > 1e-6:  # e.g. linear without normalize: the base itself is rescaled, not low-rank
            return None
        Bs, As = [], []
        for x, c in zip(leaves, coef, strict=True):
            if x is not None and c != 0.0:
                Bs.append(x.B.float())
                As.append(x.A.float() * (c * x.scale))
        if not Bs:
            return None
        return LowRank(torch.cat(Bs, dim=1), torch.cat(As, dim=0), 1.0, self.streams.ref[name].shape)


def _delta(streams: MergeStreams, name: str) -> tuple[Leaf | None, Leaf]:
    """(merged − base, or None when equal; the merged tensor) of one tensor, computed as a model output would be."""
    from peft_lab.tree import Dense

    leaf = streams.ref[name]
    merged = torch.cat(list(streams.tensor_chunks(name, torch.float32))).reshape(leaf.shape)
    d = merged - streams.base[name].dense(torch.float32)
    return (Dense(d) if bool(d.any()) else None), Dense(merged)


def _untouched(streams: MergeStreams, name: str) -> bool:
    return streams.method.uses_deltas and all(i.is_delta and name not in i.tree for i in streams.inputs)


def write_adapter_merge(merge: Any, all_streams: list[MergeStreams], out: Path) -> Path:
    """The adapter-output branch of `merging.run` (module docstring); `merge` is the executor's `_Merge`."""
    r, s = merge.r, merge.r.adapter
    if len(all_streams) != 1:  # the recipe refuses slices: / modules: with out_format: adapter
        raise UserError("out_format: adapter merges the models: form of a recipe (one group of inputs) only.")
    streams = all_streams[0]
    check_bases(streams)
    base: Tree = streams.base
    shapes = {n: tuple(leaf.shape) for n, leaf in base.items() if leaf.dtype.is_floating_point}
    modules = module_map([r.base], shapes)
    builder = AdapterBuilder(s, modules, base)
    builder.check_ranks(shapes)
    exact = _Exact(streams, r.base)
    if s.needs_rank and not exact.enabled:
        raise UserError(
            f"out_format: adapter with {r.method.name} (or with inputs that are not all LoRA adapters on the base) "
            "compresses each merged delta with an SVD: give adapter_rank (or energy). Only linear and "
            "task_arithmetic over LoRA inputs concatenate the factors exactly without one."
        )
    component = kohya_component(s.component, r.base if Path(r.base).is_dir() else None) if s.format == "kohya" else None
    hasher = None
    if merge.opts.hash != "none":
        files = [p for _, p, _ in merge.roles()]
        hasher = Hasher(list(dict.fromkeys(f for p in files for f in input_files(p))), merge.opts.hash)
    names = [n for n in shapes]
    try:
        with tuned_malloc(), atomic_output_dir(out, kind="merge", overwrite=merge.opts.overwrite) as tmp:
            if hasher is not None:
                hasher.start()
            merge._prepare(all_streams, 0)
            bar_ = merge.bar(len(names), f"{r.method.name} -> {out.name} (adapter)", unit="tensor")
            with intra_op_threads(merge.threads), bar_ as bar:
                for name in names:
                    _one(builder, exact, streams, name)
                    bar.update(1)
            builder.finish()
            digests = hasher.result() if hasher is not None else None
            record = merge.record(digests)
            record["adapter_report"] = {
                row.name: {
                    "rank": row.rank,
                    "energy": _round(row.energy),
                    "error": _round(row.error),
                    "how": row.method,
                }
                for row in builder.rows
                if row.action == "lora"
            }
            _write(tmp, builder, s, r.base, modules, component, record)
    finally:
        if hasher is not None and hasher.is_alive():
            hasher.stop()
            hasher.join()
    return out


def _one(builder: AdapterBuilder, exact: _Exact, streams: MergeStreams, name: str) -> None:
    if _untouched(streams, name):
        builder.add(name, None, streams.base[name])
        return
    leaf = exact.leaf(name)
    if leaf is not None:
        builder.add(name, leaf, _Merged(streams, name, streams.ref[name]))
        return
    delta, merged = _delta(streams, name)
    builder.add(name, delta, merged)


def _write(tmp: Path, builder, s, base: str, modules, component, record: dict) -> None:
    meta = {RECIPE_KEY: json.dumps(record, separators=(",", ":"))}
    write_adapter(tmp, builder, s, base, modules, component, metadata=meta)
    write_recipe_file(tmp, record)


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")
