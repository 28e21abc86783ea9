"""SpIEL-AG grow/drop reselection (https://arxiv.org/abs/2401.16405; AlanAnsell/peft `tuners/sft`).

Schedule (S = reselection_steps, A = selection_accumulation_steps, T = total steps, t = completed steps):
a selection phase starts at t = 0 and whenever (t + 1) % S == 0; while it runs, each backward pass hands the
dense gradient G = dy^T x of every sparse layer to its `Candidates` (the first one fixes the candidates C =
top-k of |G|; later ones accumulate G at C only). The phase ends when t % S == A: drop the n = int(k·p) slots with
the smallest |v| and grow the top-n candidates by |Σg| that are not active; p = 1 at the first selection,
then p0·(1 − t/T) ("linear") or p0·(1 + cos(π t/T))/2 ("cosine"). Changed slots get v = 0 and Adam moments
seeded with the candidates' mean gradient and mean squared gradient.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Candidates", "reselection_rate", "regrow", "seed_optimizer_state"]


class Candidates:
    """Gradient statistics at a fixed candidate set during one selection phase.

    Per optimizer step the gradients of its backward passes are summed (the gradient the optimizer sees), then
    `end_step` adds that sum and its square to the phase totals, so `mean_g`/`mean_g2` are per-step moments.
    """

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None  # (c,) int64 flat candidate indices
        self.step_sum: torch.Tensor | None = None
        self.g_sum: torch.Tensor | None = None
        self.g2_sum: torch.Tensor | None = None
        self.steps = 0

    @torch.no_grad()
    def add(self, G: torch.Tensor, k: int) -> None:
        """One backward pass's dense gradient G (out, in) of the layer."""
        g = G.reshape(-1).float()
        if self.idx is None:
            self.idx = torch.topk(g.abs(), min(k, g.numel()), sorted=True).indices
            self.step_sum = torch.zeros(self.idx.numel(), dtype=torch.float32, device=g.device)
            self.g_sum = torch.zeros_like(self.step_sum)
            self.g2_sum = torch.zeros_like(self.step_sum)
        self.step_sum += g[self.idx]

    def end_step(self) -> None:
        if self.idx is not None:
            self.g_sum += self.step_sum
            self.g2_sum += self.step_sum.square()
            self.step_sum.zero_()
            self.steps += 1

    @property
    def ready(self) -> bool:
        return self.idx is not None and self.steps > 0

    def mean_g(self) -> torch.Tensor:
        return self.g_sum / self.steps

    def mean_g2(self) -> torch.Tensor:
        return self.g2_sum / self.steps


def reselection_rate(step: int, max_steps: int, first: bool, initial_rate: float, policy: str) -> float:
    """Fraction of slots replaced at `step` (1 at the first selection: it replaces the random init)."""
    if first:
        return 1.0
    frac = min(max(step / max(max_steps, 1), 0.0), 1.0)
    if policy == "cosine":
        return initial_rate * (1 + math.cos(math.pi * frac)) / 2
    return initial_rate * (1 - frac)


@torch.no_grad()
def regrow(
    idx: torch.Tensor, values: torch.Tensor, cand: Candidates, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the n smallest-|v| slots and grow the best candidates into them.

    Args:
        idx: (k,) int64 active flat indices (unique).
        values: (k,) current values.
        cand: candidate statistics (`ready`).
        n: slots to replace.
    Returns:
        slots (c,) int64 slot positions that change, new_idx (c,) their new flat indices, cpos (c,) positions
        of those indices within `cand.idx` (for optimizer seeding); c <= n. A dropped index that is grown again
        keeps its slot and value; if fewer than n candidates are new, fewer slots change.
    """
    k = idx.numel()
    n = min(n, k)
    empty = idx.new_empty(0)
    if n <= 0:
        return empty, empty, empty
    order = torch.argsort(values.detach().abs().float(), stable=True)
    dropped = order[:n]  # slot positions, smallest |v| first
    keep = torch.ones(k, dtype=torch.bool, device=idx.device)
    keep[dropped] = False
    remaining = idx[keep]
    # candidates not still active, best |Σg| first
    free = ~torch.isin(cand.idx, remaining)
    cpos_all = free.nonzero().flatten()
    cpos_all = cpos_all[torch.argsort(cand.g_sum[cpos_all].abs(), descending=True, stable=True)][:n]
    incoming = cand.idx[cpos_all]
    regrown = torch.isin(incoming, idx[dropped])  # dropped and grown again: leave those slots alone
    new_idx, cpos = incoming[~regrown], cpos_all[~regrown]
    vacated = dropped[~torch.isin(idx[dropped], incoming)]  # still in smallest-|v| order
    c = min(new_idx.numel(), vacated.numel())
    return vacated[:c], new_idx[:c], cpos[:c]


@torch.no_grad()
def seed_optimizer_state(
    optimizer, param: torch.nn.Parameter, slots: torch.Tensor, mean_g: torch.Tensor, mean_g2: torch.Tensor
) -> None:
    """Reset the per-element optimizer state of `param` at `slots` for newly grown entries.

    Adam-family state (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`) is seeded so that, with PyTorch's per-tensor
    step count t, the bias-corrected moments equal the candidates' means: m = mean(g)·(1 − β1^t),
    v = mean(g²)·(1 − β2^t) (SpIEL keeps a per-element age instead; torch's Adam has one step per tensor). Any
    other per-element state (e.g. SGD's momentum buffer) is zeroed at `slots`.
    """
    if optimizer is None or slots.numel() == 0 or param not in optimizer.state:
        return
    state = optimizer.state[param]
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    betas = group.get("betas", (0.9, 0.999)) if group is not None else (0.9, 0.999)
    t = float(state["step"]) if "step" in state else 0.0
    for key, buf in state.items():
        if not isinstance(buf, torch.Tensor) or buf.shape != param.shape:
            continue
        if key == "exp_avg" and t > 0:
            buf[slots] = (mean_g * (1 - betas[0] ** t)).to(buf.dtype)
        elif key in ("exp_avg_sq", "max_exp_avg_sq") and t > 0:
            buf[slots] = (mean_g2 * (1 - betas[1] ** t)).to(buf.dtype)
        else:
            buf[slots] = 0
