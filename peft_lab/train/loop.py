"""The one training loop, on `accelerate`: the same code runs on a CPU, a GPU, or several processes under
`accelerate launch` / `torchrun` (DDP; FSDP through accelerate's config), in mixed precision if asked.

Per optimizer step: `grad_accum` micro-batches (gradient sync only on the last), clip, AdamW step, LR schedule
step, the adapter's `on_optimizer_step` hook. Then, on schedule: log the mean training loss, evaluate on the
validation split, write a checkpoint. At the end: evaluate on validation and test. The task supplies the loss and
the evaluation; the loop knows nothing about text or images.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peft_lab.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from peft_lab.train.config import TrainerConfig
from peft_lab.train.sampler import Columnar, ResumableBatches, eval_batches

__all__ = ["TrainState", "FitResult", "fit", "evaluate", "build_optimizer", "build_scheduler"]

log = logging.getLogger("peft_lab.train")


@dataclass
class TrainState:
    """What the loop accumulates; saved in every checkpoint."""

    step: int = 0
    loss_sum: float = 0.0  # sum over steps of the step's mean loss (train_loss = loss_sum / step)
    train_seconds: float = 0.0  # time in optimizer steps only (no evaluation, no checkpoints)
    train_cpu_seconds: float = 0.0  # CPU time of this process (all threads) in those steps
    eval_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    logger: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    state: TrainState
    metrics: dict[str, float]  # final: val_* on validation, eval_* on test (validation if there is no test split)
    module: Any  # the trained module as accelerate prepared it
    session: Any  # the open logger session


def build_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases, norms and other vectors are not decayed)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    rest = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    log.info(
        "optimizer: AdamW lr=%g; %d tensors (%d values) with weight decay %g, %d tensors (%d values) without",
        cfg.lr,
        len(decay),
        sum(p.numel() for p in decay),
        cfg.weight_decay,
        len(rest),
        sum(p.numel() for p in rest),
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    w, total = cfg.warmup_steps, max(cfg.max_steps, 1)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / (w + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - w) / max(1, total - w))
        return 1.0 - progress if cfg.scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(accelerator, module, task, ds, batch_size: int) -> dict[str, float]:
    """The task's metrics on `ds`, each process taking its share, statistics summed over processes."""
    was_training = module.training
    module.eval()
    sums: dict[str, torch.Tensor] = {}
    data = Columnar(ds)
    for idx in eval_batches(len(ds), batch_size, accelerator.process_index, accelerator.num_processes):
        batch = _to(task.collate(data.__getitems__(idx)), accelerator.device)
        for k, v in task.eval_sums(module, batch, seed=idx[0]).items():
            v = v.detach().double()
            sums[k] = sums[k] + v if k in sums else v
    if accelerator.num_processes > 1:
        sums = {k: accelerator.reduce(v.to(accelerator.device), "sum") for k, v in sums.items()}
    module.train(was_training)
    return task.finalize({k: float(v) for k, v in sums.items()})


