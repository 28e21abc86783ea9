"""The settings of `peft-lab bench merge` (`BenchConfig`) and its presets: the paper defaults of each method
(merging/bench/methods.py says where each comes from), the validation grids of the tuned variants, and where a
preset cuts a budget to fit two CPU cores, what it cuts."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BenchConfig", "PRESETS", "QUICK"]


@dataclass(frozen=True)
class BenchConfig:
    suite: str = "digits"  # digits: 8 image-domain tasks on a residual MLP (default) | text: 6 text tasks on MiniLM
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = ()  # default: all of the suite's (built-in) tasks
    suite_set: tuple[
        tuple[str, float], ...
    ] = ()  # digits suite: overrides of DigitsConfig (width, features, ft_lr, ...)
    # text suite: your tasks as (name, JSONL file, label YAML or ""), the encoder ("" = all-MiniLM-L6-v2), the head
    task_files: tuple[tuple[str, str, str], ...] = ()
    model: str = ""
    template: str = "This text is about {label}."
    n_train: int = 400  # split sizes of a task file without splits (caps for one with splits)
    n_val: int = 100
    n_test: int = 300
    ft_steps: int = 300
    ft_lr: float = 5e-5
    # paper defaults (merging/bench/methods.py says where each comes from); presets say where a budget deviates
    ta_lambda: float = 0.3  # the AdaMerging repo's task-arithmetic baseline
    ties_density: float = 0.2  # TIES' top-20 % trim (also AdaMerging++'s)
    ties_lambda: float = 1.0  # the TIES paper's λ with its disjoint mean
    dare_density: float = 0.1  # DARE's drop rate 0.9
    fisher_examples: int = 4096  # official: 4096 training examples per model (capped by the split)
    regmean_examples: int = 256  # training examples per model for the Gram matrices (FusionBench's default)
    regmean_alpha: float = 0.95  # the RegMean paper's off-diagonal scaling
    ada_steps: int = 500
    ada_batch: int = 16
    ada_batches_per_step: int = 2  # official: 2 batches of 16 per task per step
    ada_lr: float = 1e-3
    # validation grids for the tuned variants
    ta_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    ties_grid: tuple[tuple[float, float], ...] = (
        (0.2, 0.3),
        (0.2, 0.5),
        (0.2, 0.7),
        (0.2, 1.0),
        (0.2, 1.5),
        (0.1, 1.0),
        (0.3, 1.0),
    )
    dare_grid: tuple[tuple[float, float], ...] = ((0.1, 0.1), (0.1, 0.3), (0.1, 0.5), (0.3, 0.3))
    dare_ties_grid: tuple[tuple[float, float], ...] = ((0.1, 0.5), (0.1, 1.0), (0.3, 1.0))
    fisher_grid: int = 8  # Dirichlet(1) weight draws (+ uniform), as the official coefficient search
    regmean_grid: tuple[float, ...] = (0.5, 0.7, 0.9, 0.95, 1.0)
    ada_tuned_lrs: tuple[float, ...] = (1e-2,)  # the tuned variant also tries these lrs
    ada_checkpoints: int = 4  # per run, the λ at every quarter of the steps are candidates of the tuned variant


PRESETS = {
    "digits": {},
    "digits-quick": dict(
        seeds=(0,),
        ta_grid=(0.1, 0.3, 0.5, 1.0),
        ties_grid=((0.2, 0.5), (0.2, 1.0)),
        dare_grid=((0.1, 0.3),),
        dare_ties_grid=((0.1, 1.0),),
        fisher_grid=3,
        ada_steps=200,
    ),
    # MiniLM on 2 CPU cores: AdaMerging at 80 steps of 1 x 16 inputs per task (official 500 x 2 x 16) with the lr
    # raised to keep the paper's largest total move of λ (500 x 1e-3 = 80 x 6.25e-3); tuned: its checkpoints
    "text": dict(
        suite="text",
        ada_steps=80,
        ada_batches_per_step=1,
        ada_lr=6.25e-3,
        ada_tuned_lrs=(),
        ta_grid=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
        ties_grid=((0.2, 0.5), (0.2, 1.0), (0.2, 1.5), (0.1, 1.0)),
        dare_grid=((0.1, 0.3), (0.1, 0.5), (0.3, 0.5)),
        dare_ties_grid=((0.1, 0.5), (0.1, 1.0)),
        fisher_grid=4,
    ),
    # one seed, 100 fine-tuning steps, a third of the test split and 60 validation texts, AdaMerging 15 steps (lr
    # scaled as above: 15 x 1/30 = the paper's 500 x 1e-3)
    "text-quick": dict(
        suite="text",
        seeds=(0,),
        ft_steps=100,
        n_val=60,
        n_test=100,
        fisher_examples=64,
        regmean_examples=64,
        regmean_grid=(0.9, 1.0),
        ada_steps=15,
        ada_batches_per_step=1,
        ada_lr=1 / 30,
        ada_tuned_lrs=(),
        ada_checkpoints=2,
        ta_grid=(0.3, 0.5, 1.0),
        ties_grid=((0.2, 1.0),),
        dare_grid=((0.1, 0.5),),
        dare_ties_grid=((0.1, 1.0),),
        fisher_grid=1,
    ),
}
QUICK = PRESETS["digits-quick"]
