"""`eval=perplexity`: a causal LM's perplexity on a local text file, with strided windows.

    peft-lab eval model=DIR eval=perplexity eval.file=wiki.txt eval.window=512 eval.stride=256

The file is a `.txt` (read as one text) or a `.jsonl` (one document per line, its `text_field`). Documents are
tokenised without special tokens and joined into one stream with the EOS token between them (the BOS token, if
the tokenizer has one, starts the stream). The stream of N tokens is scored in windows of `window` tokens whose
starts are `stride` apart; each window scores only the tokens no earlier window scored, with up to
`window - stride` tokens of context before them. Every token after the first is predicted exactly once, so

    loss = (1 / (N - 1)) · Σ_t −log p(x_t | x_<t, within its window)      perplexity = exp(loss)

and `tokens` (N - 1) is the count the average is over. With `stride = window` the windows do not overlap (fast,
less context); a smaller stride gives each scored token more context at more compute.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from peft_lab.errors import UserError
from peft_lab.eval.base import EVALUATORS, EvalResult, Evaluator, ModelInfo
from peft_lab.params import param

__all__ = ["Perplexity", "windows"]


@EVALUATORS.register("perplexity")
@dataclasses.dataclass(frozen=True)
class Perplexity(Evaluator):
    """Perplexity of a causal language model.

    Attributes:
        file: a local `.txt` or `.jsonl` file.
        text_field: the field holding a document's text in a `.jsonl` file.
        window: tokens per window (null: the model's max_position_embeddings, at most 1024).
        stride: tokens between window starts (null: window // 2); at most `window`.
        max_tokens: score only the first N tokens of the stream (null: all).
    """

    name = "perplexity"
    kind = "causal_lm"

    file: str = ""
    text_field: str = "text"
    window: int | None = param(None, within="[2, inf)")
    stride: int | None = param(None, within="[1, inf)")
    max_tokens: int | None = param(None, within="[2, inf)")
    batch_size: int = param(4, within="[1, inf)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.file:
            raise UserError(
                "eval.file is not set: give the local .txt or .jsonl file of text to score (eval.file=PATH)."
            )
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise UserError(f"eval.stride={self.stride} must be at most eval.window={self.window}.")

    def headline(self) -> tuple[str, bool]:
        return "perplexity", False

    @property
    def task_name(self) -> str:
        return Path(self.file).name

    def prepare(self) -> list[str]:
        p = Path(self.file).expanduser()
        return list(_documents(str(p), _stamp(p), self.text_field))

    def check_model(self, info: ModelInfo, where: str) -> None:
        if not info.is_causal_lm:
            raise UserError(
                f"{where}: eval=perplexity scores causal language models (*ForCausalLM / *LMHeadModel); {info.path} "
                f"is {info.describe()}. Score a classifier or an encoder with eval=classification."
            )
        self.prepare()

    def run(self, model) -> EvalResult:
        ids = _stream(model.tokenizer, self.prepare(), self.max_tokens, self.file)
        limit = model.info.max_positions or 1024
        window = self.window or min(limit, 1024)
        if window > limit:
            raise UserError(
                f"eval.window={window} is longer than the model's max_position_embeddings ({limit}); lower it."
            )
        stride = self.stride or max(1, window // 2)
        nll, count = 0.0, 0
        for batch in _batches(windows(len(ids), window, stride), self.batch_size):
            loss, n = self._windows_nll(model.model, ids, batch, model.device)
            nll, count = nll + loss, count + n
        assert count == len(ids) - 1, (count, len(ids))  # every token after the first, once
        loss = nll / count
        task = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
        metric, higher = self.headline()
        return EvalResult({self.task_name: task}, dict(task), metric, higher)

    @torch.no_grad()
    def _windows_nll(self, model, ids: torch.Tensor, batch: list[tuple[int, int, int]], device) -> tuple[float, int]:
        """Summed NLL and count of the scored tokens of windows of equal length."""
        x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # (B, T)
        logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        target = x[:, 1:].clone()
        for row, (b, _e, first) in enumerate(batch):  # targets before `first` were scored by an earlier window
            target[row, : max(0, first - b - 1)] = -100
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        return float(loss), int((target != -100).sum())


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over a stream of `n` tokens. The scored ranges
    [first, end) tile [1, n) exactly; consecutive windows overlap by at least one token, so every scored token has
    at least one token of context (`stride` = `window` means an overlap of exactly one)."""
    out, begin, scored_to = [], 0, 1
    while scored_to < n:
        end = min(begin + window, n)
        out.append((begin, end, scored_to))
        scored_to = end
        begin = min(begin + stride, end - 1)
    return out


def _batches(items: list[tuple[int, int, int]], size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of the same length, at most `size` per batch."""
    out: list[list[tuple[int, int, int]]] = []
    for w in items:
        if out and len(out[-1]) < size and out[-1][0][1] - out[-1][0][0] == w[1] - w[0]:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _stamp(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


@functools.lru_cache(maxsize=4)
def _documents(path: str, stamp: int, field: str) -> tuple[str, ...]:
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"eval.file={path}: no such file; give a local .txt or .jsonl file of text.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"eval.file={path}: cannot read it as UTF-8 text ({e}).") from None
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"eval.file={path}: line {i} is not JSON ({e.msg}).") from None
            text = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise UserError(
                    f"eval.file={path}: line {i} has no string field {field!r} (set eval.text_field to the field "
                    "that holds the text)."
                )
            docs.append(text)
    else:
        docs = [raw]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"eval.file={path}: the file holds no text (it is empty or only whitespace); nothing to score.")
    return tuple(docs)


def _stream(tokenizer, docs: list[str], max_tokens: int | None, path: str) -> torch.Tensor:
    """(N,) token ids: [BOS] doc1 EOS doc2 EOS ... (EOS between documents only)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for i, d in enumerate(docs):
        if i and sep is not None:
            ids.append(sep)
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if len(ids) < 2:
        raise UserError(f"eval.file={path}: the text is {len(ids)} token(s) long; perplexity needs at least two.")
    return torch.tensor(ids, dtype=torch.long)
