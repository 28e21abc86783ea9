"""The output tokenizer of a merge: `tokenizer_source`, the `tokenizer:` block and `chat_template`, as mergekit 0.1.5
defines them.

    tokenizer_source: union              # base | union | a model of the recipe
    tokenizer:                           # or the block form (not both)
      source: union                      # as tokenizer_source (default union)
      pad_to_multiple_of: 64             # embedding rows rounded up (padding rows: the mean of the real ones)
      tokens:                            # where the row of a token comes from (the token is added if missing)
        <|im_start|>: {source: MODEL}                      # that model's row for the token
        <|tool|>: {source: {kind: model_token, model: MODEL, token: "<tool>"}, force: true}   # or token_id: 7
        <pad>: {source: {kind: zero}}

- `base`: the base model's tokenizer without the tokens whose ids are beyond its `vocab_size` (BPE tokenizers
  only, as in mergekit). A model: its tokenizer as it is.
- `union`: the base's tokens keep their ids; then the ordinary tokens of the other models that the base lacks
  (base first, then the models in recipe order; within a model, in id order), then their added tokens.
- Every model's embedding rows (and LM-head rows) are reordered to the output vocabulary (`merging.vocab_rows`).

`build_vocab` loads the tokenizers (transformers' `AutoTokenizer`) and computes, per model, where each output
token's row comes from (`Vocab.perms`); `write_tokenizer` saves the result with the chat template.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.grammar import ModelRef, model_ref
from peft_lab.errors import UserError

__all__ = ["TokenizerSpec", "TokenSource", "Vocab", "parse_tokenizer", "parse_chat_template", "build_vocab",
           "write_tokenizer", "resolve_chat_template", "CHAT_TEMPLATES"]  # fmt: skip

log = logging.getLogger(__name__)

# built-in chat templates (`chat_template: NAME`), written for peft-lab
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
        "\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
        "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
        "eos_token }}{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


@dataclass(frozen=True)
class TokenSource:
    """Where one token's row comes from: a model's row for the token (`model`), a model's row for another token
    or id (`model_token`), zeros (`zero`); None: mergekit's default rule. `force`: even for models that have it."""

    kind: str | None = None
    model: ModelRef | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "model":
            src: Any = self.model.to_yaml()
        elif self.kind == "zero":
            src = {"kind": "zero"}
        elif self.kind == "model_token":
            which = {"token": self.token} if self.token is not None else {"token_id": self.token_id}
            src = {"kind": "model_token", "model": self.model.to_yaml(), **which}
        else:
            src = None
        return {"source": src, "force": self.force}


