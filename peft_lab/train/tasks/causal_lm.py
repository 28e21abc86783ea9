"""Causal language modelling: next-token cross-entropy over the text (padding masked out), perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peft_lab.train.tasks.base import TASKS, Task
from peft_lab.train.tasks.sequence_classification import pad

__all__ = ["CausalLM"]


@TASKS.register("causal_lm")
class CausalLM(Task):
    name = "causal_lm"
    columns = ("text",)
    metric = "eval_loss"
    higher_is_better = False

    def prepare(self, ds):
        tok, max_length = self.built.tokenizer, self.model_cfg.max_length

        def encode(b):
            enc = tok(b["text"], truncation=True, max_length=max_length)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing", keep_in_memory=True)

    def collate(self, batch):
        ids = pad(batch["input_ids"], self.built.tokenizer.pad_token_id or 0)
        mask = pad(batch["attention_mask"], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    @staticmethod
    def _token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        pred, target = logits[:, :-1].float(), batch["labels"][:, 1:]  # position t predicts token t+1
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
        return loss, (target != -100).sum()

    def loss(self, model, batch):
        total, n = self._token_losses(model, batch)
        return total / n.clamp(min=1)

    def eval_sums(self, model, batch, seed):
        total, n = self._token_losses(model, batch)
        return {"loss": total, "tokens": n}

    def finalize(self, sums):
        loss = sums["loss"] / max(sums["tokens"], 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
