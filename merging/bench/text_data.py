"""The text suite's tasks as files: one JSONL file per task, an optional label-description file, the splits.

Task file: one JSON object per line, `{"text": str, "label": str | int}`, optionally with `"split"`: one of
`train`, `val`, `test` (then on every line). Without splits the suite draws a stratified split of the requested
sizes (class proportions kept, so a balanced file gives balanced splits) with a fixed seed, so every run and
every seed sees the same test set. Label file (YAML): `label: description`, the words the zero-shot head embeds
in its template ("This text is about {label}."); without one, the label itself is embedded.

Every problem with a file is one `UserError` naming the file, the line and the fix: unreadable lines, missing
fields, fewer than two classes, too few examples for the split, the same text twice (a text in two splits would
leak the test set into training), a label file that does not list exactly the task's labels.

The built-in tasks (`BUILTIN`) ship in `merging/bench/data/`, built by `benchmarks/build_text_tasks.py` from BBC
News and three Debian packages; their sources and licenses are in `merging/bench/data/LICENSES.md`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peft_lab.errors import UserError
from peft_lab.eval.tasks import read_label_file, read_task_file

__all__ = ["BUILTIN", "DATA_DIR", "SPLITS", "TaskFile", "builtin_source", "load_task", "normalize", "stratified_split"]

SPLITS = ("train", "val", "test")
DATA_DIR = Path(__file__).parent / "data"
BUILTIN = ("news", "fortunes", "nouns_concrete", "nouns_abstract", "verbs", "packages")
SPLIT_SEED = 0  # the split of a file without one is fixed: seeds vary the training, not the test set
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class TaskFile:
    """One task, read and checked.

    Attributes:
        name: the task's name (table column).
        labels: the class names, in the head's row order.
        descriptions: per class, the words embedded for its zero-shot head row.
        splits: split -> (texts, class indices into `labels`).
        source: the file it came from.
    """

    name: str
    labels: tuple[str, ...]
    descriptions: tuple[str, ...]
    splits: dict[str, tuple[list[str], list[int]]]
    source: str


def normalize(text: str) -> str:
    """The form two texts are compared in for duplicates: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def builtin_source(name: str) -> tuple[Path, Path]:
    """(task file, label file) of a built-in task."""
    return DATA_DIR / f"{name}.jsonl", DATA_DIR / f"{name}.labels.yaml"


def check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise UserError(
            f"bench merge: {what}: the task name {name!r} must be letters, digits, '_', '-' or '.' "
            "(it names a table column and output files), e.g. --task reviews=reviews.jsonl."
        )


def _read_lines(path: Path, name: str) -> list[tuple[int, str, str, str | None]]:
    """(line number, text, label, split or None) per non-empty line (the JSONL format `peft-lab eval` reads)."""
    rows = read_task_file(
        path,
        name,
        prefix="bench merge: ",
        missing_hint='Give --task NAME=PATH with PATH a JSONL file of {"text": ..., "label": ...} lines.',
        split_hint=" (then the suite draws a stratified split)",
    )
    return [r[:4] for r in rows]


def _check_duplicates(rows, where: str) -> None:
    seen: dict[str, tuple[int, str | None]] = {}
    dups = []
    for i, text, _, split in rows:
        key = normalize(text)
        if key in seen:
            j, s = seen[key]
            dups.append(f"lines {j} and {i}" + (f" ({s} and {split})" if split else ""))
        else:
            seen[key] = (i, split)
    if dups:
        raise UserError(
            f"bench merge: {where}: {len(dups)} text(s) occur twice ({', '.join(dups[:5])}"
            f"{', ...' if len(dups) > 5 else ''}), compared with whitespace collapsed and case ignored. "
            "A text in two splits lets the test set leak into training; remove the duplicates."
        )


def read_labels(path: Path, name: str) -> dict[str, str]:
    """label -> description from a YAML mapping."""
    return read_label_file(
        path,
        name,
        prefix="bench merge: ",
        missing_hint="Give --labels NAME=PATH with PATH a YAML mapping 'label: description'.",
    )


