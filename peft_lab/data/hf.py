"""Any Hugging Face `datasets` dataset, by hub name (needs network) or from local files (`csv`, `json`, `parquet`,
`text`, or a dataset dir saved with `save_to_disk`), renamed to the columns the tasks read (`text`, `label`).

Missing splits are carved out of `train` (stratified and seeded when there is a label column).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from peft_lab.data.base import DATASETS, DataConfig, check_fractions, stratified_split
from peft_lab.errors import UserError

__all__ = ["HFDataset"]

_FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


@DATASETS.register("hf")
@dataclasses.dataclass(frozen=True)
class HFDataset(DataConfig):
    """A `datasets` dataset.

    Attributes:
        path: a hub name (`ag_news`), a builder (`csv`, `json`, `parquet`, `text`) used with `data_files`, a local
            data file, or a dir written by `Dataset(Dict).save_to_disk`.
        subset: the dataset's configuration name, if it has several.
        data_files: files for a builder: a path, a list, or {split: path}.
        text_column: column holding the text (renamed to `text`).
        label_column: column holding the class (renamed to `label`; strings become a ClassLabel); null = no labels
            (causal LM).
        train_split, validation_split, test_split: source split names; a missing validation/test split is carved
            out of train with `validation_fraction`/`test_fraction` (test only if test_fraction > 0).
        revision: a hub revision (commit, tag or branch).
    """

    name = "hf"
    path: str = ""
    subset: str | None = None
    data_files: Any = None
    text_column: str = "text"
    label_column: str | None = "label"
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    validation_fraction: float = 0.1
    test_fraction: float = 0.0
    revision: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise UserError(
                "data=hf needs data.path: a hub dataset name, a builder (csv, json, parquet) with data.data_files, "
                "or a local file/dir."
            )
        check_fractions(validation_fraction=self.validation_fraction, test_fraction=self.test_fraction)

    def _load(self):
        import datasets

        p = Path(self.path).expanduser()
        try:
            if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "dataset_info.json").exists()):
                ds = datasets.load_from_disk(str(p))
            elif p.is_file():
                builder = _FILE_BUILDERS.get(p.suffix.lower())
                if builder is None:
                    raise UserError(
                        f"data.path={self.path}: unknown file type {p.suffix!r} "
                        f"(use one of {', '.join(_FILE_BUILDERS)})."
                    )
                kw = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
                ds = datasets.load_dataset(builder, data_files={"train": str(p)}, **kw)
            else:
                files = self.data_files
                if files is not None:
                    groups = files.values() if isinstance(files, dict) else files
                    groups = [files] if isinstance(files, str) else groups
                    for f in groups:
                        for one in [f] if isinstance(f, str) else f:
                            if not any(c in str(one) for c in "*?[") and not Path(one).exists():
                                raise UserError(f"data.data_files: {one} does not exist.")
                ds = datasets.load_dataset(self.path, self.subset, data_files=files, revision=self.revision)
        except UserError:
            raise
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(
                f"data.path={self.path}: could not load the dataset ({type(e).__name__}: {first}). "
                "Give a local file/dir, or a hub name while online (HF_DATASETS_OFFLINE=1 blocks downloads)."
            ) from None
        if isinstance(ds, datasets.Dataset):
            ds = datasets.DatasetDict({self.train_split: ds})
        return ds

    def splits(self):
        import datasets

        raw = self._load()
        if self.train_split not in raw:
            raise UserError(
                f"data.path={self.path}: no split {self.train_split!r} (splits: {', '.join(raw)}); "
                "set data.train_split."
            )
        cols = raw[self.train_split].column_names
        wanted = {self.text_column: "text"}
        if self.label_column is not None:
            wanted[self.label_column] = "label"
        missing = [c for c in wanted if c not in cols]
        if missing:
            raise UserError(
                f"data.path={self.path}: the dataset has no column(s) {', '.join(map(repr, missing))} (its columns: "
                f"{', '.join(cols)}); set data.text_column / data.label_column to the right names."
            )
        dd = datasets.DatasetDict()
        names = (("train", self.train_split), ("validation", self.validation_split), ("test", self.test_split))
        for ours, theirs in names:
            if theirs in raw:
                d = raw[theirs].select_columns(list(wanted)).rename_columns({k: v for k, v in wanted.items() if k != v})
                dd[ours] = d
        if "label" in dd["train"].column_names and not isinstance(dd["train"].features["label"], datasets.ClassLabel):
            names = sorted({str(x) for s in dd.values() for x in s["label"]})
            cl = datasets.ClassLabel(names=names)
            for k in list(dd):
                dd[k] = dd[k].map(lambda b: {"label": [cl.str2int(str(x)) for x in b["label"]]}, batched=True)
                dd[k] = dd[k].cast_column("label", cl)
        carve = {}
        if "validation" not in dd and self.validation_fraction > 0:
            carve["validation"] = self.validation_fraction
        if "test" not in dd and self.test_fraction > 0:
            carve["test"] = self.test_fraction
        if carve:
            train = dd["train"]
            has_labels = "label" in train.column_names
            labels = np.asarray(train["label"]) if has_labels else np.zeros(len(train), dtype=np.int64)
            parts = stratified_split(labels, carve, self.seed)
            for k, idx in parts.items():
                dd[k] = train.select(idx.tolist())
        return dd
