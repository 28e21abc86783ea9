"""What an adapter output looks like: `AdapterSettings`, shared by `peft-lab extract` and by merges with
`out_format: adapter`, and the recipe keys that set it.

Recipe keys (all optional but `out_format`):

    out_format: adapter          # model (default) | adapter
    adapter_rank: 16             # the rank of each matrix (a maximum: smaller deltas keep their own rank)
    energy: 0.9                  # or: the smallest rank keeping this fraction of each delta's energy ...
    max_rank: 64                 # ... and at most this
    adapter_format: peft         # peft (a PEFT LoRA dir) | kohya (a Kohya-format LoRA file, diffusion UIs)
    adapter_options: {rank_pattern: {q_proj: 32}, bias: auto, embeddings: lora, svd: auto, dtype: float32}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from peft_lab.errors import UserError
from peft_lab.params import Checked, build, param
from peft_lab.tree.lowrank import RankRule, SVDConfig

__all__ = [
    "AdapterSettings",
    "parse_adapter_keys",
    "adapter_keys_to_dict",
    "check_adapter_recipe",
    "RECIPE_KEYS",
    "FACTOR_DTYPES",
]

FACTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RECIPE_KEYS = ("out_format", "adapter_rank", "energy", "max_rank", "adapter_format", "adapter_options")
_FLAT = {"adapter_rank": "rank", "energy": "energy", "max_rank": "max_rank", "adapter_format": "format"}


@dataclass(frozen=True)
class AdapterSettings(Checked):
    """How deltas become an adapter.

    Attributes:
        rank: the rank of every matrix (capped at min(m, n), which is exact); None with `energy`, or for a merge
            that concatenates LoRA factors exactly.
        energy: keep the smallest rank that holds this fraction of each delta's squared Frobenius norm.
        max_rank: with `energy`: at most this rank.
        rank_pattern: module pattern -> rank, as PEFT's `rank_pattern` (a key matches a module name as a dotted
            suffix regex: `q_proj`, `layers\\.0\\..*`); an explicit rank above a matrix's min(m, n) is an error.
        format: `peft` (adapter_config.json + adapter_model.safetensors) or `kohya` (one safetensors file in
            the Kohya/LyCORIS layout, `lora_unet_*` / `lora_te*_*` keys, for diffusers and the diffusion UIs).
        bias: `auto`: bias deltas of adapted Linear/Conv layers go into PEFT's `lora_bias` unless an Embedding is
            adapted too (PEFT cannot combine them: the biases are then listed as not carried); `lora`: always (the
            embeddings are then saved whole); `none`: never.
        embeddings: `lora` (PEFT's embedding LoRA), `save` (the whole embedding in modules_to_save) or `none`.
        svd: `auto` (exact for small matrices, randomized with power iterations otherwise), `exact`, `randomized`.
        dtype: the factors' dtype on disk.
        component: Kohya key prefix: `auto` (from the base model's class: a diffusers UNet is `unet`, a CLIP text
            model `te`, a CLIP text model with projection `te2`), `unet`, `te`, `te1`, `te2`.
    """

    rank: int | None = param(None, within="[1, inf)", help="a LoRA rank is a positive integer")
    energy: float | None = param(None, within="(0, 1]", help="the fraction of each delta's energy to keep")
    max_rank: int | None = param(None, within="[1, inf)")
    rank_pattern: dict[str, int] = field(default_factory=dict)
    format: Literal["peft", "kohya"] = "peft"
    bias: Literal["auto", "lora", "none"] = "auto"
    embeddings: Literal["lora", "save", "none"] = "lora"
    svd: Literal["auto", "exact", "randomized"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    component: Literal["auto", "unet", "te", "te1", "te2"] = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.rank is not None and self.energy is not None:
            raise UserError("Give a rank or an energy to keep, not both (energy picks the rank of each matrix).")
        if self.max_rank is not None and self.energy is None:
            raise UserError("max_rank caps the rank that energy picks; with a fixed rank, give the rank alone.")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise UserError(f"rank_pattern: ranks must be positive integers, got {bad}.")
        for k in self.rank_pattern:
            try:
                re.compile(k)
            except re.error as e:
                raise UserError(f"rank_pattern: {k!r} is not a valid regular expression ({e}).") from None
        if self.bias == "lora" and self.embeddings == "lora":
            raise UserError(
                "bias: lora and embeddings: lora cannot go together: PEFT's lora_bias does not work with its "
                "Embedding LoRA. Use embeddings: save (the embeddings saved whole) or none, or bias: auto."
            )

    @property
    def factor_dtype(self) -> torch.dtype:
        return FACTOR_DTYPES[self.dtype]

    @property
    def needs_rank(self) -> bool:
        """No rule at all: only exact concatenation can write such an adapter."""
        return self.rank is None and self.energy is None and not self.rank_pattern

    def rule_for(self, module: str) -> tuple[RankRule, bool]:
        """The rank rule of a module, and whether its rank was given for it explicitly (rank_pattern)."""
        for key, r in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return RankRule(rank=r), True
        return RankRule(rank=self.rank, energy=self.energy, max_rank=self.max_rank), False

    def svd_config(self) -> SVDConfig:
        return SVDConfig(method=self.svd)


def parse_adapter_keys(raw: dict[str, Any], where: str) -> AdapterSettings | None:
    """Pop the adapter-output keys from a recipe dict; the settings when `out_format: adapter`, else None."""
    raw.pop("adapter_report", None)  # written into merge_recipe.yaml by an adapter-output merge: a record, not a key
    present = {k: raw.pop(k) for k in RECIPE_KEYS if k in raw}
    fmt = present.pop("out_format", None) or "model"
    if fmt not in ("model", "adapter"):
        raise UserError(f"{where}: out_format must be model or adapter, got {fmt!r}.")
    given = {k: v for k, v in present.items() if v is not None and v != {}}
    if fmt == "model":
        if given:
            raise UserError(
                f"{where}: {', '.join(given)} only apply with out_format: adapter (the merge writes a model dir)."
            )
        return None
    options = given.pop("adapter_options", {}) or {}
    if not isinstance(options, Mapping):
        raise UserError(f"{where}: adapter_options must be a mapping, got {options!r}.")
    flat = {_FLAT[k]: v for k, v in given.items()}
    clash = sorted(set(flat) & set(options))
    if clash:
        raise UserError(f"{where}: {', '.join(clash)} given both at the top level and in adapter_options.")
    return build(AdapterSettings, {**options, **flat}, where=f"{where}: adapter output")


_NOT_WITH_ADAPTER = {
    "slices": "a slices: recipe builds its layers from pieces of several models (its layers need not be the "
    "base's); give the inputs under models:",
    "modules": "a modules: recipe builds its layers from pieces of several models (its layers need not be the "
    "base's); give the inputs under models:",
    "tokenizer_source": "a tokenizer setting rebuilds the embedding rows, and an adapter keeps the base's "
    "vocabulary; leave it out",
    "tokenizer": "a tokenizer setting rebuilds the embedding rows, and an adapter keeps the base's vocabulary; "
    "leave it out",
    "chat_template": "an adapter dir holds no tokenizer files to write a chat template into; set it on the base "
    "model's tokenizer instead",
}


def check_adapter_recipe(adapter: AdapterSettings | None, base_ref: Any, raw: Mapping[str, Any], where: str) -> None:
    """`out_format: adapter` writes the merge as changes to base_model, tensor for tensor: a recipe without a plain
    base model, or with keys that change the output's layout or vocabulary, is refused."""
    if adapter is None:
        return
    if raw.get("merge_method") == "passthrough":
        raise UserError(
            f"{where}: passthrough copies one model as it is and takes no base_model, so there is no change to a "
            "base to write as an adapter. To turn a fine-tune into a LoRA on its base, run `peft-lab extract --base "
            "BASE --model MODEL --rank R --out OUT`; or use out_format: model."
        )
    if base_ref is None:
        raise UserError(
            f"{where}: out_format: adapter writes the merge as changes to a base model, and this recipe has no "
            "base_model (an input on its own has no base to be a change of). Give base_model, the model the "
            "inputs were fine-tuned from, or use out_format: model."
        )
    if getattr(base_ref, "lora", None) is not None:
        raise UserError(
            f"{where}: out_format: adapter writes changes to base_model, which PEFT loads onto a plain model, and "
            f"base_model here is {base_ref} (a model with a LoRA applied). Give the plain model as base_model and "
            "the LoRA as one of the models, or use out_format: model."
        )
    for key, why in _NOT_WITH_ADAPTER.items():
        if raw.get(key) is not None:
            raise UserError(
                f"{where}: {key} does not go with out_format: adapter, which writes each merged tensor as a change "
                f"to the same tensor of base_model: {why}. Or use out_format: model."
            )


def adapter_keys_to_dict(s: AdapterSettings | None) -> dict[str, Any]:
    """The recipe keys that give `s` back (for the recorded recipe)."""
    if s is None:
        return {}
    d: dict[str, Any] = {"out_format": "adapter"}
    inverse = {v: k for k, v in _FLAT.items()}
    defaults = AdapterSettings()
    options = {}
    for name in ("rank", "energy", "max_rank", "format", "rank_pattern", "bias", "embeddings", "svd", "dtype"):
        value = getattr(s, name)
        if name in inverse:
            if value is not None:
                d[inverse[name]] = value
        elif value != getattr(defaults, name):
            options[name] = dict(value) if isinstance(value, Mapping) else value
    if s.component != "auto":
        options["component"] = s.component
    if options:
        d["adapter_options"] = options
    return d