def fit(
    *,
    accelerator,
    module,
    trainable: dict[str, torch.nn.Parameter],
    task,
    train_ds,
    val_ds,
    test_ds,
    cfg: TrainerConfig,
    seed: int,
    out_dir: Path,
    open_session,
    adapter=None,
    fingerprint: str | None = None,
) -> FitResult:
    """Train `module` (whose trainable parameters are `trainable`) for `cfg.max_steps` optimizer steps, resuming from
    the newest checkpoint in `out_dir/checkpoints` when there is one (and `cfg.resume`), then evaluate.

    `open_session(resume_step, logger_state)` opens the logger (main process) once the checkpoint is known."""
    optimizer = build_optimizer(trainable, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    module, optimizer = accelerator.prepare(module, optimizer)
    loop = _Loop(
        accelerator,
        module,
        accelerator.unwrap_model(module),
        trainable,
        optimizer,
        scheduler,
        task,
        cfg,
        out_dir,
        val_ds,
        test_ds,
        adapter,
        fingerprint,
    )
    loop.resume()
    loop.session = open_session(loop.state.step, loop.state.logger)
    loop.state.logger = loop.session.state()
    loop.train(_loader(train_ds, task, cfg, seed, accelerator, loop.state.step), len(train_ds))
    final = loop.run_eval(final=True)
    return FitResult(loop.state, _final_metrics(final, test_ds is not None), module, loop.session)


def _loader(train_ds, task, cfg: TrainerConfig, seed: int, accelerator, step: int) -> torch.utils.data.DataLoader:
    """The training batches of this process from optimizer step `step` on (the same stream after a resume)."""
    return torch.utils.data.DataLoader(
        Columnar(train_ds),
        batch_sampler=ResumableBatches(
            len(train_ds),
            cfg.batch_size,
            seed,
            accelerator.process_index,
            accelerator.num_processes,
            start=step * cfg.grad_accum,
        ),
        collate_fn=task.collate,
        num_workers=cfg.num_workers,
        # its own generator: creating an iterator would otherwise draw from the global RNG, which a resumed run
        # has just restored, and shift every later dropout mask
        generator=torch.Generator().manual_seed(seed),
    )


def _final_metrics(final: dict[str, float], has_test: bool) -> dict[str, float]:
    """eval_* from test (validation if there is no test split) and generated samples, val_* from validation."""
    split = "test" if has_test else "val"
    metrics: dict[str, Any] = {
        f"eval_{k.split('/', 1)[1]}": v for k, v in final.items() if k.startswith((f"{split}/", "gen/"))
    }
    metrics.update({f"val_{k.split('/', 1)[1]}": v for k, v in final.items() if k.startswith("val/")})
    metrics["eval_split"] = "test" if has_test else "validation"
    return metrics


@dataclass
class _Loop:
    """One `fit`: the prepared module, optimizer and schedule, the state, and the steps of the loop."""

    accelerator: Any
    module: Any
    raw: Any  # the module unwrapped from accelerate's wrappers
    trainable: dict[str, torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    task: Any
    cfg: TrainerConfig
    out_dir: Path
    val_ds: Any
    test_ds: Any
    adapter: Any
    fingerprint: str | None
    state: TrainState = field(default_factory=TrainState)
    session: Any = None

    def __post_init__(self) -> None:
        # checkpoint = trained parameters (by state_dict name) + buffers; trained tensors the module does not own
        # (an adapter may keep some outside it) under their adapter names
        self.by_id = {id(p): n for n, p in self.raw.named_parameters()}
        self.extra = {f"adapter::{n}": p for n, p in self.trainable.items() if id(p) not in self.by_id}
        self.ckpt_root = self.out_dir / "checkpoints"

    def resume(self) -> None:
        ckpt = latest_checkpoint(self.ckpt_root) if self.cfg.resume else None
        if ckpt is None:
            return
        saved = load_checkpoint(
            ckpt,
            module=self.raw,
            extra=self.extra,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            adapter=self.adapter,
            rank=self.accelerator.process_index,
            fingerprint=self.fingerprint,
        )
        self.state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})
        log.info("resumed from %s (step %d of %d)", ckpt, self.state.step, self.cfg.max_steps)

    def checkpoint(self) -> None:
        acc, state = self.accelerator, self.state
        sd = self.raw.state_dict()
        train_names = {self.by_id[id(p)] for p in self.trainable.values() if id(p) in self.by_id}
        buffers = {n for n, _ in self.raw.named_buffers()}
        tensors = {k: v for k, v in sd.items() if k in train_names or k in buffers}
        tensors.update({k: p.detach() for k, p in self.extra.items()})
        adapter_state = self.adapter.training_state() if hasattr(self.adapter, "training_state") else None
        save_checkpoint(
            self.ckpt_root,
            state.step,
            tensors=tensors,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={**state.__dict__, "fingerprint": self.fingerprint},
            adapter_state=adapter_state,
            rank=acc.process_index,
            is_main=acc.is_main_process,
            keep=self.cfg.keep_checkpoints,
            barrier=acc.wait_for_everyone,
        )

    def run_eval(self, final: bool = False) -> dict[str, float]:
        t0 = time.perf_counter()
        acc, bs = self.accelerator, self.cfg.eval_batch_size
        metrics = {f"val/{k}": v for k, v in evaluate(acc, self.module, self.task, self.val_ds, bs).items()}
        if acc.is_main_process:
            metrics.update(self._samples(final))
        if final and self.test_ds is not None:
            metrics.update({f"test/{k}": v for k, v in evaluate(acc, self.module, self.task, self.test_ds, bs).items()})
        self.state.eval_seconds += time.perf_counter() - t0
        if not final:
            self.state.history.append({"step": self.state.step, **metrics})
        self.session.log(metrics, self.state.step)
        log.info("step %d: %s", self.state.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _samples(self, final: bool) -> dict[str, float]:
        """The task's generated samples (main process): their metrics, the image saved and logged."""
        step = self.state.step
        with self.accelerator.autocast():
            extra_metrics, image = self.task.extras(self.raw.eval(), self.accelerator.device, step)
        self.raw.train()
        if image is not None:
            (self.out_dir / "samples").mkdir(exist_ok=True)
            image.save(self.out_dir / "samples" / f"step_{step:07d}.png")
            if final:
                image.save(self.out_dir / "samples.png")
            self.session.log_image("samples", image, step)
        return {f"gen/{k}": v for k, v in extra_metrics.items()}  # samples: not tied to a split

    def optimizer_step(self, batches, params: list[torch.nn.Parameter]) -> float:
        """`grad_accum` micro-batches (gradients synchronised on the last), clip, step; the mean loss."""
        acc, cfg, gas = self.accelerator, self.cfg, self.cfg.grad_accum
        loss_acc = torch.zeros((), device=acc.device)
        for micro in range(gas):
            batch = _to(next(batches), acc.device)
            sync = contextlib.nullcontext() if micro == gas - 1 else acc.no_sync(self.module)
            with sync:
                loss = self.task.loss(self.module, batch)
                acc.backward(loss / gas)
            loss_acc += loss.detach().float() / gas
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        if self.adapter is not None:  # the torch optimizer inside accelerate's wrapper
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            self.adapter.on_optimizer_step(self.state.step, cfg.max_steps, inner)
        return float(acc.reduce(loss_acc, "mean")) if acc.num_processes > 1 else float(loss_acc)

    def log_losses(self, window: list[float], bar, n_train: int) -> None:
        """The mean training loss since the last log (and the LR, the epoch) to the logger, and without a
        progress bar to the log."""
        cfg, state, world = self.cfg, self.state, self.accelerator.num_processes
        row = {
            "train/loss": sum(window) / len(window),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/epoch": state.step * cfg.grad_accum * cfg.batch_size * world / n_train,
        }
        self.session.log(row, state.step)
        if bar.disable and self.accelerator.is_main_process:  # no bar (not a terminal): progress goes to the log
            log.info(
                "step %d/%d: loss %.4f, lr %.3g, %.2f s/step",
                state.step,
                cfg.max_steps,
                row["train/loss"],
                row["train/lr"],
                state.train_seconds / state.step,
            )
        window.clear()

    def train(self, loader, n_train: int) -> None:
        """Optimizer steps up to `max_steps`, each followed by what is due: a log line, an evaluation, a checkpoint."""
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        params = list(self.trainable.values())
        self.module.train()
        # progress=None: tqdm decides (shown on a terminal only)
        disable = True if not self.accelerator.is_main_process else (None if cfg.progress is None else not cfg.progress)
        bar = tqdm(
            total=cfg.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=disable
        )
        window: list[float] = []
        batches = iter(loader)
        while state.step < cfg.max_steps:
            t0, c0 = time.perf_counter(), time.process_time()
            step_loss = self.optimizer_step(batches, params)
            state.train_seconds += time.perf_counter() - t0
            state.train_cpu_seconds += time.process_time() - c0
            state.loss_sum += step_loss
            window.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                self.log_losses(window, bar, n_train)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
                self.run_eval()
            if cfg.save_every and (state.step % cfg.save_every == 0 or state.step == cfg.max_steps):
                state.logger = self.session.state()
                self.checkpoint()
        bar.close()
