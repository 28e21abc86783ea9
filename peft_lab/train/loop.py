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
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]
    log.info("optimizer: AdamW lr=%g; %d tensors (%d values) with weight decay %g, %d tensors (%d values) without",
             cfg.lr, len(decay), sum(p.numel() for p in decay), cfg.weight_decay, len(rest), sum(p.numel() for p in rest))
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


def fit(*, accelerator, module, trainable: dict[str, torch.nn.Parameter], task, train_ds, val_ds, test_ds, cfg: TrainerConfig,
        seed: int, out_dir: Path, open_session, adapter=None, fingerprint: str | None = None) -> FitResult:
    """Train `module` (whose trainable parameters are `trainable`) for `cfg.max_steps` optimizer steps, resuming from
    the newest checkpoint in `out_dir/checkpoints` when there is one (and `cfg.resume`), then evaluate.

    `open_session(resume_step, logger_state)` opens the logger (main process) once the checkpoint is known."""
    optimizer = build_optimizer(trainable, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    module, optimizer = accelerator.prepare(module, optimizer)
    raw = accelerator.unwrap_model(module)
    # checkpoint = trained parameters (by state_dict name) + buffers; trained tensors the module does not own
    # (an adapter may keep some outside it) under their adapter names
    by_id = {id(p): n for n, p in raw.named_parameters()}
    extra = {f"adapter::{n}": p for n, p in trainable.items() if id(p) not in by_id}
    ckpt_root = out_dir / "checkpoints"
    state = TrainState()
    ckpt = latest_checkpoint(ckpt_root) if cfg.resume else None
    if ckpt is not None:
        saved = load_checkpoint(ckpt, module=raw, extra=extra, optimizer=optimizer, scheduler=scheduler, adapter=adapter,
                                rank=accelerator.process_index, fingerprint=fingerprint)
        state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})
        log.info("resumed from %s (step %d of %d)", ckpt, state.step, cfg.max_steps)
    session_obj = open_session(state.step, state.logger)
    state.logger = session_obj.state()

    def checkpoint() -> None:
        sd = raw.state_dict()
        train_names = {by_id[id(p)] for p in trainable.values() if id(p) in by_id}
        buffers = {n for n, _ in raw.named_buffers()}
        tensors = {k: v for k, v in sd.items() if k in train_names or k in buffers}
        tensors.update({k: p.detach() for k, p in extra.items()})
        adapter_state = adapter.training_state() if hasattr(adapter, "training_state") else None
        save_checkpoint(ckpt_root, state.step, tensors=tensors, optimizer=optimizer, scheduler=scheduler,
                        state={**state.__dict__, "fingerprint": fingerprint}, adapter_state=adapter_state,
                        rank=accelerator.process_index,
                        is_main=accelerator.is_main_process, keep=cfg.keep_checkpoints, barrier=accelerator.wait_for_everyone)

    def run_eval(final: bool = False) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = {f"val/{k}": v for k, v in evaluate(accelerator, module, task, val_ds, cfg.eval_batch_size).items()}
        if accelerator.is_main_process:
            with accelerator.autocast():
                extra_metrics, image = task.extras(raw.eval(), accelerator.device, state.step)
            raw.train()
            metrics.update({f"gen/{k}": v for k, v in extra_metrics.items()})  # samples: not tied to a split
            if image is not None:
                (out_dir / "samples").mkdir(exist_ok=True)
                image.save(out_dir / "samples" / f"step_{state.step:07d}.png")
                if final:
                    image.save(out_dir / "samples.png")
                session_obj.log_image("samples", image, state.step)
        if final and test_ds is not None:
            metrics.update({f"test/{k}": v for k, v in evaluate(accelerator, module, task, test_ds, cfg.eval_batch_size).items()})
        state.eval_seconds += time.perf_counter() - t0
        if not final:
            state.history.append({"step": state.step, **metrics})
        session_obj.log(metrics, state.step)
        log.info("step %d: %s", state.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    world, gas = accelerator.num_processes, cfg.grad_accum
    loader = torch.utils.data.DataLoader(
        Columnar(train_ds),
        batch_sampler=ResumableBatches(len(train_ds), cfg.batch_size, seed, accelerator.process_index, world,
                                       start=state.step * gas),
        collate_fn=task.collate, num_workers=cfg.num_workers,
        # its own generator: creating an iterator would otherwise draw from the global RNG, which a resumed run
        # has just restored, and shift every later dropout mask
        generator=torch.Generator().manual_seed(seed),
    )
    params = list(trainable.values())
    module.train()
    from tqdm.auto import tqdm

    # progress=None: tqdm decides (shown on a terminal only)
    disable = True if not accelerator.is_main_process else (None if cfg.progress is None else not cfg.progress)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=disable)
    window: list[float] = []
    batches = iter(loader)
    while state.step < cfg.max_steps:
        t0, c0 = time.perf_counter(), time.process_time()
        loss_acc = torch.zeros((), device=accelerator.device)
        for micro in range(gas):
            batch = _to(next(batches), accelerator.device)
            sync = contextlib.nullcontext() if micro == gas - 1 else accelerator.no_sync(module)
            with sync:
                loss = task.loss(module, batch)
                accelerator.backward(loss / gas)
            loss_acc += loss.detach().float() / gas
        if cfg.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the step
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if adapter is not None:
            adapter.on_optimizer_step(state.step, cfg.max_steps, getattr(optimizer, "optimizer", optimizer))
        step_loss = float(accelerator.reduce(loss_acc, "mean")) if world > 1 else float(loss_acc)
        state.train_seconds += time.perf_counter() - t0
        state.train_cpu_seconds += time.process_time() - c0
        state.loss_sum += step_loss
        window.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            row = {"train/loss": sum(window) / len(window), "train/lr": scheduler.get_last_lr()[0],
                   "train/epoch": state.step * gas * cfg.batch_size * world / len(train_ds)}
            session_obj.log(row, state.step)
            if bar.disable and accelerator.is_main_process:  # no bar (not a terminal): progress goes to the log
                log.info("step %d/%d: loss %.4f, lr %.3g, %.2f s/step", state.step, cfg.max_steps, row["train/loss"],
                         row["train/lr"], state.train_seconds / state.step)
            window.clear()
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
            run_eval()
        if cfg.save_every and (state.step % cfg.save_every == 0 or state.step == cfg.max_steps):
            state.logger = session_obj.state()
            checkpoint()
    bar.close()
    final = run_eval(final=True)
    split = "test" if test_ds is not None else "val"
    metrics = {f"eval_{k.split('/', 1)[1]}": v for k, v in final.items() if k.startswith((f"{split}/", "gen/"))}
    metrics.update({f"val_{k.split('/', 1)[1]}": v for k, v in final.items() if k.startswith("val/")})
    metrics["eval_split"] = "test" if test_ds is not None else "validation"
    return FitResult(state, metrics, module, session_obj)
