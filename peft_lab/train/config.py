"""The run's configuration, validated against the registries' dataclasses before anything is built.

Each Hydra group node (`model`, `data`, `adapter`, `logger`) names a registry entry in its `name` key (default:
the option it was chosen by, e.g. `adapter=lora` -> `lora`); its other keys are checked against that entry's
parameter dataclass, which is the schema: unknown keys, wrong types and out-of-range values become one
`UserError` naming the option and listing what it takes. Fields a YAML does not set take the dataclass defaults.
`trainer` is always `TrainerConfig`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from peft_lab.errors import UserError
from peft_lab.params import Checked, build, param

__all__ = ["TrainerConfig", "FullFineTune", "RunConfig", "resolve", "GROUPS", "group_schema"]

GROUPS = ("model", "data", "adapter", "trainer", "logger")


@dataclasses.dataclass(frozen=True)
class TrainerConfig(Checked):
    """The loop's settings (`conf/trainer/*.yaml`).

    Attributes:
        max_steps: optimizer steps (0 = evaluate and save the untrained model).
        batch_size: examples per process per micro-step; an optimizer step sees batch_size x grad_accum x processes.
        grad_accum: micro-steps accumulated per optimizer step.
        eval_batch_size: examples per forward pass at evaluation (no gradients, so larger is fine).
        lr, weight_decay, adam_betas, adam_eps: AdamW (weight decay only on weights with >= 2 dims).
        scheduler: `constant`, `linear` (decay to 0 at max_steps) or `cosine`; after `warmup_steps` of linear warm-up.
        max_grad_norm: clip the global gradient norm (null = no clipping).
        mixed_precision: `no`, `fp16` or `bf16` (accelerate's autocast; fp16 adds a gradient scaler).
        eval_every: evaluate on the validation split every N steps (0 = only at the end, then on validation + test).
        log_every: log the mean training loss every N steps.
        save_every: checkpoint every N steps and at the end (0 = never: a killed run starts over).
        keep_checkpoints: how many recent checkpoints to keep.
        resume: continue from the newest checkpoint in output_dir when there is one.
        save_base_model: also write the model as it was before training (with its fresh head) to
            DIR/base_model, the base `peft-lab merge` needs to merge the adapter back.
        progress: show a progress bar (null = only on a terminal).
        num_threads: torch CPU threads (null = torch's default).
        num_workers: DataLoader worker processes.
        cpu: run on CPU even if an accelerator is present.
    """

    max_steps: int = param(150, within="[0, inf)", help="the number of optimizer steps")
    batch_size: int = param(16, within="[1, inf)")
    grad_accum: int = param(1, within="[1, inf)")
    eval_batch_size: int = param(64, within="[1, inf)")
    lr: float = param(1e-3, within="(0, inf)")
    weight_decay: float = param(0.0, within="[0, inf)")
    adam_betas: list[float] = param(default_factory=lambda: [0.9, 0.999], within="[0, 1)")
    adam_eps: float = param(1e-8, within="(0, inf)")
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = param(0, within="[0, inf)")
    max_grad_norm: float | None = param(1.0, within="(0, inf)")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every: int = param(0, within="[0, inf)")
    log_every: int = param(10, within="[1, inf)")
    save_every: int = param(50, within="[0, inf)")
    keep_checkpoints: int = param(1, within="[1, inf)")
    resume: bool = True
    save_base_model: bool = False
    progress: bool | None = None
    num_threads: int | None = param(None, within="[1, inf)")
    num_workers: int = param(0, within="[0, inf)")
    cpu: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.adam_betas) != 2:
            raise UserError(f"trainer.adam_betas={list(self.adam_betas)} must be two numbers in [0, 1).")


@dataclasses.dataclass(frozen=True)
class FullFineTune(Checked):
    """`adapter=none`: train the model's own weights (full fine-tuning), saved as a model dir in DIR/model.

    Attributes:
        freeze_modules: name patterns of modules kept frozen (e.g. `embeddings`); empty = train everything.
    """

    freeze_modules: list[str] = dataclasses.field(default_factory=list)


def group_schema(group: str, key: str) -> type:
    """The parameter dataclass for option `key` of `group` (a UserError listing the options if unknown)."""
    if group == "trainer":
        return TrainerConfig
    if group == "adapter":
        if key == "none":
            return FullFineTune
        from peft_lab.adapters.base import ADAPTERS

        return ADAPTERS.get(key).Config
    if group == "model":
        from peft_lab.train.models import MODELS

        return MODELS.get(key)
    if group == "data":
        from peft_lab.data import DATASETS

        return DATASETS.get(key)
    if group == "logger":
        from peft_lab.train.loggers import LOGGERS

        return LOGGERS.get(key)
    raise KeyError(group)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated run: one dataclass instance per group plus the top-level keys."""

    model_name: str
    model: Any
    data_name: str
    data: Any
    adapter_name: str
    adapter: Any
    trainer: TrainerConfig
    logger_name: str
    logger: Any
    seed: int = 0
    output_dir: str | None = None
    eval: Any = None  # `eval=NAME`: the evaluator scoring the trained model (peft_lab.eval.trained)

    @property
    def eval_name(self) -> str | None:
        return None if self.eval is None else self.eval.name

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able: every group as {"name": key, **all its fields} (what config.yaml and W&B record)."""

        def node(name, obj):
            return {"name": name, **dataclasses.asdict(obj)} if name else dataclasses.asdict(obj)

        d = {
            "model": node(self.model_name, self.model),
            "data": node(self.data_name, self.data),
            "adapter": node(self.adapter_name, self.adapter),
            "trainer": node(None, self.trainer),
            "logger": node(self.logger_name, self.logger),
            "seed": self.seed,
        }
        if self.eval is not None:
            d["eval"] = self.eval.to_dict()
        return d

    def fingerprint(self) -> str:
        """Hash of what determines the training trajectory (not logging, paths or evaluation cadence): a checkpoint
        resumes only a run with the same fingerprint."""
        d = self.to_dict()
        d.pop("logger")
        d.pop("eval", None)
        for k in (
            "resume",
            "progress",
            "log_every",
            "eval_every",
            "save_every",
            "keep_checkpoints",
            "num_workers",
            "num_threads",
            "eval_batch_size",
            "save_base_model",
        ):
            d["trainer"].pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _node_name(node: Mapping[str, Any], group: str, choices: Mapping[str, str] | None) -> str:
    name = node.get("name") if isinstance(node, Mapping) else None
    if name is None and choices:
        name = choices.get(group)
    if name is None:
        raise UserError(
            f"the {group} config names no {group} (add `name: <registry key>` to it or choose one with {group}=...)."
        )
    return str(name)


def resolve(cfg: Any, choices: Mapping[str, str] | None = None) -> RunConfig:
    """A composed config (DictConfig or dict) -> RunConfig. `choices` are Hydra's group choices, used when a
    node has no `name`."""
    from omegaconf import DictConfig, OmegaConf, open_dict
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra", None)
            try:  # `${hydra:runtime.output_dir}` resolves only inside a Hydra job
                cfg.output_dir = cfg.get("output_dir")
            except OmegaConfBaseException:
                cfg.output_dir = None
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            raise UserError(
                f"{e.full_key} must be set (e.g. {e.full_key}=...); its config leaves it open (???)."
            ) from None
        except OmegaConfBaseException as e:
            raise UserError(f"the config does not resolve: {str(e).splitlines()[0]}") from None
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"seed={seed!r}: must be an integer.")
    out: dict[str, Any] = {}
    for group in GROUPS:
        node = dict(cfg.get(group) or {})
        params = {k: v for k, v in node.items() if k != "name" and not (k.startswith("_") and k.endswith("_"))}
        if group == "trainer":
            out["trainer"] = build(TrainerConfig, params, prefix="trainer.")
            continue
        name = _node_name(node, group, choices)
        obj = build(group_schema(group, name), params, where=f"{group}={name}", prefix=f"{group}.")
        out[group], out[f"{group}_name"] = obj, name
    extra = sorted(set(cfg) - set(GROUPS) - {"seed", "output_dir", "eval"})
    if extra:
        raise UserError(
            f"unknown top-level key(s) {', '.join(extra)}; the config has: {', '.join(GROUPS)}, seed, output_dir, eval."
        )
    return RunConfig(seed=seed, output_dir=cfg.get("output_dir"), eval=_evaluator(cfg.get("eval"), choices), **out)


def _evaluator(node: Any, choices: Mapping[str, str] | None) -> Any:
    """`eval=NAME` (peft_lab.eval): None when the run scores nothing beyond its own evaluation."""
    if node is None:
        return None
    from peft_lab.eval import build_evaluator

    node = dict(node)
    if "name" not in node and choices and choices.get("eval"):
        node["name"] = choices["eval"]
    return build_evaluator(node)
