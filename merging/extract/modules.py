"""Which module each tensor belongs to, and what kind of layer it is: the adapter writers need it, because PEFT
stores a LoRA for a Linear, a Conv and an Embedding differently and refuses one kind where another is.

The kinds come from the model itself, built on the meta device (no memory, no weights read) from the `config.json`
of an HF transformers or diffusers model dir: `nn.Linear` -> linear, `nn.Conv1d/2d/3d` -> conv (grouped ones
excepted), `nn.Embedding` -> embedding, transformers' GPT-2 `Conv1D` (weight stored transposed) -> conv1d_hf,
anything else -> other. Inputs without a config (a bare .safetensors file), or whose model cannot be built, fall
back to shapes and names: a 2-D `weight` is linear (embedding when its module is named like one: `embed`,
`wte`, `wpe`, `shared`), a 3-D to 5-D one is a convolution; a warning says so.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("peft_lab.extract")

__all__ = ["ModuleInfo", "ModuleMap", "module_map", "split_name", "LORA_KINDS"]

LORA_KINDS = ("linear", "conv", "embedding", "conv1d_hf")
_EMBED_NAME = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared)$")


@dataclass(frozen=True)
class ModuleInfo:
    """kind: linear | conv | embedding | conv1d_hf | other; has_bias: the module has a bias parameter."""

    kind: str
    has_bias: bool = False


def split_name(name: str) -> tuple[str, str]:
    """`a.b.weight` -> (`a.b`, `weight`); a top-level parameter has module ``."""
    module, _, param = name.rpartition(".")
    return module, param


class ModuleMap:
    """module name -> `ModuleInfo`, from a built model or from shapes (module docstring)."""

    def __init__(self, infos: dict[str, ModuleInfo], source: str):
        self.infos, self.source = infos, source

    def info(self, module: str) -> ModuleInfo:
        return self.infos.get(module, ModuleInfo("other"))

    def is_container(self, module: str, targets: Iterable[str]) -> bool:
        """Whether `module` holds one of `targets` below it (PEFT cannot save it whole and adapt its children)."""
        prefix = module + "." if module else ""
        return any(t.startswith(prefix) and t != module for t in targets)


def _from_model(model) -> dict[str, ModuleInfo]:
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()
    out = {}
    for name, mod in model.named_modules():
        has_bias = getattr(mod, "bias", None) is not None
        if isinstance(mod, nn.Linear):
            kind = "linear"
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = "conv" if mod.groups == 1 else "other"
        elif isinstance(mod, nn.Embedding):
            kind = "embedding"
        elif Conv1D and isinstance(mod, Conv1D):
            kind = "conv1d_hf"
        else:
            kind = "other"
        out[name] = ModuleInfo(kind, has_bias)
    return out


def _build_on_meta(model_dir: Path):
    """The model of an HF/diffusers dir on the meta device, or None (with the reason) when it cannot be built."""
    import torch

    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        return None, f"{model_dir} has no config.json"
    raw = json.loads(cfg_file.read_text())
    try:
        with torch.device("meta"):
            if "_class_name" in raw:  # diffusers
                import diffusers

                cls = getattr(diffusers, raw["_class_name"])
                return cls.from_config(cls.load_config(model_dir)), ""
            import transformers

            config = transformers.AutoConfig.from_pretrained(model_dir)
            arch = (getattr(config, "architectures", None) or [None])[0]
            cls = getattr(transformers, arch, None) if arch else None
            if cls is None:
                return transformers.AutoModel.from_config(config), ""
            return cls._from_config(config), ""
    except Exception as e:  # any model that cannot be built here: fall back to shapes (logged)
        return None, f"cannot build its model ({type(e).__name__}: {e})"


def _from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, ModuleInfo]:
    out: dict[str, ModuleInfo] = {}
    for name, shape in shapes.items():
        module, param = split_name(name)
        if param != "weight":
            continue
        if len(shape) == 2:
            kind = "embedding" if _EMBED_NAME.search(module) else "linear"
        elif 3 <= len(shape) <= 5:
            kind = "conv"
        else:
            kind = "other"
        out[module] = ModuleInfo(kind, f"{module}.bias" in shapes)
    return out


def module_map(model_dirs: Iterable[str | Path | None], shapes: dict[str, tuple[int, ...]]) -> ModuleMap:
    """The module kinds of the model whose tensors are `shapes` (name -> shape): from the first of `model_dirs`
    whose model can be built on the meta device and whose parameters are these names, else from the shapes."""
    reasons = []
    for d in model_dirs:
        if d is None or not Path(d).is_dir():
            continue
        model, why = _build_on_meta(Path(d))
        if model is None:
            reasons.append(why)
            continue
        infos = _from_model(model)
        known = {f"{m}.{p}" for m, mod in model.named_modules() for p, _ in mod.named_parameters(recurse=False)}
        missing = [n for n in shapes if split_name(n)[1] == "weight" and n not in known]
        if not missing:
            return ModuleMap(infos, str(d))
        reasons.append(f"the model built from {d}/config.json has no {missing[0]!r}")
    log.warning(
        "Layer kinds guessed from tensor shapes and names (%s): 2-D weights are Linear (Embedding when named like "
        "one), 3-D to 5-D ones convolutions.",
        "; ".join(reasons) or "no model config",
    )
    return ModuleMap(_from_shapes(shapes), "shapes")
