"""mergekit's recipe grammar (per-layer gradients, conditional values, scopes) gives mergekit's tensors: the
recipes in tests/fixtures/mergekit_grammar (made by tests/fixtures/make_mergekit_grammar_refs.py with mergekit
0.1.5), float32 arithmetic, compared tensor by tensor. Runs without mergekit installed."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging import run_merge
from tests.conftest import REPO

FIX = REPO / "tests" / "fixtures" / "mergekit_grammar"
SOURCE = json.loads((FIX / "SOURCE.json").read_text())


@pytest.mark.parametrize("arch", SOURCE["archs"])
@pytest.mark.parametrize("case", SOURCE["cases"])
def test_same_tensors_as_mergekit(arch, case, tmp_path, monkeypatch):
    monkeypatch.chdir(FIX / arch)  # the recipes use paths relative to the architecture's dir, as given to mergekit
    recipe = yaml.safe_load((FIX / "recipes" / f"{case}.yaml").read_text())
    out = run_merge(recipe, tmp_path / "out", hash="none")
    ours, ref = load_file(out / "model.safetensors"), load_file(FIX / arch / "refs" / f"{case}.safetensors")
    assert set(ours) == set(ref)
    for k in ref:
        if case.startswith("slerp"):  # both sum the norms/dot in chunks of different sizes
            torch.testing.assert_close(ours[k], ref[k], rtol=2e-6, atol=1e-7, msg=k)
        else:  # the same float32 operations in the same order
            assert torch.equal(ours[k], ref[k]), f"{case}: {k} max diff {(ours[k] - ref[k]).abs().max()}"


def test_the_gradients_do_vary_across_layers(tmp_path, monkeypatch):
    """The fixture exercises the grammar: the per-layer t of the SLERP case differs between layers and between
    attention and MLP tensors (else a test of scalars would pass too)."""
    monkeypatch.chdir(FIX / "llama")
    recipe = yaml.safe_load((FIX / "recipes" / "slerp_gradient_filter.yaml").read_text())
    out = load_file(run_merge(recipe, tmp_path / "out", hash="none") / "model.safetensors")
    base, ft = (load_file(FIX / "llama" / "models" / m / "model.safetensors") for m in ("base", "ft0"))
    k = "model.layers.{}.self_attn.q_proj.weight"

    def frac(name):  # how far from the base toward the fine-tune (slerp of near-colinear tensors ~ lerp)
        d, e = (out[name] - base[name]).flatten(), (ft[name] - base[name]).flatten()
        return float(d @ e / (e @ e))

    assert frac(k.format(0)) == pytest.approx(0.0, abs=1e-3) and frac(k.format(4)) == pytest.approx(1.0, abs=1e-3)
    assert frac(k.format(2)) == pytest.approx(0.3, abs=2e-2)
    assert frac("model.layers.0.mlp.up_proj.weight") == pytest.approx(1.0, abs=1e-3)
