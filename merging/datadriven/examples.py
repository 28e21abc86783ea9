"""The examples data-driven merges need, from a `data` config, and the glue that runs the models on them.

Fisher merging needs examples of each model's task (labels only for `labels: empirical`); AdaMerging needs
unlabeled examples of each task. A `data` config names them, one entry per input model in the order of
`models` (or one entry for all models):

    data:
      tasks:                           # one per model; or a single mapping used for every model
        - {dataset: bbc_news, split: train}                      # a registered dataset (peft_lab.data)
        - {path: my_task.csv, text_column: sentence}             # a local csv/json/jsonl file
      num_examples: 256                # per model (Fisher) / per task pool (AdaMerging)
      batch_size: 16
      max_length: 128                  # tokens per text example

Each model is loaded as a sequence classifier from its own directory (an HF model dir); an adapter input is
its base model with the adapter's delta added. The columns must fit the model: `text` (or `text_column`) for
text models, and labels below the model's number of classes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from peft_lab.errors import UserError
from peft_lab.tree import Tree, apply_to_module, is_delta

__all__ = [
    "TaskSpec",
    "MergeData",
    "parse_data",
    "load_examples",
    "model_dir",
    "name_map",
    "batches",
    "fishers_from_data",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    dataset: str | None = None  # a registered dataset (peft_lab.data), e.g. bbc_news
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # its builder's parameters
    path: str | None = None  # or a local csv/json/jsonl file
    split: str | None = None  # default: train (Fisher), test (AdaMerging, unlabeled as in the paper)
    text_column: str = "text"
    label_column: str = "label"

    def __post_init__(self):
        if bool(self.dataset) == bool(self.path):
            raise UserError(
                "data: each task names exactly one of `dataset` (a registered dataset) or `path` (a local file)."
            )


@dataclasses.dataclass(frozen=True)
class MergeData:
    tasks: tuple[TaskSpec, ...]
    num_examples: int | None = None
    batch_size: int | None = None
    max_length: int = 128


def parse_data(cfg: Any, n_models: int) -> MergeData:
    """A `data` config (dict / OmegaConf) -> MergeData with one TaskSpec per model."""
    if cfg is None:
        raise UserError("this merge method needs a `data` config naming each model's examples.")
    if hasattr(cfg, "items") and not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    top = {k: cfg.pop(k) for k in ("num_examples", "batch_size", "max_length") if k in cfg}
    tasks = cfg.pop("tasks", None)
    if tasks is None:  # one task for every model
        tasks = [dict(cfg)] * n_models
    elif cfg:
        raise UserError(f"data: unknown key(s) {', '.join(sorted(cfg))} beside `tasks`.")
    if isinstance(tasks, Mapping):
        tasks = [tasks] * n_models
    if len(tasks) != n_models:
        raise UserError(
            f"data.tasks has {len(tasks)} entries for {n_models} models: give one per model, in the order of `models`."
        )
    specs = []
    fields = {f.name for f in dataclasses.fields(TaskSpec)}
    for i, t in enumerate(tasks):
        t = dict(t)
        extra = {k: t.pop(k) for k in list(t) if k not in fields}
        try:
            specs.append(TaskSpec(**{**t, "params": {**dict(t.get("params") or {}), **extra}}))
        except TypeError as e:
            raise UserError(f"data.tasks[{i}]: {e}.") from None
    return MergeData(tuple(specs), **top)


def load_examples(spec: TaskSpec, default_split: str) -> tuple[list[Any], list[int] | None]:
    """(inputs, labels or None) of one task's split."""
    split = spec.split or default_split
    if spec.path:
        p = Path(spec.path)
        if not p.is_file():
            raise UserError(f"data: {p} does not exist.")
        import datasets

        kind = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}.get(p.suffix.lower())
        if kind is None:
            raise UserError(f"data: {p}: unsupported file type {p.suffix!r} (csv, tsv, json, jsonl).")
        kw = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
        try:
            ds = datasets.load_dataset(kind, data_files={"train": str(p)}, **kw)["train"]
        except ValueError as e:  # an empty file has no "train" split at all
            raise UserError(f"data: {p} could not be read as {kind} or has no examples ({e}).") from None
        where = str(p)
    else:
        try:
            from peft_lab.data import build_dataset
        except ImportError:
            raise UserError(
                f"data: dataset {spec.dataset!r} needs peft_lab.data's builders, which this install lacks."
            ) from None
        dd = build_dataset(spec.dataset, **dict(spec.params))
        if split not in dd:
            raise UserError(f"data: dataset {spec.dataset!r} has no split {split!r} (it has {', '.join(dd)}).")
        ds, where = dd[split], f"{spec.dataset}[{split}]"
    cols = list(ds.column_names)
    inp_col = spec.text_column if spec.text_column in cols else ("image" if "image" in cols else None)
    if inp_col is None:
        raise UserError(
            f"data: {where} has no column {spec.text_column!r} (it has {', '.join(cols)}); set text_column."
        )
    labels = list(ds[spec.label_column]) if spec.label_column in cols else None
    if len(ds) == 0:
        raise UserError(f"data: {where} has no examples; a data-driven merge needs at least one per task.")
    return list(ds[inp_col]), labels


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
def model_dir(tree: Tree) -> Path | None:
    p = Path(str(tree.source))
    d = p if p.is_dir() else p.parent
    return d if (d / "config.json").exists() else None


