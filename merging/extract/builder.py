"""From deltas to an adapter, one tensor at a time: `AdapterBuilder`.

The caller (`peft-lab extract`, or a merge with `out_format: adapter`) hands over each tensor's delta in turn
(`add`); the builder decides what becomes of it and keeps only what the adapter stores:

- the `weight` of a Linear, Conv (PEFT reshapes it to (out, in·k…)), Embedding (its LoRA works on the transposed
  weight) or GPT-2 `Conv1D` layer -> LoRA factors, by a truncated SVD of the delta (`peft_lab.tree.lowrank`), or
  exactly when the delta already is low-rank and no rank was asked for (concatenated LoRA factors);
- the `bias` of such a layer -> PEFT's `lora_bias` when the config can use it (`AdapterSettings.bias`);
- every other changed tensor (norms, new or resized heads, layers PEFT cannot adapt) -> its module goes into
  `modules_to_save`, written whole (final values) — unless PEFT cannot save that module (a top-level parameter, or
  a module holding adapted layers), in which case the tensor is listed as not carried.

A report row per tensor (`Row`: action, rank, kept energy, relative error, method) goes into the output dir and
the log. Memory: the factors of the adapter and the saved modules' tensors; never more than one dense delta.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from merging.extract.modules import LORA_KINDS, ModuleMap, split_name
from merging.extract.settings import AdapterSettings
from peft_lab.errors import UserError
from peft_lab.tree import Leaf, LowRank, Tree
from peft_lab.tree.lowrank import RankRule, factored_svd, relative_error, seed_for, truncated_svd

__all__ = ["AdapterBuilder", "LoraEntry", "Row", "matrix_shape"]

log = logging.getLogger("peft_lab.extract")

_TRANSPOSED = ("embedding", "conv1d_hf")  # LoRA works on the transposed weight


@dataclass
class Row:
    """One tensor of the report."""

    name: str
    shape: tuple[int, ...]
    kind: str
    action: str  # lora | lora_bias | saved | unchanged | not carried
    rank: int | None = None
    energy: float | None = None
    error: float | None = None
    method: str = ""
    seconds: float = 0.0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": "x".join(map(str, self.shape)),
            "kind": self.kind,
            "action": self.action,
            "rank": "" if self.rank is None else self.rank,
            "energy": "" if self.energy is None else f"{self.energy:.6g}",
            "error": "" if self.error is None else f"{self.error:.6g}",
            "method": self.method,
            "seconds": f"{self.seconds:.3f}",
            "note": self.note,
        }


@dataclass
class LoraEntry:
    """The LoRA of one module, in PEFT's layout: `lora_A` (r, in[, k…]) and `lora_B` (out, r[, 1…]); for an
    Embedding `lora_embedding_A` (r, num) and `lora_embedding_B` (dim, r)."""

    module: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def matrix_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The shape of the matrix LoRA factors for a weight of `shape`: (out, in·k…), transposed for embeddings and
    GPT-2 Conv1D."""
    out, rest = shape[0], math.prod(shape[1:])
    return (rest, out) if kind in _TRANSPOSED else (out, rest)


def _matrix(kind: str, t: torch.Tensor) -> torch.Tensor:
    m = t.reshape(t.shape[0], -1)
    return m.T if kind in _TRANSPOSED else m


def _matrix_factors(kind: str, leaf: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bm, Am) with Bm Am = the matrix view of a LowRank delta (its scale folded into Am)."""
    B = leaf.B.reshape(leaf.B.shape[0], -1).float()
    A = leaf.A.reshape(leaf.A.shape[0], -1).float() * leaf.scale
    return (A.T, B.T) if kind in _TRANSPOSED else (B, A)


def _peft_layout(kind: str, shape: tuple[int, ...], Bm: torch.Tensor, Am: torch.Tensor):
    """PEFT's (A, B) from matrix-view factors Bm (p, r), Am (r, q)."""
    r = Am.shape[0]
    if kind == "conv":
        return Am.reshape(r, *shape[1:]), Bm.reshape(shape[0], r, *([1] * (len(shape) - 2)))
    return Am, Bm


