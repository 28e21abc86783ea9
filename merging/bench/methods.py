"""The merge methods of `peft-lab bench merge`: each one at its paper defaults and tuned on the validation split
(never on test), always through the project's own merge code.

- Data-free methods come from the registry (`merging.METHODS`): every method whose class does not need data
  (`needs_data` false) and takes the suite's number of models is a row, merged by `merging.sources.merge_trees`
  (the streaming code of `peft-lab merge`). Its "paper" row uses `SETTINGS[name].paper` (the class defaults when
  the method has no entry) and its "tuned" row the best of `SETTINGS[name].grid` on validation. A method
  registered later appears on its own at its class defaults; give it paper defaults and a grid by adding a
  `Setting` to SETTINGS, e.g.

      SETTINGS["breadcrumbs"] = Setting(Choice({"lambda_": 1.0}, {"density": 0.9, "gamma": 0.01}),
                                        lambda cfg: [Choice({"lambda_": x}, {"density": 0.9, "gamma": 0.01})
                                                     for x in (0.3, 0.5, 1.0)])

- Fisher: `diagonal_fisher` of each fine-tuned model on its training examples, merged by the `fisher` method
  (merge_trees with the Fisher trees given); tuned: the official search over Dirichlet(1) model weights.
- AdaMerging task-wise / layer-wise and AdaMerging++ layer-wise (TIES vectors from `ties_task_vectors`): the
  `adamerge` loop on unlabeled test inputs, as the paper; tuned: checkpoints of runs at the paper lr and at the
  other lrs of the config, picked on validation.
"""

from __future__ import annotations

import contextlib
import json
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from merging.base import METHODS
from merging.datadriven.adamerging import adamerge, merged_params
from merging.datadriven.fisher import diagonal_fisher
from merging.datadriven.gram import compute_grams
from merging.methods.adamerging import AdaMergingParams, official_ties, ties_task_vectors
from merging.methods.fisher import Fisher, FisherModelParams
from merging.methods.regmean import regmean_merge
from merging.methods.task_arithmetic import TaskArithmetic
from merging.sources import in_memory, merge_trees
from peft_lab.errors import UserError
from peft_lab.params import param_key

__all__ = ["ADA_VARIANTS", "Choice", "SETTINGS", "SeedRun", "Setting", "data_free_methods", "sign_conflicts"]

Params = dict[str, torch.Tensor]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class Choice:
    """One setting of a method: fields of its `Params` and of its per-model `ModelParams` (the same for every
    model)."""

    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def label(self, cls) -> dict[str, Any]:
        """The hyperparameters as a recipe writes them (`lambda`, not `lambda_`); a method run at its class
        defaults shows those defaults."""
        keys = {f.name: param_key(f) for f in _fields(cls.Params)}
        if not self.params and not self.model:
            model_keys = {f.name: param_key(f) for f in _fields(cls.ModelParams)}
            return {**_defaults(cls.Params, keys), **_defaults(cls.ModelParams, model_keys)}
        return {**{keys.get(k, k): v for k, v in self.params.items()}, **self.model}


def _fields(cls) -> tuple:
    return fields(cls) if hasattr(cls, "__dataclass_fields__") else ()


def _defaults(cls, keys: dict[str, str]) -> dict[str, Any]:
    d = cls()
    return {keys.get(f.name, f.name): getattr(d, f.name) for f in _fields(cls) if getattr(d, f.name) is not None}


@dataclass(frozen=True)
class Setting:
    """A method's paper defaults and its validation grid (each a Choice, or a function of the BenchConfig)."""

    paper: Choice | Callable[[Any], Choice] = field(default_factory=Choice)
    grid: Callable[[Any], list[Choice]] | None = None

    def paper_choice(self, cfg) -> Choice:
        return self.paper(cfg) if callable(self.paper) else self.paper


def _ties(density: float, lam: float) -> Choice:
    # the official TIES (arXiv 2306.01708, its code): trim over the whole model, elected sign with the
    # model-wide majority for zeros, disjoint mean
    return Choice(
        {"lambda_": lam, "normalize": True, "trim_scope": "global", "zero_sign": "majority"}, {"density": density}
    )


def _dare(density: float, lam: float, ties: bool) -> Choice:
    # DARE (arXiv 2311.03099): keep each entry with probability `density`, rescale the kept by 1/density
    p = {"lambda_": lam, "rescale": "keep_rate"}
    return Choice({**p, "normalize": True} if ties else p, {"density": density})