# files any of which makes a dir hold a tokenizer (fast, WordPiece, SentencePiece, BPE)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
)


def load_classifier(src: Path, what: str) -> torch.nn.Module:
    """The HF sequence classifier in `src` (eval mode); transformers' load errors become a UserError naming it."""
    import transformers

    try:
        return transformers.AutoModelForSequenceClassification.from_pretrained(str(src)).eval()
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{what}: transformers cannot load {src} as a sequence classifier ({first}). A data-driven merge runs "
            "each model on examples, so its config.json must name an architecture this transformers knows."
        ) from None


def load_tokenizer(dirs: Sequence[Path | None], what: str):
    """The tokenizer of the first dir that holds tokenizer files; refused when none does (transformers would
    build a tokenizer that knows only its special tokens and encode every word as unknown)."""
    import transformers

    searched = list(dict.fromkeys(d for d in dirs if d is not None))
    for d in searched:
        if any((d / f).exists() for f in TOKENIZER_FILES):
            try:
                return transformers.AutoTokenizer.from_pretrained(str(d)), d
            except (ValueError, OSError) as e:
                raise UserError(f"{what}: the tokenizer files in {d} cannot be loaded ({e}).") from None
    raise UserError(
        f"{what}: no tokenizer in {' or '.join(map(str, searched)) or 'the inputs'} (looked for "
        f"{', '.join(TOKENIZER_FILES)}). The examples cannot be encoded without the models' tokenizer: copy its "
        "files into the model dir or the base model's dir."
    )


def _load_module(inputs, j: int):
    """Model j as an HF sequence classifier in eval mode, plus its tokenizer and the tree-name -> module-name map."""
    tree = inputs.models[j] if inputs.models else inputs.deltas[j]
    delta = inputs.deltas[j] if (inputs.deltas and is_delta(inputs.deltas[j])) else None
    base_dir = model_dir(inputs.base) if inputs.base is not None else None
    src = base_dir if delta is not None else model_dir(tree)
    if src is None:
        raise UserError(
            f"data-driven merge: {inputs.labels[j]} is not a model dir with a config.json, so it cannot be run on "
            "examples; give HF model dirs (or adapters on an HF base dir)."
        )
    model = load_classifier(src, f"data-driven merge of {inputs.labels[j]}")
    tokenizer, _ = load_tokenizer([src, base_dir], f"data-driven merge of {inputs.labels[j]}")
    names = name_map(model, list(inputs.base or tree))
    if delta is not None:
        apply_to_module(model, Tree({names[n]: leaf for n, leaf in delta.items() if n in names}, source=delta.source))
    return model, tokenizer, names