class AdapterBuilder:
    """Collects an adapter tensor by tensor (module docstring).

    Args:
        settings: rank rule, format, bias and embedding policies.
        modules: the module kinds of the model the adapter is for.
        base: the base tree (shapes, and the unchanged tensors of saved modules).
    """

    def __init__(self, settings: AdapterSettings, modules: ModuleMap, base: Tree):
        self.s, self.modules, self.base = settings, modules, base
        self.entries: dict[str, LoraEntry] = {}
        self.rows: list[Row] = []
        self.saved: dict[str, Leaf] = {}  # name -> final value of the tensors of saved modules
        self.saved_modules: dict[str, str] = {}  # module -> why
        self._biases: dict[str, tuple[str, torch.Tensor, Leaf]] = {}  # module -> (name, delta, final value)
        self._cfg = settings.svd_config()
        self.finished = False

    # ------------------------------------------------------------------------------------------------
    # before: refuse impossible ranks before any work
    # ------------------------------------------------------------------------------------------------
    def check_ranks(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """A rank given for a module above its min(m, n), or a rank above every matrix's: one UserError."""
        sizes, bad = {}, []
        for name, shape in shapes.items():
            module, param = split_name(name)
            kind = self.modules.info(module).kind
            if param != "weight" or kind not in LORA_KINDS or len(shape) < 2:
                continue
            full = min(matrix_shape(kind, tuple(shape)))
            sizes[name] = full
            rule, explicit = self.s.rule_for(module)
            if explicit and rule.rank > full:
                bad.append(f"{module} ({'x'.join(map(str, shape))}: at most {full})")
        if bad:
            raise UserError(
                f"rank_pattern asks for a rank above min(m, n) of {len(bad)} matrix(es): {', '.join(bad[:5])}. "
                "A LoRA of a matrix cannot have more rank than its smaller side; lower those ranks."
            )
        rank = self.s.rank if self.s.rank is not None else self.s.max_rank
        if rank is not None and sizes and rank > max(sizes.values()):
            raise UserError(
                f"rank {rank} is above min(m, n) of every matrix of the model (the largest is {max(sizes.values())}); "
                "a LoRA cannot have more rank than a matrix's smaller side. Give a smaller rank."
            )

    # ------------------------------------------------------------------------------------------------
    # one tensor
    # ------------------------------------------------------------------------------------------------
    def add(self, name: str, delta: Leaf | None, final: Leaf | None, *, new: str = "") -> Row:
        """Take one tensor: its delta (None: unchanged), its final value (for a saved module), and `new`: why it
        has no delta against the base (a tensor the base lacks, or of another shape) — it is then saved whole."""
        module, param = split_name(name)
        info = self.modules.info(module)
        shape = tuple(final.shape if final is not None else delta.shape)
        if new:
            return self._save(name, shape, info.kind, final, new)
        if delta is None:
            return self._row(Row(name, shape, info.kind, "unchanged"))
        if param == "weight" and info.kind in LORA_KINDS and len(shape) >= 2:
            return self._weight(name, module, info.kind, delta, final)
        if param == "bias" and info.kind in ("linear", "conv", "conv1d_hf"):
            d = delta.dense(torch.float32)
            if not bool(d.any()):
                return self._row(Row(name, shape, info.kind, "unchanged"))
            self._biases[module] = (name, d, final)  # decided in finish(): lora_bias or the module saved
            return Row(name, shape, info.kind, "pending")
        if not _changed(delta):
            return self._row(Row(name, shape, info.kind, "unchanged"))
        return self._save(name, shape, info.kind, final, "")

    def _weight(self, name: str, module: str, kind: str, delta: Leaf, final: Leaf | None) -> Row:
        shape = tuple(delta.shape)
        if kind == "embedding" and self.s.embeddings != "lora":
            if self.s.embeddings == "save" and _changed(delta):
                return self._save(name, shape, kind, final, "embeddings: save")
            return self._not_carried(name, shape, kind, "embeddings: none", delta)
        if self.s.format == "kohya" and kind in _TRANSPOSED:
            return self._not_carried(name, shape, kind, f"a Kohya LoRA has no {kind} layers", delta)
        t0 = time.perf_counter()
        rule, _ = self.s.rule_for(module)
        f, Bm, Am = self._factor(name, kind, delta, rule)
        if f is not None and f.rank == 0:
            return self._row(Row(name, shape, kind, "unchanged", 0, 1.0, 0.0, f.method))
        dt = self.s.factor_dtype
        A, B = _peft_layout(kind, shape, Bm.to(dt).contiguous(), Am.to(dt).contiguous())
        self.entries[module] = LoraEntry(module, kind, A, B)
        if f is None:  # exact: the concatenated factors themselves
            row = Row(name, shape, kind, "lora", A.shape[0], 1.0, 0.0, "no SVD (the factors as they are)")
        else:
            err = f.error if dt == torch.float32 else _stored_error(delta, kind, Bm.to(dt), Am.to(dt), f.error)
            row = Row(name, shape, kind, "lora", f.rank, f.energy, err, f.method)
            if f.capped:
                row.note = "the matrix is smaller than the rank asked for: full rank, exact"
        row.seconds = time.perf_counter() - t0
        return self._row(row)

    def _factor(self, name: str, kind: str, delta: Leaf, rule: RankRule):
        """(Factors or None when exact, Bm, Am): matrix-view factors of the delta under `rule`."""
        if isinstance(delta, LowRank):
            Bm, Am = _matrix_factors(kind, delta)
            if rule.energy is None and (rule.rank is None or delta.rank <= rule.rank):
                return None, Bm, Am  # already within the rank asked for: the factors themselves, exactly
            f = factored_svd(Bm, Am, rule)
        else:
            if rule.rank is None and rule.energy is None:
                raise UserError(
                    f"{name}: its merged delta is not a concatenation of LoRA factors, so the adapter needs a rank: "
                    "give adapter_rank (or energy)."
                )
            f = truncated_svd(_matrix(kind, delta.dense(torch.float32)), rule, self._cfg, seed=seed_for(name))
        Bm, Am = f.balanced()
        return f, Bm, Am

    def _save(self, name: str, shape, kind: str, final: Leaf | None, why: str) -> Row:
        module, _ = split_name(name)
        if final is None:
            raise RuntimeError(f"{name}: a saved tensor needs its final value")
        self.saved[name] = final
        self.saved_modules.setdefault(module, why)
        return self._row(Row(name, tuple(shape), kind, "saved", note=why))

    def _not_carried(self, name: str, shape, kind: str, why: str, delta: Leaf | None = None) -> Row:
        if delta is not None and not _changed(delta):
            return self._row(Row(name, tuple(shape), kind, "unchanged"))
        return self._row(Row(name, tuple(shape), kind, "not carried", note=why))

    def _row(self, row: Row) -> Row:
        self.rows.append(row)
        if row.action == "lora":
            log.info(
                "%s: rank %d, energy %.4f, rel. error %.4g (%s)", row.name, row.rank, row.energy, row.error, row.method
            )
        elif row.action not in ("unchanged", "pending"):
            log.info("%s: %s%s", row.name, row.action, f" ({row.note})" if row.note else "")
        return row

    # ------------------------------------------------------------------------------------------------
    # after the last tensor
    # ------------------------------------------------------------------------------------------------
    @property
    def lora_bias(self) -> bool:
        """Whether the biases of adapted layers travel in PEFT's lora_bias (`AdapterSettings.bias`)."""
        if self.s.format != "peft" or self.s.bias == "none":
            return False
        if not any(m in self.entries for m in self._biases):
            return False
        if self.s.bias == "auto" and any(e.kind == "embedding" for e in self.entries.values()):
            return False
        return all(self.modules.info(m).has_bias for m in self.entries)

    def finish(self) -> None:
        """Decide the deferred biases and check the saved modules (PEFT must be able to save each whole)."""
        use = self.lora_bias
        for module, (name, d, final) in self._biases.items():
            shape = tuple(d.shape)
            kind = self.modules.info(module).kind
            if module in self.entries:
                if use:
                    self.entries[module].bias = d
                    self._row(Row(name, shape, kind, "lora_bias"))
                else:
                    self._row(Row(name, shape, kind, "not carried", note=self._why_no_bias()))
            else:
                self._save(name, shape, kind, final, "a bias changed, the weight not")
        if self.s.format == "kohya":
            for name in list(self.saved):
                self._drop_saved(name, "a Kohya LoRA carries no whole modules")
        else:
            for name in list(self.saved):
                module, _ = split_name(name)
                if not module or module in self.entries or self.modules.is_container(module, self.entries):
                    self._drop_saved(name, "PEFT cannot save this module whole (it holds adapted layers)")
        self.rows = [r for r in self.rows if r.action != "pending"]
        self.finished = True
        dropped: dict[str, list[str]] = {}
        for r in self.rows:
            if r.action == "not carried":
                dropped.setdefault(r.note, []).append(r.name)
        for why, names in dropped.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            log.warning("not carried by the adapter (%s): %s", why, shown)

    def _why_no_bias(self) -> str:
        if self.s.format == "kohya":
            return "a Kohya LoRA has no biases"
        if self.s.bias == "none":
            return "bias: none"
        if any(e.kind == "embedding" for e in self.entries.values()):
            return "PEFT's lora_bias does not work with embedding LoRA (bias: lora with embeddings: save carries it)"
        return "lora_bias needs every adapted layer to have a bias"

    def _drop_saved(self, name: str, why: str) -> None:
        module, _ = split_name(name)
        del self.saved[name]
        self.saved_modules.pop(module, None)
        for r in self.rows:
            if r.name == name and r.action == "saved":
                r.action, r.note = "not carried", why

    def saved_tensors(self) -> dict[str, Leaf]:
        """Every float tensor of each saved module: the changed ones' final values, the others from the base."""
        out: dict[str, Leaf] = {}
        for name, leaf in self.base.items():
            module, _ = split_name(name)
            if module in self.saved_modules and leaf.dtype.is_floating_point and name not in self.saved:
                out[name] = leaf
        out.update(self.saved)
        return dict(sorted(out.items()))

    def summary(self) -> dict[str, Any]:
        lora = [r for r in self.rows if r.action == "lora"]
        errors = [r.error for r in lora if r.error is not None]
        params = sum(e.A.numel() + e.B.numel() for e in self.entries.values())
        return {
            "lora_matrices": len(lora),
            "ranks": sorted({r.rank for r in lora}),
            "max_error": max(errors) if errors else 0.0,
            "mean_error": sum(errors) / len(errors) if errors else 0.0,
            "lora_params": params,
            "saved_modules": sorted(self.saved_modules),
            "not_carried": [r.name for r in self.rows if r.action == "not carried"],
            "lora_bias": self.lora_bias,
        }


def _changed(leaf: Leaf) -> bool:
    return bool(leaf.dense(torch.float32).any())


def _stored_error(delta: Leaf, kind: str, Bm: torch.Tensor, Am: torch.Tensor, fallback: float) -> float:
    """The relative error of the factors as stored (cast to a low-precision dtype)."""
    if isinstance(delta, LowRank):
        return fallback
    return relative_error(_matrix(kind, delta.dense(torch.float32)), Bm, Am)