SETTINGS: dict[str, Setting] = {
    # the average of the fine-tuned models (Wortsman et al.): no hyperparameter
    "linear": Setting(),
    # the uniform soup of dense models (the sparse soup's shared-mask check does not apply to them)
    "soup": Setting(Choice({"check_masks": False})),
    # λ = 0.3: the AdaMerging repo's task-arithmetic baseline; the paper picks λ on validation
    "task_arithmetic": Setting(
        lambda cfg: Choice({"lambda_": cfg.ta_lambda}), lambda cfg: [Choice({"lambda_": x}) for x in cfg.ta_grid]
    ),
    # the TIES paper: top 20 % per task, λ = 1 (its README sweeps λ on validation)
    "ties": Setting(
        lambda cfg: _ties(cfg.ties_density, cfg.ties_lambda), lambda cfg: [_ties(d, x) for d, x in cfg.ties_grid]
    ),
    # the DARE paper's drop rate 0.9 over task arithmetic at the task-arithmetic λ, and over TIES at TIES' λ
    "dare_linear": Setting(
        lambda cfg: _dare(cfg.dare_density, cfg.ta_lambda, False),
        lambda cfg: [_dare(d, x, False) for d, x in cfg.dare_grid],
    ),
    "dare_ties": Setting(
        lambda cfg: _dare(cfg.dare_density, cfg.ties_lambda, True),
        lambda cfg: [_dare(d, x, True) for d, x in cfg.dare_ties_grid],
    ),
}

# methods that sum task vectors (no disjoint mean by default) and whose papers tune the scale on validation
# (Model Breadcrumbs, DELLA): at λ = 1 six summed task vectors overshoot, so they start at task arithmetic's λ
# with the class defaults for everything else, and their tuned rows search the task-arithmetic grid
for _name in ("breadcrumbs", "breadcrumbs_ties", "della_linear"):
    SETTINGS[_name] = Setting(
        lambda cfg: Choice({"lambda_": cfg.ta_lambda}), lambda cfg: [Choice({"lambda_": x}) for x in cfg.ta_grid]
    )

ADA_VARIANTS = (("adamerging (task-wise)", "task", False), ("adamerging (layer-wise)", "layer", False),
                ("adamerging_ties (layer-wise)", "layer", True))  # fmt: skip


def data_free_methods(n_models: int) -> tuple[list[tuple[str, type]], list[tuple[str, str]]]:
    """(name, class) of every registered data-free method that merges `n_models` models, and (name, why) of the
    registered ones left out."""
    run, skipped = [], []
    for name, cls in METHODS.items():
        if cls.needs_data:
            continue
        if n_models < cls.min_models or (cls.max_models is not None and n_models > cls.max_models):
            lo, hi = cls.min_models, cls.max_models
            takes = f"{lo}" if lo == hi else f"{lo} to {hi if hi is not None else 'any number of'}"
            base = " besides the base model" if cls.needs_base else ""
            skipped.append((name, f"merges {takes} fine-tuned model(s){base}; the suite has {n_models}"))
        else:
            run.append((name, cls))
    return run, skipped