def name_map(module: torch.nn.Module, tree_names: Sequence[str]) -> dict[str, str]:
    """tree name -> module parameter/buffer name (the same, or differing by the model's base prefix, e.g. `bert.`)."""
    own = set(module.state_dict())
    prefix = getattr(module, "base_model_prefix", "") or ""
    out = {}
    for n in tree_names:
        if n in own:
            out[n] = n
        elif prefix and f"{prefix}.{n}" in own:
            out[n] = f"{prefix}.{n}"
        elif prefix and n.startswith(prefix + ".") and n[len(prefix) + 1 :] in own:
            out[n] = n[len(prefix) + 1 :]
    return out


def batches(tokenizer, texts, labels, batch_size: int, max_length: int, num_classes: int, where: str) -> Iterator[dict]:
    if labels is not None:
        bad = sorted({int(y) for y in labels if not 0 <= int(y) < num_classes})
        if bad:
            raise UserError(
                f"data: {where} has labels {bad[:5]} but the model has {num_classes} classes; "
                "the data does not fit the model."
            )
    if not all(isinstance(t, str) for t in texts[:8]):
        raise UserError(f"data: {where}: the input column does not hold text, but the model is a text model.")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        b = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        _check_encoded(b, special, texts, i, where)
        if labels is not None:
            b["labels"] = torch.tensor([int(y) for y in labels[i : i + batch_size]])
        yield b


def _check_encoded(b: dict, special: torch.Tensor, texts, offset: int, where: str) -> None:
    """Refuse examples that encode to nothing but special/unknown tokens (a tokenizer that does not fit the data)."""
    content = ~torch.isin(b["input_ids"], special)
    if "attention_mask" in b:
        content &= b["attention_mask"].bool()
    empty = torch.nonzero(~content.any(1)).reshape(-1)
    if empty.numel():
        i = offset + int(empty[0])
        raise UserError(
            f"data: {where}: {empty.numel()} example(s) encode to nothing but special or unknown tokens, e.g. example "
            f"{i} ({str(texts[i])[:60]!r}). The tokenizer does not fit the text (or the text is empty); check the "
            "tokenizer files of the models and the text column."
        )


def fishers_from_data(inputs, params, which: Sequence[int]) -> list[Tree]:
    """The diagonal Fisher of each model in `which`, on its task's examples (default split: train)."""
    from merging.datadriven.fisher import diagonal_fisher

    data = parse_data(inputs.extra.get("data"), len(inputs.labels))
    gen = torch.Generator().manual_seed(int(params.seed))
    out = []
    heads = list(params.heads)
    for j in which:
        model, tok, names = _load_module(inputs, j)
        from peft_lab.tree import matches

        merge = {
            n: m for n, m in names.items() if not (heads and matches(n, heads)) and n in dict(model.named_parameters())
        }
        texts, labels = load_examples(data.tasks[j], "train")
        n = min(len(texts), data.num_examples or params.num_examples)
        where = data.tasks[j].dataset or data.tasks[j].path
        stream = batches(
            tok,
            texts[:n],
            labels[:n] if labels else None,
            data.batch_size or params.batch_size,
            data.max_length,
            model.config.num_labels,
            where,
        )
        f = diagonal_fisher(
            model,
            list(merge.values()),
            stream,
            labels=params.labels,
            chunk_size=params.chunk_size,
            engine=params.engine,
            generator=gen,
        )
        inv = {m: t for t, m in merge.items()}
        out.append(Tree({inv[m]: v for m, v in f.items()}, source=f"fisher of {inputs.labels[j]}"))
        log.info("fisher: computed the Fisher of %s on %d examples of %s", inputs.labels[j], n, where)
    return out
