"""`train(cfg) -> metrics`: what `peft-lab train` does, callable without Hydra.

Order (every check that can fail on user input runs before the first optimizer step): resolve the config against
the registries -> build the dataset and check its columns -> build the model -> check the adapter's targets and
attach it -> train (resuming from a checkpoint in output_dir if there is one) -> evaluate -> write
`DIR/adapter/` (or `DIR/model/` for `adapter=none`), `DIR/metrics.json`, `DIR/config.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peft_lab.errors import UserError
from peft_lab.train.config import FullFineTune, RunConfig, resolve

__all__ = ["train", "attach_adapter", "data_info"]

log = logging.getLogger("peft_lab.train")
TRAIN_OUTPUT = "train"  # the output kind of model/ and base_model/ (`peft_lab.tree.fs.MARKER`)


def data_info(dd):
    """What the model builder needs from the data: class names, image shape."""
    import numpy as np

    from peft_lab.train.models import DataInfo

    train = dd["train"]
    labels = None
    if "label" in train.column_names:
        feat = train.features["label"]
        labels = tuple(feat.names) if hasattr(feat, "names") else tuple(str(x) for x in sorted(set(train["label"])))
    shape = None
    if "image" in train.column_names:
        img = np.asarray(train[0]["image"])
        shape = (1, *img.shape) if img.ndim == 2 else tuple(img.shape)
    return DataInfo(label_names=labels, image_shape=shape)


def _check_targets(model: torch.nn.Module, patterns: list[str] | None, what: str) -> None:
    """UserError naming each pattern that matches no module, with the model's adaptable layer names."""
    if not patterns:
        return
    from peft_lab.tree import matches

    names = [n for n, _ in model.named_modules() if n]
    bad = [p for p in patterns if not any(matches(n, p) for n in names)]
    if bad:
        leaves = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if n and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding))
            }
        )
        raise UserError(
            f"{what}: {', '.join(map(repr, bad))} match(es) no module of {type(model).__name__}. Its layer names "
            f"end in: {', '.join(leaves[:40])}{' ...' if len(leaves) > 40 else ''} (patterns match dotted suffixes, "
            "globs, or re:<regex>)."
        )


def attach_adapter(run: RunConfig, built) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter], Any]:
    """(module to train, its trainable parameters, the adapter or None for full fine-tuning)."""
    model = built.model
    if run.adapter_name == "none":
        cfg: FullFineTune = run.adapter
        _check_targets(model, cfg.freeze_modules, "adapter.freeze_modules")
        from peft_lab.tree import matches

        frozen = {n for n, _ in model.named_modules() if cfg.freeze_modules and matches(n, cfg.freeze_modules)}
        trainable = {}
        for n, p in model.named_parameters():
            owner = n.rsplit(".", 1)[0]
            keep = not any(owner == f or owner.startswith(f + ".") for f in frozen)
            p.requires_grad_(keep)
            if keep:
                trainable[n] = p
        return model, trainable, None
    from peft_lab.adapters.base import ADAPTERS

    cfg = run.adapter
    if built.head_modules and not cfg.modules_to_save:
        # a head initialised from scratch must be trained in full, or the adapter learns against a random head
        cfg = dataclasses.replace(cfg, modules_to_save=list(built.head_modules))
        log.info("training the head module(s) %s in full (adapter.modules_to_save)", ", ".join(built.head_modules))
    _check_targets(model, cfg.target_modules, "adapter.target_modules")
    _check_targets(model, cfg.modules_to_save, "adapter.modules_to_save")
    adapter = ADAPTERS.get(run.adapter_name)(cfg)
    module = adapter.attach(model)
    trainable = dict(adapter.trainable_parameters())
    if not trainable:
        raise UserError(
            f"adapter={run.adapter_name} attached to no parameter of {type(model).__name__}; "
            "check adapter.target_modules."
        )
    return module, trainable, adapter


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _local_inputs(run: RunConfig) -> list[str]:
    """The local files and dirs the run reads: the model dir (`model.path`) and data files (`data.path`,
    `data.data_files`) that exist on disk (hub ids are not paths)."""

    def flat(v: Any) -> list[Any]:  # data_files: a path, a list of them, or {split: path or list}
        if isinstance(v, Mapping):
            v = list(v.values())
        if isinstance(v, (str, bytes, os.PathLike)) or not hasattr(v, "__iter__"):
            return [v]
        return [x for item in v for x in flat(item)]

    values = [
        getattr(run.model, "path", None),
        getattr(run.data, "path", None),
        *flat(getattr(run.data, "data_files", None)),
    ]
    return [str(v) for v in values if isinstance(v, (str, os.PathLike)) and str(v) and Path(v).expanduser().exists()]


