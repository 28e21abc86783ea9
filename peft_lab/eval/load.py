"""Loading what an evaluator scores: a model dir, or an adapter dir applied to its base model.

    ref = resolve_model("runs/merged")                        # a transformers model dir (config.json + weights)
    ref = resolve_model("runs/lora/adapter", base="runs/lora/base_model")   # an adapter on its base
    info = read_info(ref)                                     # config.json only: architecture, head size
    loaded = load_model(ref, "sequence_classification", device)

An adapter dir is a PEFT LoRA/LoKr dir (`adapter_config.json`) or a peft-lab adapter dir (`peft_lab_adapter.json`).
Its base is `base` when given, else the local dir its `adapter_config.json` names (`base_model_name_or_path`). The
base is loaded with the evaluator's auto class and the adapter's deltas are added to its weights
(`peft_lab.tree.apply_to_module`), so every adapter kind peft-lab reads is scored the same way. Weights are loaded
in float32 (a bfloat16 merge is scored in float32 arithmetic, as it was merged).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from peft_lab.errors import UserError
from peft_lab.eval.base import ModelInfo

__all__ = ["ModelRef", "LoadedModel", "resolve_model", "read_info", "load_model", "is_adapter_dir", "AUTO_CLASSES"]

AUTO_CLASSES = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
}
ADAPTER_FILES = ("adapter_config.json", "peft_lab_adapter.json")


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """What to score.

    Attributes:
        path: the model dir, or the adapter dir.
        base: the base model: what an adapter dir is applied to, and the default zero-shot label encoder (the
            pretrained model a merge or a fine-tune started from); None if unknown.
        label: how results name the model (defaults to `path`; a merge scored in its temporary dir names its output).
        adapter: `path` is an adapter dir (applied to `base`).
    """

    path: str
    base: str | None = None
    label: str | None = None
    adapter: bool = False

    @property
    def weights_dir(self) -> str:
        """The dir holding config.json (the base, for an adapter)."""
        return str(self.base) if self.adapter else self.path

    @property
    def name(self) -> str:
        return self.label or self.path


@dataclasses.dataclass
class LoadedModel:
    """A model ready to score.

    Attributes:
        model: the transformers module in eval mode, on its device, float32.
        tokenizer: its tokenizer (from the model dir, else from the base).
        info: what its config says.
        ref: where it came from.
        label_encoder: the dir whose encoder embeds zero-shot label prompts by default (the base model when there
            is one, else the model itself).
        device: where the model sits.
    """

    model: Any
    tokenizer: Any
    info: ModelInfo
    ref: ModelRef
    label_encoder: str | None
    device: Any


def is_adapter_dir(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in ADAPTER_FILES)


def resolve_model(path: str, base: str | None = None, *, what: str = "model", label: str | None = None) -> ModelRef:
    """Check that `path` is a model dir or an adapter dir (with a base); UserError saying what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"{what}={path}: no such directory; give a model dir (config.json + weights) or an adapter dir."
        )
    if not p.is_dir():
        raise UserError(f"{what}={path}: is a file; give the model's directory (config.json + safetensors weights).")
    if base is not None and not (Path(base).expanduser() / "config.json").is_file():
        raise UserError(f"{what}.base={base}: not a model dir (no config.json there).")
    if is_adapter_dir(p):
        base = base or _recorded_base(p)
        if base is None:
            raise UserError(
                f"{what}={path} is an adapter dir and names no local base model; give the model it was trained on "
                "with model.base=DIR (for a `peft-lab train` run: its DIR/base_model, written with "
                "trainer.save_base_model=true)."
            )
        return ModelRef(str(p), str(Path(base).expanduser()), label, adapter=True)
    if not (p / "config.json").is_file():
        raise UserError(
            f"{what}={path}: not a transformers model dir (no config.json) nor an adapter dir (no "
            f"{' or '.join(ADAPTER_FILES)}). The evaluators score Hugging Face model dirs."
        )
    return ModelRef(str(p), base and str(Path(base).expanduser()), label)


def _recorded_base(adapter: Path) -> str | None:
    cfg = adapter / "adapter_config.json"
    if not cfg.is_file():
        return None
    try:
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return None
    return base if base and (Path(base).expanduser() / "config.json").is_file() else None


def read_info(ref: ModelRef) -> ModelInfo:
    """The model's `config.json` (of the base, for an adapter dir) as a `ModelInfo`."""
    path = Path(ref.weights_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the model config ({e}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: not a model config (a JSON object).")
    archs = tuple(str(a) for a in cfg.get("architectures") or ())
    id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
    is_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    num_labels = cfg.get("num_labels") or (len(id2label) if id2label else None)
    return ModelInfo(
        path=str(Path(ref.weights_dir)),
        architectures=archs,
        model_type=str(cfg.get("model_type", "")),
        num_labels=int(num_labels) if is_cls and num_labels else (2 if is_cls else None),
        id2label=id2label if is_cls else {},
        max_positions=cfg.get("max_position_embeddings") or cfg.get("n_positions"),
    )


def load_model(ref: ModelRef, kind: str, device, *, what: str = "model") -> LoadedModel:
    """The model of `ref` loaded as `kind` (see AUTO_CLASSES), with the adapter applied when `ref` is one."""
    import torch
    import transformers

    from peft_lab.train.models.base import quiet_hf

    info = read_info(ref)
    auto = getattr(transformers, AUTO_CLASSES[kind])
    src = ref.weights_dir
    try:
        with quiet_hf():
            model = auto.from_pretrained(src, dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(ref))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{what}={ref.name}: could not load it as {AUTO_CLASSES[kind]} with its tokenizer ({first})."
        ) from None
    if ref.adapter:
        _apply_adapter(model, ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.eval().requires_grad_(False).to(device)
    return LoadedModel(model, tokenizer, info, ref, ref.base or ref.path, device)


def _tokenizer_dir(ref: ModelRef) -> str:
    """The model dir when it holds tokenizer files, else the base's (an adapter dir rarely has them)."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")
    if any((Path(ref.path) / n).is_file() for n in names):
        return ref.path
    return ref.weights_dir


def _apply_adapter(model, ref: ModelRef) -> None:
    """Add the adapter's deltas to the base weights of `model`, in place."""
    from peft_lab.tree import Tree, apply_to_module, load_tree

    base = Tree(dict(model.state_dict()), source=str(ref.base))
    delta = load_tree(ref.path, base=base)
    apply_to_module(model, delta)
