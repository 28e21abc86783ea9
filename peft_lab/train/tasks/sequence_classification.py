"""Sequence classification: text -> one of K classes, cross-entropy loss, accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peft_lab.train.tasks.base import TASKS, Task

__all__ = ["SequenceClassification", "pad"]


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    """(B, T) int64, right-padded with `value` to the longest sequence of the batch (not to max_length: short
    batches run faster)."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


@TASKS.register("sequence_classification")
class SequenceClassification(Task):
    name = "sequence_classification"
    columns = ("text", "label")
    metric = "eval_accuracy"

    def prepare(self, ds):
        tok, max_length = self.built.tokenizer, self.model_cfg.max_length
        keep = [c for c in ("input_ids", "attention_mask", "token_type_ids")]

        def encode(b):
            enc = tok(b["text"], truncation=True, max_length=max_length)
            return {k: enc[k] for k in keep if k in enc}

        return ds.map(
            encode,
            batched=True,
            remove_columns=[c for c in ds.column_names if c != "label"],
            desc="tokenizing",
            keep_in_memory=True,
        )

    def collate(self, batch):
        pad_id = self.built.tokenizer.pad_token_id or 0
        out = {"input_ids": pad(batch["input_ids"], pad_id), "attention_mask": pad(batch["attention_mask"], 0)}
        if "token_type_ids" in batch:
            out["token_type_ids"] = pad(batch["token_type_ids"], 0)
        out["labels"] = torch.as_tensor(batch["label"], dtype=torch.long)
        return out

    def loss(self, model, batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, K)
        return F.cross_entropy(logits.float(), batch["labels"])

    def eval_sums(self, model, batch, seed):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()  # (B, K)
        y = batch["labels"]
        return {
            "loss": F.cross_entropy(logits, y, reduction="sum"),
            "correct": (logits.argmax(-1) == y).sum(),
            "count": torch.tensor(len(y)),
        }

    def finalize(self, sums):
        n = max(sums["count"], 1)
        return {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n}
