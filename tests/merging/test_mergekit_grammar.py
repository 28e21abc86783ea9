"""mergekit's recipe grammar gives mergekit's tensors: every recipe in tests/fixtures/mergekit_grammar/<arch>/recipes
(made by tests/fixtures/make_mergekit_grammar_refs.py with mergekit 0.1.5: gradients, filters, scopes, slices,
frankenmerges, modules, LoRA references, tokenizers, and mergekit's own example recipes), float32 arithmetic,
compared tensor by tensor (bit for bit through digests; SLERP within float32 rounding). Each output loads in
transformers with no missing weight and gives finite logits; a built tokenizer encodes sentences as mergekit's
does. Runs without mergekit installed."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from merging import run_merge
from tests.conftest import REPO

FIX = REPO / "tests" / "fixtures" / "mergekit_grammar"
SOURCE = json.loads((FIX / "SOURCE.json").read_text())
CASES = [(arch, case) for arch, cases in SOURCE["cases"].items() for case in cases]


def tensor_digest(t: torch.Tensor) -> str:
    """As tests/fixtures/make_mergekit_grammar_refs.py digests mergekit's tensors."""
    h = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode())
    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _recipe(arch: str, case: str) -> dict:
    return yaml.safe_load((FIX / arch / "recipes" / f"{case}.yaml").read_text())


def _logits(out) -> torch.Tensor:
    """The output loaded as its architecture (every weight present) and run on a few tokens."""
    cfg = transformers.AutoConfig.from_pretrained(out)
    cls = getattr(transformers, cfg.architectures[0])
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[2, 5, 7, 4, 9, 3]])
    extra = {"decoder_input_ids": ids[:, :3]} if cfg.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


@pytest.mark.parametrize("arch, case", CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_same_tensors_as_mergekit(arch, case, tmp_path, monkeypatch):
    recipe = _recipe(arch, case)
    monkeypatch.chdir(FIX / arch)  # the recipes use paths relative to the architecture's dir, as given to mergekit
    out = run_merge(recipe, tmp_path / "out", hash="none")
    ours = load_file(out / "model.safetensors")
    refs = FIX / arch / "refs"
    if (refs / f"{case}.digests.json").exists():  # the same float32 operations in the same order: bit for bit
        want = json.loads((refs / f"{case}.digests.json").read_text())
        got = {k: tensor_digest(v) for k, v in ours.items() if k in want}
        assert set(want) == set(got), f"{case}: tensors mergekit wrote that peft-lab did not: {set(want) - set(got)}"
        assert got == want, f"{case}: {sorted(k for k in want if got[k] != want[k])} differ from mergekit's"
    else:  # slerp: both sum the norms and the dot product in their own order
        want = load_file(refs / f"{case}.safetensors")
        assert set(want) <= set(ours)
        for k in want:
            torch.testing.assert_close(ours[k], want[k], rtol=2e-6, atol=1e-7, msg=k)
    omits = SOURCE["mergekit_omits"].get(arch, [])
    assert all(any(o in k for o in omits) for k in set(ours) - set(want)), "tensors mergekit did not write"
    assert torch.isfinite(_logits(out)).all()
    tok_ref = FIX / arch / "refs" / f"{case}.tokenizer.json"
    if tok_ref.exists():
        want = json.loads(tok_ref.read_text())
        tok = transformers.AutoTokenizer.from_pretrained(out)
        assert [tok(s, add_special_tokens=False)["input_ids"] for s in want["sentences"]] == want["ids"]
        assert tok.convert_ids_to_tokens(list(range(len(tok)))) == want["tokens"]
        assert json.loads((out / "config.json").read_text())["vocab_size"] == want["vocab_size"]


def test_the_gradients_do_vary_across_layers(tmp_path, monkeypatch):
    """The fixture exercises the grammar: the per-layer t of the SLERP case differs between layers and between
    attention and MLP tensors (else a test of scalars would pass too)."""
    monkeypatch.chdir(FIX / "llama")
    out = load_file(
        run_merge(_recipe("llama", "slerp_gradient_filter"), tmp_path / "out", hash="none") / "model.safetensors"
    )
    base, ft = (load_file(FIX / "llama" / "models" / m / "model.safetensors") for m in ("base", "ft0"))
    k = "model.layers.{}.self_attn.q_proj.weight"

    def frac(name):  # how far from the base toward the fine-tune (slerp of near-colinear tensors ~ lerp)
        d, e = (out[name] - base[name]).flatten(), (ft[name] - base[name]).flatten()
        return float(d @ e / (e @ e))

    assert frac(k.format(0)) == pytest.approx(0.0, abs=1e-3) and frac(k.format(4)) == pytest.approx(1.0, abs=1e-3)
    assert frac(k.format(2)) == pytest.approx(0.3, abs=2e-2)
    assert frac("model.layers.0.mlp.up_proj.weight") == pytest.approx(1.0, abs=1e-3)