def stratified_split(labels: Sequence[int], sizes: dict[str, int], seed: int, where: str) -> dict[str, list[int]]:
    """Indices per split, `sizes[split]` each, keeping the class proportions; split by split, each class gets its
    share of what remains of it (largest remainder, ties to the class with more left), at least one per split.

    Args:
        labels: class index per example.
        sizes: split -> number of examples (in the order given).
    Returns:
        split -> example indices (shuffled with `seed`).
    """
    rng = random.Random(seed)
    pools: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        pools.setdefault(y, []).append(i)
    for ids in pools.values():
        rng.shuffle(ids)
    need = sum(sizes.values())
    if need > len(labels):
        raise UserError(
            f"bench merge: {where}: {len(labels)} examples, but the split needs {need} "
            f"({', '.join(f'{v} {k}' for k, v in sizes.items())}); give more examples, or add a 'split' "
            "field to every line to choose the splits yourself."
        )
    out: dict[str, list[int]] = {}
    for split, n in sizes.items():
        left = {c: len(ids) for c, ids in pools.items()}
        total = sum(left.values())
        share = {c: n * k / total for c, k in left.items()}
        take = {c: int(s) for c, s in share.items()}
        order = sorted(left, key=lambda c: (-(share[c] - take[c]), -left[c], c))
        for c in order[: n - sum(take.values())]:
            take[c] += 1
        short = [c for c in left if take[c] < 1]
        if short:
            raise UserError(
                f"bench merge: {where}: class(es) {', '.join(map(str, short[:5]))} would get no {split} "
                f"example in a stratified split of {n} (too few examples of them); give more examples "
                "of every class or choose the splits yourself with a 'split' field."
            )
        out[split] = [i for c in sorted(pools) for i in pools[c][: take[c]]]
        for c in pools:
            pools[c] = pools[c][take[c] :]
        rng.shuffle(out[split])
    return out


def _descriptions(name: str, path: Path, labels_path: str | Path | None, counts: Counter) -> dict[str, str]:
    """label -> description, in the head's row order: the label file's order, else the sorted labels."""
    if labels_path is None:
        return {k: k for k in sorted(counts)}
    desc = read_labels(Path(labels_path), name)
    missing, extra = sorted(set(counts) - set(desc)), sorted(set(desc) - set(counts))
    problems = ([f"no description for {', '.join(map(repr, missing[:8]))}"] if missing else []) + (
        [f"labels not in the task file: {', '.join(map(repr, extra[:8]))}"] if extra else []
    )
    if problems:
        raise UserError(
            f"bench merge: labels of task {name!r} ({labels_path}) do not match the task file {path}: "
            + "; ".join(problems)
            + ". List every label of the task file exactly once, as `label: description`."
        )
    return desc


def _given_splits(rows, ys: list[int], sizes: dict[str, int], where: str) -> dict[str, list[int]]:
    """The file's own splits, each cut to at most `sizes[split]` examples (a stratified subset)."""
    idx = {}
    for s in SPLITS:
        ids = [i for i, r in enumerate(rows) if r[3] == s]
        if not ids:
            raise UserError(
                f"bench merge: {where}: no line has split {s!r}; the suite needs train, val and test "
                "examples (or leave 'split' out on every line to have the suite split the file)."
            )
        cap = sizes.get(s, len(ids))
        sub = stratified_split([ys[i] for i in ids], {s: cap}, SPLIT_SEED, where)[s] if cap < len(ids) else None
        idx[s] = ids if sub is None else [ids[i] for i in sub]
    return idx


def load_task(
    name: str, path: str | Path, labels_path: str | Path | None = None, sizes: dict[str, int] | None = None
) -> TaskFile:
    """Read and check one task file (and its label file).

    Args:
        name: the task's name.
        path: the JSONL file.
        labels_path: a YAML mapping label -> description (default: the labels themselves).
        sizes: split -> number of examples: drawn (stratified) from a file without splits, where the file must
            hold that many; for a file with splits, an upper bound per split (a stratified subset).
    """
    check_name(name, "--task")
    path = Path(path)
    where = f"task {name!r} ({path})"
    rows = _read_lines(path, name)
    _check_duplicates(rows, where)
    counts = Counter(r[2] for r in rows)
    if len(counts) < 2:
        raise UserError(
            f"bench merge: {where}: every example has the label {next(iter(counts))!r}; a task needs "
            "at least two classes."
        )
    desc = _descriptions(name, path, labels_path, counts)
    labels = tuple(desc)
    index = {lab: j for j, lab in enumerate(labels)}
    texts, ys = [r[1] for r in rows], [index[r[2]] for r in rows]
    sizes = dict(sizes or {"train": 400, "val": 100, "test": 300})
    given = rows[0][3] is not None
    idx = _given_splits(rows, ys, sizes, where) if given else stratified_split(ys, sizes, SPLIT_SEED, where)
    missing = [labels[c] for c in range(len(labels)) if c not in {ys[i] for i in idx["train"]}]
    if missing:
        raise UserError(
            f"bench merge: {where}: the train split has no example of {', '.join(map(repr, missing[:5]))}; "
            "every class needs training examples."
        )
    splits = {s: ([texts[i] for i in idx[s]], [ys[i] for i in idx[s]]) for s in SPLITS}
    return TaskFile(name, labels, tuple(desc[lab] for lab in labels), splits, str(path))
