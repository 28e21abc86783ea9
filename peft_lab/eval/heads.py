"""Zero-shot label-embedding heads: a classifier built from label text, never fitted to task data.

The protocol of the task-arithmetic / TIES / AdaMerging papers (CLIP's zero-shot head), for a sentence encoder:

    f(x)    = normalize(mean-pool(encoder(x)))                        features of a text, (d,)
    head[c] = scale · f_θ0(template.format(label=description of c))    one row per class, (C, d)
    logits  = head · f_θ(x)                                            scale x cosine similarity, (C,)

The label embeddings come from the *pretrained* encoder θ0 (the base of a merge or a fine-tune), the features of the
texts from the model being scored, so one frozen head per task serves the base, every fine-tune and every merge.
`scale` = 20 is a softmax temperature of 0.05 (it changes the loss, not the accuracy).

    enc, tok = load_encoder("path/to/all-MiniLM-L6-v2")
    W = label_head(enc, tok, ["business", "sport"])           # (2, 384), frozen
    clf = ZeroShotClassifier(enc, W)                           # logits = clf(input_ids, attention_mask)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "TEMPLATE",
    "SCALE",
    "mean_pool",
    "features",
    "encode_texts",
    "label_head",
    "ZeroShotClassifier",
    "load_encoder",
    "cached_label_head",
]

TEMPLATE = "This text is about {label}."
SCALE = 20.0


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """L2-normalised mean of the token states over the non-padding positions.

    Args:
        hidden: (B, L, d) last hidden states.
        attention_mask: (B, L), 1 for tokens, 0 for padding (None: every position counts).
    Returns:
        (B, d) unit vectors.
    """
    if attention_mask is None:
        return F.normalize(hidden.mean(1), dim=-1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


def features(encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
    """(B, d) normalised mean-pooled features of a batch; padding columns beyond the longest text are cut first
    (right padding: the same result, less compute)."""
    if attention_mask is not None:
        n = int(attention_mask.sum(1).max())
        input_ids, attention_mask = input_ids[:, :n], attention_mask[:, :n]
        kw = {k: v[:, :n] for k, v in kw.items() if v is not None}
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state  # (B, L, d)
    return mean_pool(hidden, attention_mask)


@torch.no_grad()
def encode_texts(
    encoder: torch.nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 64, batch_size: int = 64
) -> torch.Tensor:
    """(N, d) normalised features of `texts`, on the encoder's device."""
    device = next(encoder.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out.append(features(encoder, **enc))
    return torch.cat(out)


def label_head(
    encoder: torch.nn.Module,
    tokenizer,
    descriptions: Sequence[str],
    *,
    template: str = TEMPLATE,
    scale: float = SCALE,
    max_length: int = 64,
) -> torch.Tensor:
    """`scale` x the normalised features of `template` filled with each class's description: (C, d), the weight of
    a bias-free linear head (row c scores class c)."""
    prompts = [template.format(label=d) for d in descriptions]
    return scale * encode_texts(encoder, tokenizer, prompts, max_length=max_length)


class ZeroShotClassifier(torch.nn.Module):
    """An encoder with a frozen label-embedding head: logits = head · normalize(mean-pool(encoder(x))).

    Args:
        encoder: a transformers encoder returning `last_hidden_state` (e.g. `AutoModel` of a BERT).
        head: (C, d) from `label_head`; kept as a buffer (never trained).
    """

    def __init__(self, encoder: torch.nn.Module, head: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("head", head.detach().clone())

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return features(self.encoder, input_ids, attention_mask, **extra) @ self.head.T  # (B, C)


def load_encoder(path: str, device: torch.device | str = "cpu"):
    """(encoder, tokenizer) of a model dir as a bare transformer (`AutoModel`: a classification model's head is
    dropped), in float32 and eval mode."""
    import transformers

    from peft_lab.train.models.base import quiet_hf

    with quiet_hf():
        tok = transformers.AutoTokenizer.from_pretrained(path)
        enc = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
    return enc.eval().requires_grad_(False).to(device), tok


@functools.lru_cache(maxsize=8)
def _cached(path: str, descriptions: tuple[str, ...], template: str, scale: float, max_length: int) -> torch.Tensor:
    enc, tok = load_encoder(path)
    return label_head(enc, tok, descriptions, template=template, scale=scale, max_length=max_length)


def cached_label_head(
    path: str, descriptions: Sequence[str], *, template: str = TEMPLATE, scale: float = SCALE, max_length: int = 64
) -> torch.Tensor:
    """`label_head` of the encoder in the model dir `path` (on CPU), remembered per process: every trial of a search
    scores with the same frozen heads, embedded once."""
    return _cached(str(path), tuple(descriptions), template, float(scale), max_length).clone()
