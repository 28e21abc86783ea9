"""Helpers for the merge tests: tiny seeded Llama models saved as HF dirs, and a chunked driver that runs a
method's streaming protocol the way the executor does (on small tensors, with any chunk size)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from merging.base import MergeMethod, TensorJob
from merging.stream import drive

TINY_LLAMA = dict(
    vocab_size=48,
    hidden_size=16,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


def tiny_llama_dirs(
    root: Path, n_models: int = 2, dtype=torch.bfloat16, seed: int = 0, shard: str | None = None, scale: float = 0.02
) -> tuple[Path, list[Path]]:
    """A base Llama dir and `n_models` fine-tunes of it (base + seeded noise), saved in `dtype`. The base dir
    also holds tokenizer files (dummies) so copying them can be checked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}

    def save(path: Path, weights):
        model.load_state_dict(weights)
        model.to(dtype).save_pretrained(path, max_shard_size=shard or "5GB")
        model.float()

    base = root / "base"
    save(base, sd)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    (base / "special_tokens_map.json").write_text("{}\n")
    fts = []
    for i in range(n_models):
        p = root / f"ft{i}"
        save(p, {k: v + torch.randn(v.shape, generator=g) * scale * (i + 1) for k, v in sd.items()})
        fts.append(p)
    return base, fts


def stream_merge(method: MergeMethod, name: str, base, tensors, model_params, chunk: int, block: int = 8):
    """Run `method` through the executor's pass driver on flat chunks of length `chunk` (statistic passes re-read
    the chunks; SAMPLE passes get `block`-sized blocks, one in 4)."""
    ref = base if base is not None else tensors[0]
    n = ref.numel()
    flat_b = None if base is None else base.reshape(-1)
    flat = [t.reshape(-1) for t in tensors]

    def read(s, e):
        return None if flat_b is None else flat_b[s:e].clone(), [t[s:e].clone() for t in flat]

    job = TensorJob(name, tuple(ref.shape), model_params, chunked=n > chunk)
    outs = [o.clone() for o in drive(method, job, read, chunk, sample_block=block, sample_every=4)]
    return torch.cat(outs).reshape(ref.shape)


def file_digests(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given paths (to check inputs are never modified)."""
    out = {}
    for p in paths:
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out