def _guard_outputs(run: RunConfig, out: Path) -> None:
    """Before any work: `out` is not an input nor inside one (files are written into it), and the dir replaced at
    the end (`adapter/`, or `model/` for full fine-tuning) holds no input and is a previous run's output, if any
    (`peft_lab.tree.fs.guard_output`). `base_model/` is only written when absent, so it is never replaced."""
    from peft_lab.adapters.base import ADAPTER_OUTPUT
    from peft_lab.tree import guard_output

    inputs = _local_inputs(run)
    guard_output(out, inputs, kind=TRAIN_OUTPUT, replaces=False, what="output_dir")
    final, kind = ("model", TRAIN_OUTPUT) if run.adapter_name == "none" else ("adapter", ADAPTER_OUTPUT)
    guard_output(out / final, inputs, kind=kind, overwrite=True, what="output_dir/" + final)


def train(cfg: RunConfig | Mapping[str, Any], output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fine-tune as configured and return the metrics written to `output_dir/metrics.json`.

    Args:
        cfg: a RunConfig, or a composed config (DictConfig/dict with model, data, adapter, trainer, logger, seed).
        output_dir: where outputs and checkpoints go (default: cfg's output_dir).
    """
    from peft_lab.eval.trained import for_run
    from peft_lab.train.loop import fit

    run = cfg if isinstance(cfg, RunConfig) else resolve(cfg)
    out = Path(output_dir or run.output_dir or "outputs/train").absolute()
    _guard_outputs(run, out)
    evaluator = for_run(run)  # `eval=NAME`: checked now, the trained model scored at the end
    accelerator = _accelerator(run)
    main = accelerator.is_main_process
    dd, built, task = _data_model_task(run)
    if main:
        _prepare_output_dir(out, built, run.trainer)
    total_before = sum(p.numel() for p in built.model.parameters())
    module, trainable, adapter = attach_adapter(run, built)
    n_train, n_total = _parameter_counts(run, module, trainable, total_before)
    splits = _splits(run, task, dd)
    config = run.to_dict()
    if main:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def open_session(step: int, state: dict):
        if not main:
            from peft_lab.train.loggers import Session

            return Session()
        return run.logger.open(out, {**config, "trainable_params": n_train, "total_params": n_total}, step, state)

    from accelerate.utils import set_seed

    set_seed(run.seed)
    res = fit(
        accelerator=accelerator,
        module=module,
        trainable=trainable,
        task=task,
        train_ds=splits["train"],
        val_ds=splits["validation"],
        test_ds=splits.get("test"),
        cfg=run.trainer,
        seed=run.seed,
        out_dir=out,
        open_session=open_session,
        adapter=adapter,
        fingerprint=run.fingerprint(),
    )
    accelerator.wait_for_everyone()
    metrics = _metrics(run, res, task, accelerator.num_processes, n_train, n_total)
    if main and evaluator is not None:
        metrics.update(_score(evaluator, run, res, built, out, accelerator))
    if main:
        _save_outputs(out, res, metrics, adapter, built, accelerator)
    if accelerator.num_processes == 1:
        # the next job of an in-process sweep may ask for another precision; accelerate keeps one global state
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    return metrics


def _score(evaluator, run: RunConfig, res, built, out: Path, accelerator) -> dict[str, Any]:
    """`eval=NAME`: the trained model scored by `peft_lab.eval` (DIR/eval.json, the logger); returns the score for
    metrics.json."""
    from peft_lab.eval import flat_metrics
    from peft_lab.eval.trained import score_trained

    module = accelerator.unwrap_model(res.module)
    record = score_trained(evaluator, run, module, built.tokenizer, out, accelerator.device)
    res.session.log(flat_metrics(record), res.state.step)
    log.info("eval=%s: %s %.4f -> %s", evaluator.name, record["metric"], record["score"], out / "eval.json")
    return {
        "eval_score": record["score"],
        "eval_metric": record["metric"],
        "eval_higher_is_better": record["higher_is_better"],
    }


def _accelerator(run: RunConfig):
    """The process setup: warnings, CPU threads, the `Accelerator` (seeded)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # PEFT calls a transformers property deprecated in v5 on every attach; not ours to fix, noise in every run
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    tcfg = run.trainer
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    # several processes without a GPU (torchrun / accelerate launch on CPUs): accelerate forms a gloo process
    # group only when told it runs on CPU, else every process would train alone
    cpu = tcfg.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision=tcfg.mixed_precision)
    set_seed(run.seed)
    return accelerator


def _data_model_task(run: RunConfig):
    """(the dataset, the built model, the task), the dataset's columns and the model checked against the task."""
    from peft_lab.train.tasks import TASKS

    dd = run.data.build()
    task_cls = TASKS.get(run.model.task)
    task_cls.check_columns(dd, f"data={run.data_name}")
    info = data_info(dd)
    torch.manual_seed(run.model.init_seed if run.model.init_seed is not None else run.seed)
    built = run.model.build(info)
    task = task_cls(built, run.model, run.data)
    task.check(dd)
    return dd, built, task


def _prepare_output_dir(out: Path, built, tcfg) -> None:
    """Create the output dir; with `save_base_model`, write the untrained model (with its fresh head) once."""
    out.mkdir(parents=True, exist_ok=True)
    if tcfg.save_base_model and not (out / "base_model").exists():
        from peft_lab.train.models.base import quiet_hf
        from peft_lab.tree import atomic_output_dir

        with atomic_output_dir(out / "base_model", kind=TRAIN_OUTPUT) as tmp, quiet_hf():
            built.save_pretrained(tmp)


def _parameter_counts(run: RunConfig, module, trainable: dict, total_before: int) -> tuple[int, int]:
    """(trainable, total) parameter counts (trained tensors outside the module included), logged."""
    n_train = sum(p.numel() for p in trainable.values())
    n_total = sum(p.numel() for p in module.parameters())
    n_total += sum(p.numel() for p in trainable.values() if not any(p is q for q in module.parameters()))
    log.info(
        "%s on %s with adapter=%s: %d trainable of %d parameters (%.3f%%); base model %d",
        run.model_name,
        run.data_name,
        run.adapter_name,
        n_train,
        n_total,
        100 * n_train / max(n_total, 1),
        total_before,
    )
    return n_train, n_total


def _splits(run: RunConfig, task, dd) -> dict[str, Any]:
    """Every split in the task's form; a validation split is required."""
    from peft_lab.train.models.base import quiet_hf

    with quiet_hf():
        splits = {k: task.prepare(v) for k, v in dd.items()}
    if "validation" not in splits:
        raise UserError(f"data={run.data_name}: no validation split (set data.validation_fraction > 0).")
    return splits


def _metrics(run: RunConfig, res, task, world: int, n_train: int, n_total: int) -> dict[str, Any]:
    """What metrics.json holds: the final evaluation, training statistics and what was trained."""
    state, tcfg = res.state, run.trainer
    samples = state.step * tcfg.batch_size * tcfg.grad_accum * world
    return {
        **res.metrics,
        "train_loss": state.loss_sum / state.step if state.step else None,
        "trainable_params": n_train,
        "total_params": n_total,
        "train_seconds": round(state.train_seconds, 3),
        "train_cpu_seconds": round(state.train_cpu_seconds, 3),
        "evaluation_seconds": round(state.eval_seconds, 3),
        "steps": state.step,
        "samples_per_second": round(samples / state.train_seconds, 3) if state.train_seconds else None,
        "task": task.name,
        "metric": task.metric,
        "model": run.model_name,
        "data": run.data_name,
        "adapter": run.adapter_name,
    }


def _save_outputs(out: Path, res, metrics: dict[str, Any], adapter, built, accelerator) -> None:
    """DIR/adapter/ (or DIR/model/ for full fine-tuning) and DIR/metrics.json; the logger session finished."""
    from peft_lab.adapters.base import ADAPTER_OUTPUT
    from peft_lab.tree import atomic_output_dir

    if adapter is not None:
        with atomic_output_dir(out / "adapter", kind=ADAPTER_OUTPUT, overwrite=True) as tmp:
            adapter.save(tmp)
    else:
        from peft_lab.train.models.base import quiet_hf

        built.model = accelerator.unwrap_model(res.module)
        with atomic_output_dir(out / "model", kind=TRAIN_OUTPUT, overwrite=True) as tmp, quiet_hf():
            built.save_pretrained(tmp)
    _write_json(out / "metrics.json", metrics)
    res.session.finish({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    evals = [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, float)]
    eval_metrics = ", ".join(evals)
    log.info("done: %s -> %s", eval_metrics, out)
