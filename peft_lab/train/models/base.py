"""Model builders: a frozen dataclass per entry (the Hydra schema of `conf/model/<name>.yaml`) whose `build(info)`
returns the model, its tokenizer (text) or noise scheduler (diffusion), and the names of its head modules (e.g. a
classification head initialised from scratch), which an adapter then trains in full (`modules_to_save`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peft_lab.errors import UserError
from peft_lab.params import Checked, build
from peft_lab.registry import Registry

__all__ = [
    "MODELS",
    "ModelConfig",
    "BuiltModel",
    "DataInfo",
    "build_model",
    "quiet_hf",
    "new_modules_from_keys",
    "TASK_NAMES",
]

MODELS: Registry[type[ModelConfig]] = Registry("model", package="peft_lab.train.models")
TASK_NAMES = ("sequence_classification", "causal_lm", "diffusion")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a model builder needs to know about the data.

    Attributes:
        label_names: class names (sequence classification: the head's size; diffusion: the conditioning classes).
        image_shape: (channels, height, width) for image data, else None.
    """

    label_names: tuple[str, ...] | None = None
    image_shape: tuple[int, int, int] | None = None

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)


@dataclasses.dataclass
class BuiltModel:
    """A freshly built model and what travels with it.

    Attributes:
        model: the full model (all parameters trainable; an adapter freezes what it does not train).
        tokenizer: for text models.
        noise_scheduler: a diffusers `DDPMScheduler` for diffusion models.
        head_modules: the task head: modules initialised from scratch (e.g. `classifier`) or otherwise untrained for
            this use; an adapter trains them in full (its `modules_to_save`, unless the config names its own).
        source: where the weights came from (a path, or "config" for a model built from a config).
    """

    model: nn.Module
    tokenizer: Any = None
    noise_scheduler: Any = None
    head_modules: list[str] = dataclasses.field(default_factory=list)
    source: str = "config"

    def save_pretrained(self, out_dir: str | Path) -> None:
        """An HF/diffusers model dir: config + safetensors weights (+ tokenizer / scheduler config)."""
        out = Path(out_dir)
        if _takes_safe(self.model):
            self.model.save_pretrained(out, safe_serialization=True)
        else:
            self.model.save_pretrained(out)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        if self.noise_scheduler is not None:
            self.noise_scheduler.save_pretrained(out)


def _takes_safe(model: nn.Module) -> bool:
    import inspect

    return "safe_serialization" in inspect.signature(model.save_pretrained).parameters


@dataclasses.dataclass(frozen=True)
class ModelConfig(Checked):
    """Fields every model takes.

    Attributes:
        task: what the model is trained for: `sequence_classification`, `causal_lm` or `diffusion`.
        init_seed: seeds the random initialisation (new heads, models built from a config); null = the run's seed.
    """

    name: ClassVar[str]
    task: str = "sequence_classification"
    init_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in self.tasks():
            raise UserError(
                f"model={self.name} does not support model.task={self.task!r}; it supports: {', '.join(self.tasks())}."
            )

    def tasks(self) -> tuple[str, ...]:
        return TASK_NAMES

    def build(self, info: DataInfo) -> BuiltModel:
        raise NotImplementedError


def build_model(name: str, info: DataInfo, **params: Any) -> BuiltModel:
    """The registered model `name` built with `params` for data described by `info`."""
    return build(MODELS.get(name), params, where=f"model={name}", prefix="model.").build(info)


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers/diffusers load reports and transformers/datasets progress bars (we log what matters)."""
    import transformers

    tl = transformers.utils.logging
    level = tl.get_verbosity()
    bars = tl.is_progress_bar_enabled()
    tl.set_verbosity_error()
    tl.disable_progress_bar()
    try:
        import diffusers

        dl = diffusers.utils.logging
        dlevel = dl.get_verbosity()
        dl.set_verbosity_error()
    except ImportError:  # pragma: no cover
        dl = None
    import datasets

    ds_bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        yield
    finally:
        tl.set_verbosity(level)
        if bars:
            tl.enable_progress_bar()
        if dl is not None:
            dl.set_verbosity(dlevel)
        if ds_bars:
            datasets.enable_progress_bar()


def new_modules_from_keys(model: nn.Module, missing_keys: set[str] | list[str]) -> list[str]:
    """Names of the smallest modules that own all of `missing_keys` (e.g. {'classifier.weight', 'classifier.bias'}
    -> ['classifier']): the layers a checkpoint did not provide."""
    owners = sorted({k.rsplit(".", 1)[0] for k in missing_keys if "." in k})
    modules = dict(model.named_modules())
    return [o for o in owners if o in modules]


def check_local_path(path: str, what: str) -> Path | None:
    """The local dir for `path`, None if it looks like a hub id, UserError if it looks local but is missing."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{what}={path}: is a file; give the model's directory (config.json + weights).")
        return p
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
        raise UserError(
            f"{what}={path}: no such directory. Give a local model dir (config.json + safetensors) or a hub id."
        )
    return None