@dataclass(frozen=True)
class TokenizerSpec:
    """The recipe's tokenizer settings. `source`: "base", "union" or a model; `block`: given as `tokenizer:`."""

    source: str | ModelRef
    tokens: Mapping[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    block: bool = False

    def to_dict(self) -> dict[str, Any]:
        src = self.source.to_yaml() if isinstance(self.source, ModelRef) else self.source
        if not self.block:
            return {"tokenizer_source": src}
        out: dict[str, Any] = {"source": src}
        if self.tokens:
            out["tokens"] = {k: v.to_dict() for k, v in self.tokens.items()}
        if self.pad_to_multiple_of:
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        return {"tokenizer": out}


def _in_recipe(ref: ModelRef, refs: Sequence[ModelRef], what: str, where: str) -> ModelRef:
    for r in refs:
        if r.same(ref):
            return r
    raise UserError(
        f"{where}: {what} names {ref}, which is not a model of this recipe (its models: "
        f"{', '.join(str(r) for r in refs)}). Name one of them, or base / union."
    )


def _source(value: Any, refs: Sequence[ModelRef], what: str, where: str) -> str | ModelRef:
    if value in ("base", "union"):
        return value
    if value is None:
        raise UserError(f"{where}: {what} is missing: base, union or a model of the recipe.")
    return _in_recipe(model_ref(value, where), refs, what, where)


def _token_source(tok: str, raw: Any, refs: Sequence[ModelRef], where: str) -> TokenSource:
    w = f"{where}: tokenizer.tokens[{tok!r}]"
    if not isinstance(raw, Mapping) or set(raw) - {"source", "force"}:
        raise UserError(f"{w}: expected {{source: ..., force: true|false}}, got {raw!r}.")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise UserError(f"{w}: force must be true or false, got {force!r}.")
    src = raw.get("source")
    if src is None:
        return TokenSource(force=force)
    if isinstance(src, Mapping) and "kind" in src:
        if src["kind"] == "zero" and set(src) == {"kind"}:
            return TokenSource("zero", force=force)
        ok = src["kind"] == "model_token" and set(src) <= {"kind", "model", "token", "token_id"} and "model" in src
        if not ok or ("token" in src) == ("token_id" in src):
            raise UserError(
                f"{w}: a source is a model, {{kind: zero}}, or {{kind: model_token, model: M, token: T}} (or "
                f"token_id: N instead of token); got {dict(src)!r}."
            )
        ref = _in_recipe(model_ref(src["model"], w), refs, "the source", w)
        tid = src.get("token_id")
        if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
            raise UserError(f"{w}: token_id must be a non-negative integer, got {tid!r}.")
        return TokenSource("model_token", ref, src.get("token"), tid, force)
    return TokenSource("model", _in_recipe(model_ref(src, w), refs, "the source", w), force=force)


def parse_tokenizer(raw: Mapping[str, Any], refs: Sequence[ModelRef], where: str) -> TokenizerSpec | None:
    """`tokenizer_source` or the `tokenizer:` block (not both), its models checked against the recipe's."""
    ts, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if ts is not None and block is not None:
        raise UserError(f"{where}: give tokenizer_source or a tokenizer: block, not both.")
    if ts is not None:
        return TokenizerSpec(_source(ts, refs, "tokenizer_source", where))
    if block is None:
        return None
    if not isinstance(block, Mapping) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise UserError(f"{where}: the tokenizer: block has source, tokens and pad_to_multiple_of; got {block!r}.")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise UserError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}.")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise UserError(f"{where}: tokenizer.tokens maps a token to {{source: ..., force: ...}}, got {tokens!r}.")
    return TokenizerSpec(
        _source(block.get("source", "union"), refs, "tokenizer.source", where),
        {str(k): _token_source(str(k), v, refs, where) for k, v in tokens.items()},
        pad,
        block=True,
    )


