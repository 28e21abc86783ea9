"""Low-rank factorisation of a delta: the truncated SVD that LoRA extraction and adapter-output merges share.

By Eckart–Young, the best rank-k approximation of a matrix M (in Frobenius norm) keeps its top k singular triplets,
M_k = U_k S_k V_kᵀ, with error ‖M − M_k‖_F² = Σ_{i>k} s_i². The rank is given (`RankRule.rank`) or is the smallest
that keeps a fraction of the energy ‖M‖_F² (`RankRule.energy`, capped by `max_rank`).

Three ways to the triplets (`truncated_svd`, `factored_svd`):

- exact: `torch.linalg.svd` of the whole matrix (small matrices, or a rank near min(m, n));
- randomized (Halko, Martinsson & Tropp 2011, https://arxiv.org/abs/0909.4061): a Gaussian sketch Y = M Ω with
  k + oversample columns, then subspace (power) iterations with re-orthonormalisation; after `min_iters` it
  stops once an iteration lowers the residual energy ‖M‖² − Σ_{i≤k} s̃_i² by less than `tol` of itself, and
  falls back to the exact SVD if `max_iters` is reached first;
- factored: M = scale·B A is never formed: QR of B and of Aᵀ, SVD of the small r×r core (exact, cheap).

Every result reports its rank, the kept energy and the relative error ‖M − U S Vh‖_F / ‖M‖_F, measured against M
itself (not estimated) for dense inputs, and from the whole spectrum for factored ones.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "RankRule",
    "SVDConfig",
    "Factors",
    "truncated_svd",
    "factored_svd",
    "numerical_rank",
    "relative_error",
    "seed_for",
]

_EPS32 = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class RankRule:
    """How many singular triplets to keep.

    Attributes:
        rank: a fixed rank (a matrix smaller than it keeps min(m, n), which is exact).
        energy: keep the smallest rank whose triplets hold this fraction of ‖M‖_F² (0 < energy <= 1).
        max_rank: with `energy`, never more than this.
    """

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None

    @property
    def cap(self) -> int | None:
        """The most triplets this rule can keep (None: up to min(m, n))."""
        return self.rank if self.rank is not None else self.max_rank


@dataclass(frozen=True)
class SVDConfig:
    """How to compute the SVD.

    Attributes:
        method: `auto` (exact for small matrices, else randomized), `exact` or `randomized`.
        exact_below: with `auto`, matrices whose min(m, n) is at most this get the exact SVD, and so do those where
            the sketch (rank + oversample) would be over a quarter of min(m, n), or where the rank is not capped.
        oversample: extra sketch columns beyond the rank.
        min_iters: power iterations always run.
        max_iters: power iterations at most; not converged by then means the exact SVD is used instead.
        tol: convergence of the randomized SVD: an iteration that lowers the residual energy by less than this
            fraction of it ends the iterations.
    """

    method: Literal["auto", "exact", "randomized"] = "auto"
    exact_below: int = 1024
    oversample: int = 10
    min_iters: int = 2
    max_iters: int = 12
    tol: float = 1e-4


@dataclass
class Factors:
    """The kept triplets of one matrix M (m, n): M ≈ U diag(S) Vh.

    Attributes:
        U: (m, k) float32.  S: (k,).  Vh: (k, n).
        energy: Σ_{i≤k} s_i² / ‖M‖_F² (1.0 for a zero matrix).
        error: ‖M − U diag(S) Vh‖_F / ‖M‖_F (0.0 for a zero matrix).
        method: `exact`, `randomized`, `factored`, or `exact (randomized did not converge)`.
        iters: power iterations run (randomized only).
        capped: the rule asked for more than min(m, n) triplets.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    energy: float
    error: float
    method: str
    iters: int = 0
    capped: bool = False

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    def balanced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (m, k), A (k, n)) with B A = U diag(S) Vh and √S on each side (both factors of the same scale, which
        suits low-precision storage)."""
        root = self.S.sqrt()
        return self.U * root, root[:, None] * self.Vh


def seed_for(name: str, seed: int = 0) -> int:
    """A stable per-tensor seed (the randomized SVD of a tensor does not depend on what was factored before it)."""
    return (int.from_bytes(hashlib.blake2b(name.encode(), digest_size=6).digest(), "little") + seed) % (2**63)


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above max(m, n)·eps·s_1 (numpy's matrix_rank tolerance): the others are float32 noise."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int((S > S[0] * max(shape) * _EPS32).sum())


def _keep(S: torch.Tensor, total: float, rule: RankRule, shape: tuple[int, int]) -> tuple[int, bool]:
    """How many of the (descending) singular values S to keep under `rule`; and whether the rule was capped."""
    full = min(shape)
    k = numerical_rank(S, shape)
    capped = False
    if rule.rank is not None:
        capped = rule.rank > full
        k = min(k, rule.rank)
    elif rule.energy is not None:
        if total > 0:
            cum = torch.cumsum(S.double() ** 2, 0) / total
            reach = int(torch.searchsorted(cum, torch.tensor([rule.energy - 1e-12], dtype=torch.float64)).item()) + 1
            k = min(k, reach)
        if rule.max_rank is not None:
            capped = rule.max_rank > full
            k = min(k, rule.max_rank)
    return max(k, 0), capped


def _sq_norm(M: torch.Tensor, block: int = 1 << 22) -> float:
    """‖M‖_F² accumulated in float64, in blocks of rows (a float64 copy of a whole large matrix would double the
    peak memory of an extraction)."""
    if M.dim() < 2 or M.numel() <= block:
        return float(torch.linalg.vector_norm(M, dtype=torch.float64) ** 2)
    step = max(1, block // max(M[0].numel(), 1))
    return sum(
        float(torch.linalg.vector_norm(M[s : s + step], dtype=torch.float64) ** 2) for s in range(0, len(M), step)
    )


def _residual(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, block: int = 1 << 22) -> float:
    """‖M − U diag(S) Vh‖_F², in blocks of about `block` elements along M's longer side (never a second full-size
    matrix), accumulated in float64."""
    US = U * S
    m, n = M.shape
    acc = 0.0
    if m >= n:
        step = max(1, block // max(n, 1))
        for s in range(0, m, step):
            acc += _sq_norm(M[s : s + step] - US[s : s + step] @ Vh)
    else:
        step = max(1, block // max(m, 1))
        for s in range(0, n, step):
            acc += _sq_norm(M[:, s : s + step] - US @ Vh[:, s : s + step])
    return acc


def relative_error(M: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """‖M − B A‖_F / ‖M‖_F (float64 accumulation, blockwise), e.g. for factors stored in a low-precision dtype."""
    M = M.float()
    total = _sq_norm(M)
    if total == 0.0:
        return 0.0
    return math.sqrt(_residual(M, B.float(), torch.ones(B.shape[1]), A.float()) / total)


def _result(M, U, S, Vh, total: float, method: str, iters: int = 0, capped: bool = False) -> Factors:
    if total == 0.0:
        return Factors(U, S, Vh, 1.0, 0.0, method, iters, capped)
    kept = float((S.double() ** 2).sum()) / total
    err = math.sqrt(max(_residual(M, U, S, Vh), 0.0) / total)
    return Factors(U, S, Vh, min(kept, 1.0), err, method, iters, capped)


def _exact(M: torch.Tensor, rule: RankRule, total: float, method: str = "exact") -> Factors:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k, capped = _keep(S, total, rule, tuple(M.shape))
    return _result(M, U[:, :k], S[:k], Vh[:k], total, method, capped=capped)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _randomized(M: torch.Tensor, rule: RankRule, total: float, cfg: SVDConfig, seed: int) -> Factors:
    m, n = M.shape
    cap = min(rule.cap, m, n)
    q = min(cap + cfg.oversample, m, n)
    g = torch.Generator().manual_seed(seed)
    Q = _orth(M @ torch.randn(n, q, generator=g))  # (m, q): a basis of the sketched range
    prev, iters = None, 0
    while True:
        Bm = Q.T @ M  # (q, n)
        Ub, S, Vh = torch.linalg.svd(Bm, full_matrices=False)
        res = total - float((S[:cap].double() ** 2).sum())
        converged = prev is not None and iters >= cfg.min_iters and prev - res <= cfg.tol * max(res, 1e-6 * total)
        if converged or (res <= 0.0 and iters >= cfg.min_iters):
            break
        if iters >= cfg.max_iters:  # still moving: not accurate enough, pay for the exact SVD
            return _exact(M, rule, total, method="exact (randomized did not converge)")
        prev = res
        Q = _orth(M @ _orth(Bm.T))  # one power iteration: range of M Mᵀ Q
        iters += 1
    k, capped = _keep(S, total, rule, (m, n))
    U = Q @ Ub[:, :k]
    return _result(M, U, S[:k], Vh[:k], total, "randomized", iters, capped)


def truncated_svd(M: torch.Tensor, rule: RankRule, cfg: SVDConfig | None = None, *, seed: int = 0) -> Factors:
    """The top singular triplets of a 2-D matrix under `rule` (module docstring).

    Args:
        M: (m, n), any float dtype (computed in float32).
        rule: the rank, or the energy to keep.
        cfg: exact / randomized and its settings.
        seed: the randomized sketch's seed (`seed_for(name)` makes it per tensor).
    Returns:
        `Factors` with U (m, k), S (k,), Vh (k, n).
    """
    cfg = cfg or SVDConfig()
    if M.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(M.shape)}")
    M = M.float()
    total = _sq_norm(M)
    m, n = M.shape
    if total == 0.0 or not math.isfinite(total):
        if not math.isfinite(total):
            raise ValueError("the matrix holds NaN or inf")
        return Factors(M.new_zeros(m, 0), M.new_zeros(0), M.new_zeros(0, n), 1.0, 0.0, "exact")
    cap = rule.cap
    small = min(m, n) <= cfg.exact_below or cap is None or 4 * (cap + cfg.oversample) > min(m, n)
    if cfg.method == "exact" or (cfg.method == "auto" and small) or cap is None:
        return _exact(M, rule, total)
    return _randomized(M, rule, total, cfg, seed)


def factored_svd(B: torch.Tensor, A: torch.Tensor, rule: RankRule, scale: float = 1.0) -> Factors:
    """The truncated SVD of M = scale · B A (B (m, r), A (r, n)) without forming M: QR of B and Aᵀ, SVD of the r×r
    core. Exact; the error comes from the whole spectrum, Σ_{i>k} s_i²."""
    B, A = B.float(), A.float()
    shape = (B.shape[0], A.shape[1])
    Qb, Rb = torch.linalg.qr(B, mode="reduced")  # (m, r'), (r', r)
    Qa, Ra = torch.linalg.qr(A.T, mode="reduced")  # (n, r'), (r', r)
    Uc, S, Vhc = torch.linalg.svd(scale * (Rb @ Ra.T), full_matrices=False)
    total = float((S.double() ** 2).sum())
    if total == 0.0:
        return Factors(B.new_zeros(shape[0], 0), B.new_zeros(0), B.new_zeros(0, shape[1]), 1.0, 0.0, "factored")
    k, capped = _keep(S, total, rule, shape)
    tail = float((S[k:].double() ** 2).sum())
    U, Vh = Qb @ Uc[:, :k], (Qa @ Vhc[:k].T).T
    return Factors(U, S[:k], Vh, 1.0 - tail / total, math.sqrt(tail / total), "factored", capped=capped)
