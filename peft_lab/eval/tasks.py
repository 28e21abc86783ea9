"""Classification tasks for `eval=classification`: a registered dataset or a JSONL task file, read and checked.

A task is given as a mapping (`{data: bbc_news}`, `{file: news.jsonl, labels: news.labels.yaml, split: val}`) or
as a string: a registered dataset's name (`bbc_news`) or a path ending in `.jsonl`.

Task file: one JSON object per line, `{"text": str, "label": str | int}`, optionally with `"split"`: `train`, `val`
or `test` (then on every line). Without split fields every line is scored; with them, the task's `split` (default
`test`). Label file (YAML, optional): `label: description`, the words a zero-shot head embeds in its template; it
fixes the class order and must list every label of the file (without one, the labels themselves are embedded, in
sorted order). Registered datasets (`peft_lab.data`) give their `test` split by default (`validation` with
`split: validation`, or `val`); their class names are the ClassLabel's.

Every problem is one `UserError` naming the file, the line and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

from peft_lab.errors import UserError
from peft_lab.params import Checked, build, param

__all__ = ["TaskSpec", "TaskData", "task_spec", "load_task"]

FILE_SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "val": "val", "train": "train", "test": "test"}


@dataclasses.dataclass(frozen=True)
class TaskSpec(Checked):
    """One classification task.

    Attributes:
        name: the task's name in results (default: the dataset's name or the file's stem).
        data: a registered dataset (`bbc_news`, `hf`, ...); `data_args` are its parameters.
        file: a JSONL task file (instead of `data`).
        labels: a YAML file `label: description` (zero-shot prompts and class order); files only.
        split: `train`, `val`/`validation` or `test` (null: `test` for datasets; for files the `test` lines if
            the file names splits, else every line).
        max_samples: score only the first N examples (null: all).
    """

    name: str = ""
    data: str | None = None
    data_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    file: str | None = None
    labels: str | None = None
    split: str | None = param(None, choices=("train", "val", "validation", "test"))
    max_samples: int | None = param(None, within="[1, inf)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.data is None) == (self.file is None):
            raise UserError("give each task either `data:` (a registered dataset) or `file:` (a JSONL task file).")
        if self.labels is not None and self.file is None:
            raise UserError(
                "`labels:` (a label-description YAML) goes with `file:` tasks; datasets name their classes."
            )
        if not self.name:
            object.__setattr__(self, "name", self.data or Path(str(self.file)).name.removesuffix(".jsonl"))


def task_spec(value: Any, where: str) -> TaskSpec:
    """A `TaskSpec` from a mapping or a string (a dataset name, or a path to a `.jsonl` file)."""
    if isinstance(value, TaskSpec):
        return value
    if isinstance(value, (str, os.PathLike)):
        s = str(value)
        value = {"file": s} if s.endswith(".jsonl") or os.sep in s else {"data": s}
    return build(TaskSpec, value, where=where)


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A task's examples, ready to score.

    Attributes:
        name: the task's name.
        texts: the texts, (N,).
        labels: class index per text (into `classes`), (N,).
        classes: the class names, in head order (zero-shot) / as the data names them.
        descriptions: per class, the words a zero-shot head embeds.
        int_labels: the file's labels were integers (they may index a model's head directly).
        source: the file or dataset, for messages.
    """

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    descriptions: tuple[str, ...]
    int_labels: bool
    source: str


def load_task(spec: TaskSpec) -> TaskData:
    """The examples of `spec` (files are read once per process while unchanged)."""
    if spec.file is not None:
        p = Path(spec.file).expanduser()
        lst = Path(spec.labels).expanduser() if spec.labels else None
        key = (spec.name, spec.split, spec.max_samples, str(p), _stamp(p), str(lst) if lst else None, _stamp(lst))
        return _file_task(*key)
    args = json.dumps(spec.data_args, sort_keys=True, default=str)
    return _dataset_task(spec.name, str(spec.data), args, spec.split, spec.max_samples)


def _stamp(p: Path | None) -> int:
    try:
        return p.stat().st_mtime_ns if p is not None else 0
    except OSError:
        return 0


@functools.lru_cache(maxsize=32)
def _file_task(
    name: str, split: str | None, max_samples: int | None, path: str, stamp: int, labels_path: str | None, lstamp: int
) -> TaskData:
    rows = read_task_file(Path(path), name)
    split = _file_split(name, split, rows, path)
    if split is not None:
        rows = [r for r in rows if r[3] == split]
        if not rows:
            raise UserError(f'task {name!r} ({path}): no line has "split": {split!r}.')
    if max_samples is not None:
        rows = rows[:max_samples]
    found = sorted({r[2] for r in rows}, key=_label_key)
    if labels_path is not None:
        described = read_label_file(Path(labels_path), name)
        missing = [x for x in found if x not in described]
        if missing:
            raise UserError(
                f"task {name!r}: the labels file {labels_path} does not describe the label(s) "
                f"{', '.join(map(repr, missing[:10]))} of {path}; give every label a line `label: description`."
            )
        classes, descriptions = tuple(described), tuple(described.values())
    else:
        classes = descriptions = tuple(found)
    index = {c: i for i, c in enumerate(classes)}
    return TaskData(
        name=name,
        texts=tuple(r[1] for r in rows),
        labels=tuple(index[r[2]] for r in rows),
        classes=classes,
        descriptions=descriptions,
        int_labels=all(r[4] for r in rows),
        source=path,
    )