def parse_chat_template(value: Any, where: str) -> str | None:
    """`auto`, a built-in name, or a Jinja template (mergekit's rule: at least 20 characters, with a `{`)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: chat_template must be auto, a built-in name or a Jinja template, got {value!r}.")
    if value == "auto" or value in CHAT_TEMPLATES or (len(value) >= 20 and "{" in value):
        return value
    raise UserError(
        f"{where}: chat_template {value!r} is neither auto, a built-in template ({', '.join(CHAT_TEMPLATES)}) nor a "
        "Jinja template (a string with {{ ... }} or {% ... %})."
    )


# ---------------------------------------------------------------------------------------------------------
# building the output tokenizer
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Vocab:
    """The output vocabulary and, per model (its `ModelRef.key`), the source row of each output token.

    Attributes:
        tokenizer: the output tokenizer (a transformers tokenizer).
        tokens: output token -> id.
        rows: embedding rows of the output (len(tokens) rounded up to pad_to_multiple_of).
        perms: model key -> per output id, the model's row for the token (-1: the model lacks it).
        vocabs: model key -> the model's own vocabulary (token -> id), for `model_token` sources.
        spec: the recipe's settings.
    """

    tokenizer: Any
    tokens: dict[str, int]
    rows: int
    perms: dict[tuple, list[int]]
    vocabs: dict[tuple, dict[str, int]]
    spec: TokenizerSpec


def _load(path: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path))


def _stripped(path: Path, vocab_size: int | None):
    """A model's tokenizer without the tokens whose ids are >= its embedding rows (BPE only, as mergekit)."""
    tok = _load(path)
    vocab_size = vocab_size or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise UserError(
            f"{path}: its tokenizer has {len(unused)} token(s) with ids beyond the model's {vocab_size} embedding "
            f"rows and is a {spec['model']['type']} tokenizer; only BPE tokenizers can be trimmed to the model "
            "(as in mergekit). Use tokenizer_source: union or a model instead."
        )
    from tokenizers import Tokenizer

    spec["added_tokens"] = [e for e in spec["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        spec["model"]["vocab"].pop(t, None)
    keep = lambda m: not any(p in unused for p in (m.split(" ") if isinstance(m, str) else m))  # noqa: E731
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if keep(m)]
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return tok


def _union(base_tok, toks: Sequence[tuple[Any, int | None]]):
    """mergekit's union: the base's tokens, then the others' ordinary tokens the base lacks, then added tokens."""
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, vocab_size in toks:
        n = vocab_size or len(tok.get_vocab())
        for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if _ < n:
                ordinary.setdefault(t)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i >= n:
                continue
            if info.content not in added:
                added[info.content] = info
            elif added[info.content] != info:
                log.warning("token %r is added with different settings by different models: the first is kept",
                            info.content)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's tokenizer object stays as it is
        base_tok.save_pretrained(tmp)
        out = _load(Path(tmp))
    have = base_tok.get_vocab()
    for t in ordinary:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_vocab(
    spec: TokenizerSpec,
    base: ModelRef,
    refs: Sequence[ModelRef],
    dirs: Mapping[tuple, Path],
    vocab_sizes: Mapping[tuple, int | None],
) -> Vocab:
    """The output tokenizer and every model's permutation (module docstring).

    Args:
        spec: the recipe's tokenizer settings.
        base: the base model (the recipe's base_model, else its first model).
        refs: every model of the recipe, in recipe order.
        dirs: model key -> its dir (where its tokenizer files are).
        vocab_sizes: model key -> its embedding rows (`vocab_size` of its config).
    """
    base_tok = _stripped(dirs[base.key], vocab_sizes.get(base.key))
    toks: dict[tuple, Any] = {base.key: base_tok}
    for r in refs:
        if r.key not in toks:
            try:
                toks[r.key] = _load(dirs[r.key])
            except (OSError, ValueError) as e:
                log.warning("cannot load the tokenizer of %s (%s); taking it to be the base model's", r, e)
    if isinstance(spec.source, ModelRef):
        out = _load(dirs[spec.source.key])
    elif spec.source == "base":
        out = base_tok
    else:
        out = _union(base_tok, [(toks[k], vocab_sizes.get(k)) for k in toks])
    have = set(out.get_vocab())
    for t in spec.tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    tokens = dict(sorted(out.get_vocab().items(), key=lambda kv: kv[1]))
    if list(tokens.values()) != list(range(len(tokens))):
        raise UserError(
            f"The output tokenizer's ids are not 0..{len(tokens) - 1} without gaps; its embedding rows cannot be "
            "built. Use another tokenizer_source."
        )
    rows = len(tokens)
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    perms, vocabs = {}, {}
    for r in refs:
        vocab = toks.get(r.key, base_tok).get_vocab()
        n = vocab_sizes.get(r.key) or len(vocab)
        perms[r.key] = [vocab[t] if t in vocab and vocab[t] < n else -1 for t in tokens]
        vocabs[r.key] = vocab
    return Vocab(out, tokens, rows, perms, vocabs, spec)


# ---------------------------------------------------------------------------------------------------------
# chat templates and writing
# ---------------------------------------------------------------------------------------------------------
def _template_of(d: Path) -> str | None:
    f = d / "chat_template.jinja"
    if f.is_file():
        return f.read_text()
    cfg = d / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    t = json.loads(cfg.read_text()).get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        t = next((x.get("template") for x in t if isinstance(x, Mapping) and x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def resolve_chat_template(value: str | None, dirs: Sequence[Path]) -> str | None:
    """The template text: a built-in one, the recipe's own, or (`auto`) the one most of the models use (the
    first of them on a tie; None when none has one)."""
    if value is None or value not in ("auto", *CHAT_TEMPLATES):
        return value
    if value != "auto":
        return CHAT_TEMPLATES[value]
    found = [t.strip() for t in (_template_of(d) for d in dirs) if t]
    return Counter(found).most_common(1)[0][0] if found else None


def write_tokenizer(out_dir: Path, vocab: Vocab | None, chat_template: str | None) -> None:
    """Save the built tokenizer into `out_dir` (or, without one, set the chat template of the tokenizer files
    already there), with the chat template."""
    tok = vocab.tokenizer if vocab is not None else None
    if tok is None:
        if chat_template is None:
            return
        if not any((out_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")):
            log.warning("chat_template is given but the output has no tokenizer to write it into; it is not written")
            return
        tok = _load(out_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
