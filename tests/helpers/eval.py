"""Tiny seeded transformers models for the evaluator tests: a BERT classifier, a BERT encoder and a Llama causal
LM, each saved as an HF dir with MiniLM's tokenizer (vocabulary 30522), plus noisy "fine-tunes" of a base dir and
small task files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TINY_BERT = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TINY_LLAMA = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=32,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _tokenizer():
    import transformers

    from peft_lab.train.models.text import minilm_path

    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def tiny_model(path: Path, kind: str = "classifier", *, num_labels: int = 2, id2label=None, seed: int = 0) -> Path:
    """Save a tiny model dir: kind `classifier` (BertForSequenceClassification), `encoder` (BertModel) or
    `causal_lm` (LlamaForCausalLM)."""
    import transformers

    torch.manual_seed(seed)
    tok = _tokenizer()
    if kind == "causal_lm":
        cfg = transformers.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TINY_LLAMA)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        labels = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        cfg = transformers.BertConfig(
            vocab_size=len(tok),
            num_labels=len(labels),
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            **TINY_BERT,
        )
        model = (transformers.BertForSequenceClassification if kind == "classifier" else transformers.BertModel)(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def finetunes(base: Path, root: Path, n: int = 2, scale: float = 0.05, seed: int = 1) -> list[Path]:
    """`n` copies of the model dir `base` with seeded noise added to every float tensor (config and tokenizer
    copied)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    sd = load_file(base / "model.safetensors")
    out = []
    for i in range(n):
        d = root / f"ft{i}"
        shutil.copytree(base, d)
        noisy = {
            k: (v + scale * (i + 1) * torch.randn(v.shape, generator=g)).contiguous() if v.is_floating_point() else v
            for k, v in sd.items()
        }
        save_file(noisy, d / "model.safetensors", metadata={"format": "pt"})
        out.append(d)
    return out


WORDS = ("match goal team score", "market shares profit bank", "film actor music show", "vote party minister law")


def task_file(path: Path, labels=("sport", "business"), n: int = 12, splits: bool = False, int_labels=False) -> Path:
    """A JSONL task file of `n` short texts over `labels` (round robin); with `splits`, a split per line."""
    rows = []
    for i in range(n):
        k = i % len(labels)
        row = {"text": f"{WORDS[k % len(WORDS)]} number {i}", "label": k if int_labels else labels[k]}
        if splits:
            row["split"] = ("train", "val", "test")[i % 3]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
