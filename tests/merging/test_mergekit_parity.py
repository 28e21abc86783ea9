"""Parity with mergekit 0.1.5: `peft-lab merge` on the same YAML recipes gives the tensors mergekit gave
(float32). Fixtures: tests/fixtures/mergekit (made by tests/fixtures/make_mergekit_refs.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merging import run_merge
from tests.conftest import REPO

FIX = REPO / "tests" / "fixtures" / "mergekit"
CASES = sorted(p.stem for p in (FIX / "recipes").glob("*.yaml"))


def test_fixtures_cover_the_required_methods():
    import yaml

    assert json.loads((FIX / "SOURCE.json").read_text())["cases"] == CASES
    methods = {yaml.safe_load((FIX / "recipes" / f"{c}.yaml").read_text())["merge_method"] for c in CASES}
    assert methods == {"linear", "task_arithmetic", "ties", "dare_ties", "slerp"}


@pytest.mark.parametrize("case", CASES)
def test_same_tensors_as_mergekit(case, tmp_path, monkeypatch):
    monkeypatch.chdir(FIX)  # the recipes use paths relative to the fixture dir, as given to mergekit
    out = run_merge(f"recipes/{case}.yaml", tmp_path / "out", hash="none")
    ours, ref = load_file(out / "model.safetensors"), load_file(FIX / "refs" / f"{case}.safetensors")
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype == torch.float32
        if case.startswith("slerp"):  # both sum the norms/dot in chunks of different sizes
            torch.testing.assert_close(ours[k], ref[k], rtol=2e-6, atol=1e-7)
        else:  # same float32 operations in the same order: identical
            assert torch.equal(ours[k], ref[k]), f"{case}: {k} max diff {(ours[k] - ref[k]).abs().max()}"


def test_cli_config_form_matches_mergekit(tmp_path, cli):
    r = cli("merge", "--config", "recipes/ties.yaml", "--out", tmp_path / "out", cwd=FIX)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # not a terminal: no progress bars
    ours, ref = load_file(tmp_path / "out" / "model.safetensors"), load_file(FIX / "refs" / "ties.safetensors")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------------------------------------
# bfloat16 models (GPT-2 with a tied head, Gemma 2, Qwen2, Phi-3): float32 arithmetic, bfloat16 output
# (fixtures: tests/fixtures/make_mergekit_bf16_refs.py)
# ---------------------------------------------------------------------------------------------------------
BF16 = REPO / "tests" / "fixtures" / "mergekit_bf16"
ARCHS = json.loads((BF16 / "SOURCE.json").read_text())["archs"]


def _bf16_merge(arch: str, case: str, tmp_path, monkeypatch) -> tuple[dict, dict, list[dict]]:
    import yaml

    monkeypatch.chdir(BF16 / arch)
    recipe = yaml.safe_load((BF16 / "recipes" / f"{case}.yaml").read_text())
    out = run_merge(recipe, tmp_path / f"{arch}-{case}", hash="none")
    models = [load_file(BF16 / arch / "models" / m / "model.safetensors") for m in ("base", "ft0", "ft1")]
    return load_file(out / "model.safetensors"), load_file(BF16 / arch / "refs" / f"{case}.safetensors"), models


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_task_arithmetic_is_mergekits_bit_for_bit(arch, tmp_path, monkeypatch):
    ours, ref, _ = _bf16_merge(arch, "task_arithmetic", tmp_path, monkeypatch)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype == torch.bfloat16 and torch.equal(ours[k], ref[k]), k


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_ties_keeps_exactly_k_like_mergekit(arch, tmp_path, monkeypatch):
    """With one fine-tune, merged − base is the trimmed delta itself: both tools keep exactly k = int(0.4·n)
    entries of every tensor, although bfloat16 deltas hold many magnitudes tied at the threshold."""
    ours, ref, (base, ft0, _) = _bf16_merge(arch, "ties_single", tmp_path, monkeypatch)
    tied_somewhere = False
    for k in ref:
        tau = ft0[k].float() - base[k].float()
        n, kk = tau.numel(), max(1, int(0.4 * tau.numel()))
        thr = tau.abs().reshape(-1).topk(kk).values[-1]
        tied_somewhere |= bool(int((tau.abs() >= thr).sum()) > kk)
        expected = min(kk, int((tau != 0).sum()))
        assert int((ours[k] != base[k]).sum()) == int((ref[k] != base[k]).sum()) == expected, (k, n)
    assert tied_somewhere  # the fixture does exercise ties


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", ["ties", "ties_weighted"])
def test_bf16_ties_differs_from_mergekit_only_among_tied_magnitudes(arch, case, tmp_path, monkeypatch):
    """Both keep exactly k per tensor; which of several entries tied at the threshold are kept differs (peft-lab:
    the lowest indices; mergekit: the order of torch's unstable argsort). Every other element is identical."""
    import yaml

    ours, ref, models = _bf16_merge(arch, case, tmp_path, monkeypatch)
    recipe = yaml.safe_load((BF16 / "recipes" / f"{case}.yaml").read_text())
    dens = [(e.get("parameters") or {}).get("density", recipe["parameters"].get("density")) for e in recipe["models"]]
    total = same = 0
    for k in ref:
        taus = [(m[k].float() - models[0][k].float()).reshape(-1) for m in models[1:]]
        tied = torch.zeros_like(taus[0], dtype=torch.bool)
        for tau, d in zip(taus, dens, strict=True):
            kk = max(1, int(d * tau.numel()))
            thr = tau.abs().topk(kk).values[-1]
            tied |= (tau.abs() == thr) & bool(int((tau.abs() >= thr).sum()) > kk)
        differs = (ours[k] != ref[k]).reshape(-1)
        assert not (differs & ~tied).any(), f"{k}: {int((differs & ~tied).sum())} elements differ away from ties"
        total, same = total + differs.numel(), same + int((~differs).sum())
    assert same / total > 0.99


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_dare_ties_matches_mergekit_in_distribution(arch, tmp_path, monkeypatch):
    """DARE drops at random, so the masks differ from mergekit's while the statistics do not: the fraction of
    entries the merge changes and the mean magnitude of the change agree; the same seed gives the same merge."""
    ours, ref, models = _bf16_merge(arch, "dare_ties", tmp_path, monkeypatch)
    base = models[0]
    stats = []
    for out in (ours, ref):
        changed = sum(int((out[k] != base[k]).sum()) for k in base)
        total = sum(base[k].numel() for k in base)
        mag = sum(float((out[k].float() - base[k].float()).abs().sum()) for k in base) / total
        stats.append((changed / total, mag))
    (f_ours, m_ours), (f_ref, m_ref) = stats
    assert abs(f_ours - f_ref) < 0.03, stats  # ~7,000 entries per model: sampling noise is well under 1 point
    assert abs(m_ours - m_ref) / m_ref < 0.05, stats
    again = run_merge(yaml_recipe(BF16 / "recipes" / "dare_ties.yaml"), tmp_path / "again", hash="none")
    assert all(torch.equal(ours[k], v) for k, v in load_file(again / "model.safetensors").items())  # seeded


def yaml_recipe(path):
    import yaml

    return yaml.safe_load(path.read_text())
