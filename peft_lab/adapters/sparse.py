"""Sparse fine-tuning: a trainable sparse delta S (k entries) per target weight.

    y = x (W + S)^T + b,   S[rows[j], cols[j]] = values[j],   only `values` train (init 0)

The forward and backward run through `peft_lab.kernels.sparse_linear`, which never builds a dense copy of W + S
and computes the values' gradient at the k positions only (an SDDMM), unlike PEFT's SHiRA, which densifies W on
every forward (docs/kernels.md).

Budget: k = r·(out + in) per layer, the number of parameters of a rank-r LoRA (SHiRA's rule, so `adapter.r`
sweeps compare like with like), or, when `density` is given, by `density_scope`:
- `layer` (default): k = round(density·out·in) in every target layer (a fraction of each target weight);
- `model`: SpIEL's density (https://arxiv.org/abs/2401.16405, its `SftConfig.density`): K = round(density·N) entries
  for N the parameters of the WHOLE model, spread over the targets in proportion to their size. At the same number
  this trains about N / Σ(target sizes) times more entries than `layer`.
Index selection:
- random: k distinct uniform positions (SHiRA's random mask; SpIEL's init);
- magnitude: the k smallest |W| (SaRA, https://arxiv.org/abs/2409.06633: "temporarily ineffective" weights; a
  budget instead of SaRA's absolute threshold, and a zero-initialised delta instead of training θ[M] itself);
- grow_drop: SpIEL-AG (https://arxiv.org/abs/2401.16405): random init, then periodic drop of the smallest |v|
  and regrowth by accumulated gradient (schedule in `_grow_drop.py`), driven by `on_optimizer_step`.
Saved as flat row-major indices (int32 when out·in < 2^31) + values, the `Sparse` leaf of peft_lab.tree.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch
from torch import nn

from peft_lab.adapters._grow_drop import Candidates, regrow, reselection_rate, seed_optimizer_state
from peft_lab.adapters._own import AdapterLayer, OwnAdapter
from peft_lab.adapters.base import ADAPTERS, AdapterConfig
from peft_lab.errors import UserError
from peft_lab.kernels import sparse_linear
from peft_lab.params import param
from peft_lab.tree import Leaf, Sparse

__all__ = ["SparseFT", "SparseConfig", "SparseLayer", "select_indices"]

log = logging.getLogger("peft_lab.adapters")
SELECTIONS = ("random", "magnitude", "grow_drop")
SAVED_INPUT_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class SparseConfig(AdapterConfig):
    """Attributes:
    r: LoRA-equivalent budget: k = r·(out + in) entries per layer.
    density: if set, the budget is this fraction (0 < density <= 1) instead of r, of ...
    density_scope: ... each target layer ("layer": k = round(density·out·in) per layer), or of the whole model's
        parameters spread over the targets by size ("model": SpIEL's density).
    selection: "random", "magnitude" or "grow_drop".
    seed: seed of the random selection (null = torch's global generator).
    reselection_steps: grow_drop: a selection phase starts every this many steps (SpIEL's SftConfig default 20;
        its command-line default is 100).
    selection_accumulation_steps: grow_drop: steps of gradient accumulated before each reselection.
    reselection_rate: grow_drop: fraction of slots replaced at the second selection (p0), decaying after.
    rate_policy: grow_drop: "linear" or "cosine" decay of the rate over training.
    saved_input_dtype: null, or "bfloat16" / "float16": keep each layer's input for the backward in that dtype
        (half of float32). The forward and the input gradient are unchanged; the value gradients (SDDMM) see
        the input rounded to that dtype. Layers that read the same input share one copy.
    """

    r: int = param(8, within="[1, inf)")
    density: float | None = param(None, within="(0, 1]", help="null to use r")
    density_scope: str = param("layer", choices=("layer", "model"))
    selection: str = param("random", choices=SELECTIONS)
    seed: int | None = None
    reselection_steps: int = 20
    selection_accumulation_steps: int = param(5, within="[1, inf)")
    reselection_rate: float = param(0.2, within="(0, 1]")
    rate_policy: str = param("linear", choices=("linear", "cosine"))
    saved_input_dtype: str | None = param(None, choices=[k for k in SAVED_INPUT_DTYPES if k is not None])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.density_scope == "model" and self.density is None:
            raise UserError(
                "adapter.density_scope=model spreads adapter.density over the model: set adapter.density too."
            )
        if self.selection_accumulation_steps >= self.reselection_steps:
            raise UserError(
                "adapter.selection_accumulation_steps must be below reselection_steps, got "
                f"{self.selection_accumulation_steps} and {self.reselection_steps}."
            )

    def budget(self, out_features: int, in_features: int) -> int:
        if self.density is not None:
            return max(1, round(self.density * out_features * in_features))
        return self.r * (out_features + in_features)


def select_indices(
    weight: torch.Tensor, k: int, selection: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k distinct flat row-major indices into `weight`, sorted (int64)."""
    n = weight.numel()
    if selection == "magnitude":
        idx = torch.topk(weight.detach().abs().reshape(-1).float(), k, largest=False).indices
    else:  # random, and grow_drop's initial set
        idx = torch.randperm(n, generator=generator, device="cpu")[:k].to(weight.device)
    return torch.sort(idx).values


class SparseLayer(AdapterLayer):
    """An nn.Linear plus a sparse delta at fixed positions (`rows`, `cols`) with trainable `values`."""

    def __init__(self, base_layer: nn.Linear, indices: torch.Tensor, saved_input_dtype: torch.dtype | None = None):
        super().__init__(base_layer)
        self.saved_input_dtype = saved_input_dtype
        out_f, in_f = base_layer.weight.shape
        # int32 halves the index memory; the kernel widens per call
        itype = torch.int32 if out_f * in_f < 2**31 else torch.int64
        self.register_buffer("rows", (indices // in_f).to(itype))
        self.register_buffer("cols", (indices % in_f).to(itype))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=indices.device))
        self.candidates: Candidates | None = None  # set during a grow_drop selection phase

    @property
    def indices(self) -> torch.Tensor:
        """(k,) flat row-major indices, in the index dtype (int32 when the weight allows)."""
        return self.rows * self.base_layer.weight.shape[1] + self.cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if self.merged:
            return b(x)
        y = sparse_linear(x, b.weight, self.rows, self.cols, self.values, b.bias, self.saved_input_dtype)
        if self.candidates is not None and y.requires_grad:
            x_saved = x.detach()
            y.register_hook(lambda dy: self._collect(dy, x_saved))
        return y

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta's own output x·Sᵀ (`forward` fuses it with the base matmul through the sparse kernel)."""
        out = x.new_zeros(*x.shape[:-1], self.base_layer.weight.shape[0], dtype=self.values.dtype)
        return out.index_add_(-1, self.rows.long(), x[..., self.cols.long()].to(self.values.dtype) * self.values)

    def _collect(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        G = dy.reshape(-1, dy.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()  # (out, in), transient
        self.candidates.add(G, self.values.numel())

    @torch.no_grad()
    def delta(self) -> Leaf:
        return Sparse(self.indices.clone(), self.values.detach().clone(), tuple(self.base_layer.weight.shape))

    @torch.no_grad()
    def load_delta(self, leaf: Leaf, state: dict[str, torch.Tensor]) -> None:
        if not isinstance(leaf, Sparse) or tuple(leaf.shape) != tuple(self.base_layer.weight.shape):
            raise UserError(
                f"saved sparse delta {leaf!r} does not fit a weight of shape {tuple(self.base_layer.weight.shape)}."
            )
        idx = leaf.indices.long()
        if idx.numel() != torch.unique(idx).numel():
            raise UserError("saved sparse delta has duplicate indices.")
        in_f = self.base_layer.weight.shape[1]
        self.rows = (idx // in_f).to(self.rows.dtype)
        self.cols = (idx % in_f).to(self.cols.dtype)
        self.values.data = leaf.values.float().clone()

    @torch.no_grad()
    def replace(self, slots: torch.Tensor, new_idx: torch.Tensor) -> None:
        in_f = self.base_layer.weight.shape[1]
        self.rows[slots] = (new_idx // in_f).to(self.rows.dtype)
        self.cols[slots] = (new_idx % in_f).to(self.cols.dtype)
        self.values[slots] = 0


@ADAPTERS.register("sparse")
class SparseFT(OwnAdapter):
    name = "sparse"
    Config = SparseConfig
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._budgets: dict[str, int] = {}  # density_scope=model: entries per target layer
        self._generator: torch.Generator | None = None
        self._selections = 0  # grow_drop selections done
        if self.config.seed is not None:
            self._generator = torch.Generator().manual_seed(self.config.seed)

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        out_f, in_f = module.weight.shape
        k = self._budgets.get(name) or self.config.budget(out_f, in_f)
        if k > out_f * in_f:
            raise UserError(
                f"sparse: budget r={self.config.r} gives k = r·(out+in) = {k} entries, more than layer {name} "
                f"{(out_f, in_f)} has ({out_f * in_f}); lower adapter.r (at most {out_f * in_f // (out_f + in_f)}), "
                "set adapter.density, or exclude the layer."
            )
        idx = select_indices(module.weight, k, self.config.selection, self._generator)
        return SparseLayer(module, idx, SAVED_INPUT_DTYPES[self.config.saved_input_dtype])

    def model_budgets(self, model: nn.Module) -> dict[str, int]:
        """density_scope=model: K = round(density·N) entries (N: every parameter of `model`) spread over the target
        layers in proportion to their size (each at least 1, at most its size); logged."""
        _, targets = self._resolve(model)
        n_model = sum(p.numel() for p in model.parameters())
        sizes = {t: model.get_submodule(t).weight.numel() for t in targets}
        total = max(1, round(self.config.density * n_model))
        budgets = {t: min(n, max(1, round(total * n / sum(sizes.values())))) for t, n in sizes.items()}
        log.info(
            "sparse: density %.4g of %d model parameters = %d entries over %d target layers (%.3g%% of them)",
            self.config.density,
            n_model,
            sum(budgets.values()),
            len(budgets),
            100 * sum(budgets.values()) / sum(sizes.values()),
        )
        return budgets

    def attach(self, model: nn.Module) -> nn.Module:
        if self.config.density is not None and self.config.density_scope == "model":
            self._budgets = self.model_budgets(model)
        out = super().attach(model)
        if self.config.selection == "grow_drop":
            self._start_phase()  # SpIEL: the first selection phase starts at step 0
        return out

    # --- grow_drop (SpIEL) ---
    def _start_phase(self) -> None:
        for layer in self.layers().values():
            layer.candidates = Candidates()

    @property
    def collecting(self) -> bool:
        return any(layer.candidates is not None for layer in self.layers().values())

    def on_optimizer_step(self, step: int, max_steps: int, optimizer) -> None:
        if self.config.selection != "grow_drop":
            return
        S, A = self.config.reselection_steps, self.config.selection_accumulation_steps
        layers = self.layers()
        if self.collecting:
            for layer in layers.values():
                if layer.candidates is not None:
                    layer.candidates.end_step()
            if step % S == A:
                if step <= max_steps:
                    self.reselect(step, max_steps, optimizer)
                for layer in layers.values():
                    layer.candidates = None
        elif (step + 1) % S == 0 and step + 1 + A <= max_steps:
            self._start_phase()

    @torch.no_grad()
    def reselect(self, step: int, max_steps: int, optimizer=None) -> int:
        """Drop/grow in every layer with gradient statistics; returns the number of slots changed."""
        p = reselection_rate(
            step, max_steps, self._selections == 0, self.config.reselection_rate, self.config.rate_policy
        )
        changed = 0
        for name, layer in self.layers().items():
            cand = layer.candidates
            if cand is None or not cand.ready:
                continue
            k = layer.values.numel()
            slots, new_idx, cpos = regrow(layer.indices.long(), layer.values, cand, int(k * p))
            seed_optimizer_state(optimizer, layer.values, slots, cand.mean_g()[cpos], cand.mean_g2()[cpos])
            layer.replace(slots, new_idx)
            changed += slots.numel()
            if layer.indices.unique().numel() != k:  # invariant: indices stay distinct
                raise RuntimeError(f"sparse grow/drop produced duplicate indices in {name}")
        self._selections += 1
        log.info("sparse: reselection at step %d (rate %.3f) changed %d slots", step, p, changed)
        return changed

    # --- resumable training: `peft-lab train` checkpoints this beside the parameters and optimizer ---
    def training_state(self) -> dict:
        """grow_drop's state outside the parameters: the selection count and an open phase's gradient statistics."""
        phases = {}
        for name, layer in self.layers().items():
            c = layer.candidates
            if c is not None:
                phases[name] = {"steps": c.steps}
                if c.idx is not None:
                    phases[name].update(idx=c.idx, step_sum=c.step_sum, g_sum=c.g_sum, g2_sum=c.g2_sum)
        return {"selections": self._selections, "candidates": phases}

    def load_training_state(self, state: dict) -> None:
        self._selections = int(state["selections"])
        for name, layer in self.layers().items():
            saved = state["candidates"].get(name)
            layer.candidates = None if saved is None else Candidates()
            if saved is not None:
                layer.candidates.steps = int(saved["steps"])
                if "idx" in saved:
                    c = layer.candidates
                    c.idx, c.step_sum = saved["idx"], saved["step_sum"]
                    c.g_sum, c.g2_sum = saved["g_sum"], saved["g2_sum"]