def _label_key(label: str) -> tuple[int, Any]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def _file_split(name: str, split: str | None, rows: list, path: str) -> str | None:
    has_splits = rows[0][3] is not None
    if split is None:
        return "test" if has_splits else None
    if not has_splits:
        raise UserError(
            f"task {name!r} ({path}): split={split} was asked for, but the file's lines name no "
            '"split"; leave split unset to score every line, or add "split" to every line.'
        )
    return SPLIT_ALIASES[split]


def read_task_file(
    path: Path,
    name: str,
    *,
    prefix: str = "",
    missing_hint: str = 'A task file is JSONL: one {"text": ..., "label": ...} object per line.',
    split_hint: str = "",
) -> list[tuple[int, str, str, str | None, bool]]:
    """A JSONL task file (the format of docs/eval.md), checked: (line number, text, label, split or None, the label
    was an integer) per non-empty line. Errors are one paragraph naming the file and up to five bad lines;
    `prefix` starts every message (e.g. the command), `missing_hint` follows a missing file's message and
    `split_hint` the message for splits given on some lines only. Used by `peft-lab eval` and by the merging
    benchmark's text suite."""
    where = f"{prefix}task {name!r} ({path})"
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file. {missing_hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read the file as UTF-8 text ({e}).") from None
    rows, problems = [], []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        row = _parse_line(line, i, problems)
        if row is not None:
            rows.append(row)
        if len(problems) >= 5:
            break
    if problems:
        raise UserError(
            f"{where}: " + "; ".join(problems) + ". Each line must be a JSON object like "
            '{"text": "...", "label": "..."} (optionally with "split": "train" | "val" | "test").'
        )
    if not rows:
        raise UserError(f"{where}: the file holds no examples.")
    with_split = sum(r[3] is not None for r in rows)
    if 0 < with_split < len(rows):
        first = next(r[0] for r in rows if r[3] is None)
        raise UserError(
            f"{where}: {with_split} of {len(rows)} lines name a 'split' but line {first} does not; give a split "
            f"on every line or on none{split_hint}."
        )
    return rows


def _parse_line(line: str, i: int, problems: list[str]) -> tuple[int, str, str, str | None, bool] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        problems.append(f"line {i} is not JSON ({e.msg})")
        return None
    if not isinstance(obj, dict):
        problems.append(f"line {i} is not a JSON object")
        return None
    missing = [k for k in ("text", "label") if k not in obj]
    if missing:
        problems.append(f"line {i} has no {' and no '.join(repr(k) for k in missing)} field")
        return None
    text, label, split = obj["text"], obj["label"], obj.get("split")
    if not isinstance(text, str) or not text.strip():
        problems.append(f"line {i}: 'text' must be a non-empty string")
    elif isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        problems.append(f"line {i}: 'label' must be a non-empty string or an integer")
    elif split is not None and split not in FILE_SPLITS:
        problems.append(f"line {i}: 'split' is {split!r}, not one of {', '.join(FILE_SPLITS)}")
    else:
        return i, text, str(label).strip(), split, isinstance(label, int)
    return None


def read_label_file(
    path: Path, name: str, *, prefix: str = "", missing_hint: str = "Give a YAML mapping 'label: description'."
) -> dict[str, str]:
    """A label file: label -> description, in the file's order (one-paragraph errors, as `read_task_file`)."""
    import yaml

    where = f"{prefix}labels of task {name!r} ({path})"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{where}: no such file. {missing_hint}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{where}: cannot read the file as YAML ({str(e).splitlines()[0]}).") from None
    if not isinstance(data, dict) or not data:
        raise UserError(
            f"{where}: the file must be a YAML mapping 'label: description', one per class "
            "(e.g. `pos: a positive review`)."
        )
    bad = [str(k) for k, v in data.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise UserError(f"{where}: the description of {', '.join(bad[:5])} is not a non-empty string.")
    return {str(k).strip(): v.strip() for k, v in data.items()}


@functools.lru_cache(maxsize=8)
def _dataset_task(name: str, data: str, args: str, split: str | None, max_samples: int | None) -> TaskData:
    from peft_lab.data import build_dataset

    dd = build_dataset(data, **json.loads(args))
    split = {"val": "validation", "validation": "validation", None: "test"}.get(split, split)
    if split not in dd:
        raise UserError(
            f"task {name!r}: data={data} has no {split!r} split (it has: {', '.join(dd)}); set the task's split."
        )
    ds = dd[split]
    missing = [c for c in ("text", "label") if c not in ds.column_names]
    if missing:
        raise UserError(
            f"task {name!r}: data={data} has no {' or '.join(missing)} column (it has: "
            f"{', '.join(ds.column_names)}); eval=classification scores text classification data."
        )
    if max_samples is not None and len(ds) > max_samples:
        ds = ds.select(range(max_samples))
    feat = ds.features["label"]
    labels = [int(x) for x in ds["label"]]
    classes = tuple(feat.names) if hasattr(feat, "names") else tuple(str(i) for i in range(max(labels) + 1))
    return TaskData(
        name=name,
        texts=tuple(ds["text"]),
        labels=tuple(labels),
        classes=classes,
        descriptions=classes,
        int_labels=not hasattr(feat, "names"),
        source=f"data={data} ({split})",
    )