class SeedRun:
    """One seed's models and results: θ_0, the fine-tuned models and task vectors, the rows scored so far."""

    def __init__(self, cfg, suite, seed: int, fts: list[Params], progress: Callable[[str], None]):
        self.cfg, self.suite, self.seed, self.fts, self.progress = cfg, suite, seed, fts, progress
        self.names, self.theta0, self.T = suite.names, suite.theta0, len(suite.tasks)
        self.taus = [{n: ft[n] - self.theta0[n] for n in self.names} for ft in fts]
        self.rows: list[dict] = []
        self.skipped: list[tuple[str, str]] = []
        self.t0 = cpu_seconds()

    def say(self, what: str) -> None:
        self.progress(f"[seed {self.seed}] {what} ({cpu_seconds() - self.t0:.0f} CPU-s)")

    # -- scoring ---------------------------------------------------------------------------------------
    def evaluate(self, params: Params | Callable[[int], Params], split: str, heads=None) -> list[tuple[float, float]]:
        """Per task, (accuracy, mean entropy) of `params` (one model for all tasks, or a function of the task)."""
        of = params if callable(params) else (lambda k: params)
        return [self.suite.evaluate(of(k), k, split, None if heads is None else heads[k]) for k in range(self.T)]

    def record(self, method: str, variant: str, hp: dict, results: list[tuple[float, float]]) -> float:
        for k, (acc, _) in enumerate(results):
            self.rows.append(
                {
                    "seed": self.seed,
                    "method": method,
                    "variant": variant,
                    "task": self.suite.tasks[k].name,
                    "split": "test",
                    "acc": acc,
                    "hparams": json.dumps(hp),
                }
            )
        return float(np.mean([a for a, _ in results]))

    def score(self, method: str, variant: str, params, hp: dict, heads=None) -> float:
        return self.record(method, variant, hp, self.evaluate(params, "test", heads))

    def val_avg(self, params: Params) -> float:
        return float(np.mean([a for a, _ in self.evaluate(params, "val")]))

    def pick(self, cands: Iterable[tuple[Callable[[], Params], dict]]) -> tuple[Params, dict]:
        """The candidate (built one at a time) with the best validation average; the first among equals."""
        best = (-1.0, None, None)
        for make, hp in cands:
            p = make()
            v = self.val_avg(p)
            if v > best[0]:
                best = (v, p, hp)
        return best[1], best[2]

    # -- data-free methods -----------------------------------------------------------------------------
    def merge(self, cls, choice: Choice) -> Params:
        """merge_trees with `choice`: task vectors over θ_0 for methods with a base, else the fine-tuned models."""
        method = cls(cls.Params(**choice.params))
        mps = [cls.ModelParams(**choice.model) for _ in range(self.T)]
        if cls.needs_base:
            return merge_trees(method, self.theta0, self.taus, mps, deltas=True, names=self.names)
        return merge_trees(method, None, self.fts, mps, names=self.names)

    def task_arithmetic_curve(self) -> list[dict]:
        """Task arithmetic along λ (0 and the grid): mean test accuracy and mean prediction entropy over tasks.
        AdaMerging minimises that entropy, so it can only help where lower entropy goes with higher accuracy.
        Reporting only: nothing is picked on these test numbers."""
        out = []
        for lam in (0.0, *self.cfg.ta_grid):
            p = self.theta0 if lam == 0 else self.merge(TaskArithmetic, Choice({"lambda_": lam}))
            res = self.evaluate(p, "test")
            out.append(
                {
                    "lambda": lam,
                    "acc": float(np.mean([a for a, _ in res])),
                    "entropy": float(np.mean([e for _, e in res])),
                    "per_task": {self.suite.tasks[k].name: {"acc": a, "entropy": e} for k, (a, e) in enumerate(res)},
                }
            )
        return out

    def data_free(self) -> None:
        methods, skipped = data_free_methods(self.T)
        self.skipped += skipped
        for name, cls in methods:
            setting = SETTINGS.get(name, Setting())
            try:
                choice = setting.paper_choice(self.cfg)
                self.score(name, "paper", self.merge(cls, choice), choice.label(cls))
                grid = setting.grid(self.cfg) if setting.grid else []
                if grid:
                    p, hp = self.pick(((lambda c=c: self.merge(cls, c)), c.label(cls)) for c in grid)
                    self.score(name, "tuned", p, hp)
            except UserError as e:  # a method that cannot run on this suite at these settings: say why, go on
                self.skipped.append((name, str(e)))
                self.rows = [r for r in self.rows if not (r["seed"] == self.seed and r["method"] == name)]
                continue
            self.say(f"{name} done")

    # -- Fisher ----------------------------------------------------------------------------------------
    def fisher(self) -> float:
        """Returns the CPU-seconds of computing the Fishers."""
        cfg, suite = self.cfg, self.suite
        c0 = cpu_seconds()
        gen = torch.Generator().manual_seed(self.seed)
        fishers = [
            diagonal_fisher(
                suite.load(self.fts[k], k),
                self.names,
                suite.batches(k, "train", 16, cfg.fisher_examples),
                labels="sample",
                chunk_size=16,
                generator=gen,
            )
            for k in range(self.T)
        ]
        suite.load(self.theta0, 0)
        spent = cpu_seconds() - c0
        n_ex = min(cfg.fisher_examples, min(len(t.splits["train"]["labels"]) for t in suite.tasks))

        def merge(weights) -> Params:
            mps = [FisherModelParams(weight=float(w)) for w in weights]
            return merge_trees(Fisher(), None, self.fts, mps, names=self.names, extra={"fishers": fishers})

        self.score("fisher", "paper", merge([1.0] * self.T), {"weights": "uniform", "examples": n_ex})
        rng = np.random.default_rng(self.seed)
        draws = [[1.0] * self.T] + [rng.dirichlet(np.ones(self.T)).tolist() for _ in range(cfg.fisher_grid)]
        p, hp = self.pick(
            ((lambda w=w: merge(w)), {"weights": "uniform" if i == 0 else [round(x, 3) for x in w]})
            for i, w in enumerate(draws)
        )
        self.score("fisher", "tuned", p, hp)
        self.say("fisher done")
        return spent

    # -- RegMean ---------------------------------------------------------------------------------------
    def regmean(self) -> float:
        """RegMean (arXiv 2212.09849): each Linear weight solved from the models' input Gram matrices on their
        tasks' training examples, other tensors averaged; paper α = 0.95, tuned: α on validation. Returns the
        CPU-seconds of computing the Grams."""
        cfg, suite = self.cfg, self.suite
        c0 = cpu_seconds()
        linear = [m for m, mod in suite.module.named_modules() if isinstance(mod, torch.nn.Linear)]
        linear = [m for m in linear if f"{m}.weight" in set(self.names)]
        grams = []
        for k in range(self.T):
            g = compute_grams(suite.load(self.fts[k], k), linear, suite.batches(k, "train", 16, cfg.regmean_examples))
            grams.append({f"{m}.weight": G for m, G in g.items()})
        suite.load(self.theta0, 0)
        spent = cpu_seconds() - c0
        n_ex = min(cfg.regmean_examples, min(len(t.splits["train"]["labels"]) for t in suite.tasks))

        def merge(alpha: float) -> Params:
            return regmean_merge(self.fts, grams, alpha=alpha, names=self.names)

        self.score("regmean", "paper", merge(cfg.regmean_alpha), {"alpha": cfg.regmean_alpha, "examples": n_ex})
        p, hp = self.pick(((lambda a=a: merge(a)), {"alpha": a}) for a in cfg.regmean_grid)
        self.score("regmean", "tuned", p, hp)
        self.say("regmean done")
        return spent

    # -- AdaMerging ------------------------------------------------------------------------------------
    def adamerging(self, extras: dict) -> None:
        cfg = self.cfg
        with task_vector_inputs(self.theta0, self.taus, self.names) as inputs:
            tv_ties = ties_task_vectors(inputs, self.names, cfg.ties_density)
        for label, gran, plus in ADA_VARIANTS:
            vecs = tv_ties if plus else self.taus
            runs = {}
            for lr in (cfg.ada_lr, *cfg.ada_tuned_lrs):
                c0 = cpu_seconds()
                runs[lr] = self._adamerge(vecs, gran, lr)
                extras["timing"][f"{label} lr={lr} cpu_s"] = cpu_seconds() - c0
            res, _ = runs[cfg.ada_lr]
            hp = {"lr": cfg.ada_lr, "steps": cfg.ada_steps, "batch": f"{cfg.ada_batches_per_step}x{cfg.ada_batch}"}
            self.score(label, "paper", merged_params(self.theta0, vecs, res.lambdas, self.names), hp)
            extras["lambdas"][label] = {"names": self.names, "lambdas": res.lambdas.tolist(), "losses": res.losses}
            cands = [
                ((lambda lam=lam: merged_params(self.theta0, vecs, lam, self.names)), {"lr": lr, "steps": s})
                for lr, (_, ckpts) in runs.items()
                for s, lam in ckpts.items()
            ]
            p, hp = self.pick(cands)
            self.score(label, "tuned", p, hp)
            self.say(f"{label} done")

    def _adamerge(self, vecs, granularity: str, lr: float):
        cfg, suite = self.cfg, self.suite
        g = torch.Generator().manual_seed(self.seed)
        samplers = [suite.sampler(k, "test", cfg.ada_batch, g, cfg.ada_batches_per_step) for k in range(self.T)]
        ckpts: dict[int, torch.Tensor] = {}
        every = max(cfg.ada_steps // max(cfg.ada_checkpoints, 1), 1)

        def keep(step, loss, lam):
            if (step + 1) % every == 0 or step + 1 == cfg.ada_steps:
                ckpts[step + 1] = lam.clamp(0, 1).clone()

        prm = AdaMergingParams(
            granularity=granularity,
            steps=cfg.ada_steps,
            lr=lr,
            batch_size=cfg.ada_batch,
            batches_per_step=cfg.ada_batches_per_step,
            heads=(),
        )
        res = adamerge(suite.module, self.theta0, vecs, suite.heads, samplers, prm, names=self.names, on_step=keep)
        return res, ckpts


@contextlib.contextmanager
def task_vector_inputs(theta0: Params, taus: list[Params], names: list[str]):
    """The in-memory task vectors as a merge's `MergeInputs` (what `prepare` and the TIES statistics read)."""
    streams = in_memory(TaskArithmetic(), theta0, taus, deltas=True, names=names)
    try:
        yield streams.merge_inputs()
    finally:
        streams.close()


def sign_conflicts(theta0: Params, taus: list[Params], names: list[str], density: float) -> dict[str, float]:
    """Per tensor, the fraction of parameters where the trimmed task vectors (top `density` per task, global)
    hold both signs: the conflicts TIES resolves by electing one sign."""
    ties, mp = official_ties(density, len(taus))
    with task_vector_inputs(theta0, taus, names) as inputs:
        ties.prepare(replace(inputs, model_params=mp), names=names)
    thr = ties.global_thresholds
    out = {}
    for n in names:
        kept = torch.stack([t[n] * (t[n].abs() >= th) for t, th in zip(taus, thr, strict=True)])  # (T, ...)
        out[n] = float(((kept > 0).any(0) & (kept < 0).any(0)).float().mean())
    return out
