"""`eval=classification`: accuracy and cross-entropy loss per task and averaged over tasks (unweighted).

    peft-lab eval model=DIR eval=classification 'eval.tasks=[bbc_news]'
    peft-lab eval model=DIR eval=classification eval.head=zero_shot 'eval.tasks=[a.jsonl,b.jsonl]'

Two heads:
- `model`: the model's own classification head (`*ForSequenceClassification`). A task's classes are matched to
  the head's outputs by name (`id2label`), else by index (integer labels, or a head with generic `LABEL_i`
  names and exactly as many outputs as the task has classes).
- `zero_shot`: frozen label-embedding heads (`peft_lab.eval.heads`): the model is used as a sentence encoder
  (mean-pooled, normalised features) and each task's head embeds "This text is about {label}." per class with
  the label encoder: the base model of a merge or an adapter by default (the pretrained encoder θ0), so the base,
  every fine-tune and every merge are scored against the same heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from peft_lab.errors import UserError
from peft_lab.eval.base import EVALUATORS, EvalResult, Evaluator, ModelInfo
from peft_lab.eval.heads import SCALE, TEMPLATE, ZeroShotClassifier, cached_label_head
from peft_lab.eval.tasks import TaskData, TaskSpec, load_task, task_spec
from peft_lab.params import param

__all__ = ["Classification", "head_indices"]


@EVALUATORS.register("classification")
@dataclasses.dataclass(frozen=True)
class Classification(Evaluator):
    """Text classification accuracy.

    Attributes:
        tasks: the tasks (`peft_lab.eval.tasks.TaskSpec` mappings, or dataset names / `.jsonl` paths).
        head: `model` (its own classification head) or `zero_shot` (label-embedding heads).
        label_encoder: zero-shot only: the model dir whose encoder embeds the label prompts (null: the base model
            of the merge / adapter, else the scored model itself).
        template: zero-shot prompt per class; `{label}` is replaced by the class's description.
        head_scale: zero-shot logit scale (20 = a softmax temperature of 0.05).
        max_length: tokens per text (longer texts are truncated).
    """

    name = "classification"
    kind = "sequence_classification"

    tasks: list[Any] = dataclasses.field(default_factory=list)
    head: str = param("model", choices=("model", "zero_shot"))
    label_encoder: str | None = None
    template: str = TEMPLATE
    head_scale: float = param(SCALE, within="(0, inf)")
    max_length: int = param(128, within="[2, inf)")

    def __post_init__(self) -> None:
        super().__post_init__()
        specs = [task_spec(t, f"eval.tasks[{i}]") for i, t in enumerate(self.tasks)]
        object.__setattr__(self, "tasks", specs)
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"eval.tasks: the task name(s) {', '.join(dup)} occur twice; give each task its own name.")
        try:
            ok = "{label}" in self.template and self.template.format(label="x") != self.template
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise UserError(
                f"eval.template={self.template!r} must contain {{label}} (and no other {{...}} field), e.g. "
                f"{TEMPLATE!r}."
            )

    def headline(self) -> tuple[str, bool]:
        return "accuracy", True

    def model_kind(self) -> str:
        return "encoder" if self.head == "zero_shot" else "sequence_classification"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["tasks"] = [_spec_dict(s) for s in self.tasks]
        return d

    def prepare(self) -> list[TaskData]:
        if not self.tasks:
            raise UserError(
                "eval=classification has no tasks: give eval.tasks, e.g. 'eval.tasks=[bbc_news]' or "
                "'eval.tasks=[{file: news.jsonl, split: val}]'."
            )
        return [load_task(s) for s in self.tasks]

    def check_model(self, info: ModelInfo, where: str) -> None:
        if self.head == "zero_shot":
            if info.is_causal_lm:
                raise UserError(
                    f"{where}: eval.head=zero_shot scores sentence encoders (BERT-like models, mean-pooled features); "
                    f"{info.path} is a causal language model ({info.describe()}). Score it with eval=perplexity or "
                    "eval=lm_eval."
                )
            return
        if not info.is_classifier:
            raise UserError(
                f"{where}: eval=classification with eval.head=model needs a sequence classifier "
                f"(*ForSequenceClassification); {info.path} is {info.describe()}. For a bare encoder use "
                "eval.head=zero_shot (label-embedding heads); for a causal LM use eval=perplexity or eval=lm_eval."
            )
        for task in self.prepare():
            head_indices(task, info, where)

    def run(self, model) -> EvalResult:
        tasks = self.prepare()
        results = {}
        for task in tasks:
            if self.head == "zero_shot":
                encoder = model.label_encoder if self.label_encoder is None else self.label_encoder
                if encoder is None:
                    raise UserError(
                        "eval.head=zero_shot: no model is known to embed the label prompts with; set "
                        "eval.label_encoder=DIR (the pretrained encoder the scored model started from)."
                    )
                W = cached_label_head(encoder, task.descriptions, template=self.template, scale=self.head_scale).to(
                    model.device
                )
                net, index = ZeroShotClassifier(model.model, W), list(range(len(task.classes)))
            else:
                net, index = _logits_of(model.model), head_indices(task, model.info, f"model={model.ref.name}")
            results[task.name] = self._score(net, model.tokenizer, task, index, model.device)
        metric, higher = self.headline()
        return EvalResult.averaged(results, metric, higher)

    @torch.no_grad()
    def _score(self, net, tokenizer, task: TaskData, index: list[int], device) -> dict[str, float]:
        """Summed loss and correct predictions over the task, in batches of texts sorted by length."""
        order = sorted(range(len(task.texts)), key=lambda i: len(task.texts[i]))
        y_all = torch.tensor([index[c] for c in task.labels])
        loss, correct = 0.0, 0
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            enc = tokenizer(
                [task.texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            logits = net(**enc).float()  # (B, C)
            y = y_all[idx].to(device)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        n = len(order)
        return {"accuracy": correct / n, "loss": loss / n, "examples": n}


def _logits_of(model: torch.nn.Module):
    def forward(**batch):
        return model(**batch).logits

    return forward


def head_indices(task: TaskData, info: ModelInfo, where: str) -> list[int]:
    """The head output of each of the task's classes (see the module docstring); UserError if they do not fit."""
    n = int(info.num_labels or 0)
    k = len(task.classes)
    if k > n:
        raise UserError(
            f"{where}: task {task.name!r} ({task.source}) has {k} classes ({_few(task.classes)}) but the model's "
            f"classification head has {n} outputs ({_few(info.id2label.values()) or 'unnamed'}), so it cannot "
            "score this task. Score a model trained on these classes, or use eval.head=zero_shot (label-embedding "
            "heads need no trained head)."
        )
    by_name = {v: i for i, v in info.id2label.items()}
    if all(c in by_name for c in task.classes):
        return [by_name[c] for c in task.classes]
    if task.int_labels or all(c.lstrip("-").isdigit() for c in task.classes):
        ids = [int(c) for c in task.classes]
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise UserError(
                f"{where}: task {task.name!r} ({task.source}) has integer label(s) {_few(bad)} outside the model's "
                f"head, which has {n} outputs (labels 0..{n - 1})."
            )
        return ids
    generic = all(v == f"LABEL_{i}" for i, v in info.id2label.items())
    if generic and k == n:
        return list(range(k))
    raise UserError(
        f"{where}: the labels of task {task.name!r} ({_few(task.classes)}) are not the names of the model's head "
        f"outputs ({_few(info.id2label.values())}); give the file the labels the model was trained on (or their "
        "integer ids), or use eval.head=zero_shot."
    )


def _few(items) -> str:
    items = [str(x) for x in items]
    return ", ".join(items[:8]) + (", ..." if len(items) > 8 else "")


def _spec_dict(s: TaskSpec) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    return {k: v for k, v in d.items() if v not in (None, {}, "") or k == "name"}
