"""Parity with mergekit 0.1.5 for nearswap, ram, ramplus_tl, model_stock, nuslerp, multislerp, karcher, arcee_fusion,
breadcrumbs, breadcrumbs_ties, sce (same tensors), della and della_linear (same statistics): `peft-lab merge` on the
recipes mergekit-yaml ran, on a float32 BERT classifier and a bfloat16 Llama (fixtures:
tests/fixtures/make_mergekit_methods_refs.py). Tolerances, per kind of case:

- element-wise and selection methods on float32: identical tensors;
- methods whose coefficients come from whole-tensor sums (norms, inner products, mean squares) on float32:
  within rtol 1e-5, atol 1e-7 (mergekit sums each tensor in one float32 reduction, peft-lab per chunk in float32
  and across chunks in float64; the coefficients differ in the last float32 bits); karcher within rtol 1e-4,
  atol 5e-6 (mergekit iterates on float32 tensors, peft-lab on float64 coefficients);
- bfloat16 outputs: identical, except that an output element may round to the neighbouring bfloat16 value (at
  most one ulp, in under 0.1% of the elements) for the sum-based methods, and that breadcrumbs may keep other
  entries among magnitudes tied at a window edge (mergekit: the order of torch's unstable sort; peft-lab: the
  lowest indices), with every other element identical;
- della: random masks, so the fraction of entries changed and the mean change agree (within 3 points and 5%),
  and a seed reproduces peft-lab's merge.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging import run_merge
from tests.conftest import REPO

FIX = REPO / "tests" / "fixtures" / "mergekit_methods"
SOURCE = json.loads((FIX / "SOURCE.json").read_text())
EXACT = {"nearswap", "ram", "ramplus_tl", "arcee_fusion", "breadcrumbs", "breadcrumbs_ties"}
SUMS = {
    "model_stock",
    "model_stock_filter_wise",
    "nuslerp",
    "nuslerp_rows",
    "nuslerp_row_wise",
    "multislerp",
    "multislerp_no_base",
    "karcher",
    "karcher_base",
    "sce",
    "sce_all",
}
RANDOM = {"della", "della_linear"}


def test_fixtures_cover_every_deterministic_and_random_case():
    assert SOURCE["archs"] == ["bert", "llama"] and SOURCE["mergekit"] == "0.1.5"
    assert set(SOURCE["cases"]) == EXACT | SUMS | RANDOM
    methods = {
        yaml.safe_load((FIX / "bert" / "recipes" / f"{c}.yaml").read_text())["merge_method"] for c in SOURCE["cases"]
    }
    assert methods == {
        "nearswap", "ram", "ramplus_tl", "model_stock", "nuslerp", "multislerp", "karcher", "arcee_fusion",
        "breadcrumbs", "breadcrumbs_ties", "sce", "della", "della_linear",
    }  # fmt: skip


def _merge(arch: str, case: str, tmp_path, monkeypatch, **opts) -> tuple[dict, dict]:
    monkeypatch.chdir(FIX / arch)  # the recipes use paths relative to the architecture's dir
    recipe = yaml.safe_load((FIX / arch / "recipes" / f"{case}.yaml").read_text())
    out = run_merge(recipe, tmp_path / f"{arch}-{case}-{len(opts)}", hash="none", **opts)
    return load_file(out / "model.safetensors"), load_file(FIX / arch / "refs" / f"{case}.safetensors")


def _models(arch: str) -> list[dict]:
    return [load_file(FIX / arch / "models" / m / "model.safetensors") for m in ("base", "ft0", "ft1", "ft2")]


@pytest.mark.parametrize("case", sorted(EXACT | SUMS))
def test_float32_bert_matches_mergekit(case, tmp_path, monkeypatch):
    ours, ref = _merge("bert", case, tmp_path, monkeypatch)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype == torch.float32, k
        if case in EXACT:
            assert torch.equal(ours[k], ref[k]), f"{case}: {k} max diff {(ours[k] - ref[k]).abs().max()}"
        elif case.startswith("karcher"):
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=5e-6)
        else:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["model_stock", "nuslerp_rows", "sce", "breadcrumbs_ties"])
def test_float32_parity_holds_when_streamed_in_small_chunks(case, tmp_path, monkeypatch):
    ours, ref = _merge("bert", case, tmp_path, monkeypatch, chunk_size=64)
    for k in ref:
        if case in EXACT:
            assert torch.equal(ours[k], ref[k]), k
        else:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-7)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 at each value of x."""
    return (x.abs().float().clamp_min(1e-30).log2().floor() - 7).exp2()


@pytest.mark.parametrize("case", sorted((EXACT | SUMS) - {"breadcrumbs", "breadcrumbs_ties"}))
def test_bfloat16_llama_matches_mergekit(case, tmp_path, monkeypatch):
    ours, ref = _merge("llama", case, tmp_path, monkeypatch)
    assert set(ours) == set(ref)
    total = differ = 0
    for k in ref:
        assert ours[k].dtype == ref[k].dtype == torch.bfloat16, k
        d = (ours[k].float() - ref[k].float()).abs()
        if case in EXACT:
            assert torch.equal(ours[k], ref[k]), k
        assert bool((d <= _ulp(ref[k]) * 1.001).all()), f"{case}: {k} differs by more than one bfloat16 ulp"
        total, differ = total + d.numel(), differ + int((d > 0).sum())
    assert differ <= 0.001 * total, (differ, total)


def _window_edges(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Entries whose magnitude equals a breadcrumbs window edge (the last dropped outlier or the last kept)."""
    a = tau.abs().reshape(-1)
    n = a.numel()
    keep = int(density * n)
    skip = min(int(gamma * n), n - keep)
    srt = a.sort(descending=True).values
    edges = [srt[i] for i in (skip - 1, skip, skip + keep - 1, skip + keep) if 0 <= i < n]
    return torch.stack([a == e for e in edges]).any(0).reshape(tau.shape)


@pytest.mark.parametrize("case", ["breadcrumbs", "breadcrumbs_ties"])
def test_bfloat16_breadcrumbs_differs_from_mergekit_only_among_tied_magnitudes(case, tmp_path, monkeypatch):
    ours, ref = _merge("llama", case, tmp_path, monkeypatch)
    recipe = yaml.safe_load((FIX / "llama" / "recipes" / f"{case}.yaml").read_text())
    top = recipe.get("parameters") or {}
    per = [{**top, **(e.get("parameters") or {})} for e in recipe["models"]]
    models = _models("llama")
    total = same = 0
    tied_somewhere = False
    for k in ref:
        tied = torch.zeros(ref[k].shape, dtype=torch.bool)
        for m, p in zip(models[1:], per, strict=True):
            tied |= _window_edges(m[k].float() - models[0][k].float(), p["density"], p.get("gamma", 0.01))
        differs = ours[k] != ref[k]
        assert not (differs & ~tied).any(), f"{k}: {int((differs & ~tied).sum())} elements differ away from ties"
        tied_somewhere |= bool(differs.any())
        total, same = total + differs.numel(), same + int((~differs).sum())
    assert same / total > 0.99 and tied_somewhere  # the fixture does exercise ties


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("case", sorted(RANDOM))
def test_della_matches_mergekit_in_distribution(arch, case, tmp_path, monkeypatch):
    """DELLA's masks are random: the fraction of entries the merge changes and the mean magnitude of the change agree
    with mergekit's (its default L1 rescale); the same seed gives the same merge."""
    ours, ref = _merge(arch, case, tmp_path, monkeypatch)
    base = _models(arch)[0]
    stats = []
    for out in (ours, ref):
        changed = sum(int((out[k] != base[k]).sum()) for k in base)
        total = sum(base[k].numel() for k in base)
        mag = sum(float((out[k].float() - base[k].float()).abs().sum()) for k in base) / total
        stats.append((changed / total, mag))
    (f_ours, m_ours), (f_ref, m_ref) = stats
    assert abs(f_ours - f_ref) < 0.03, stats
    assert abs(m_ours - m_ref) / m_ref < 0.05, stats
    again, _ = _merge(arch, case, tmp_path, monkeypatch, overwrite=True)
    assert all(torch.equal(ours[k], v) for k, v in again.items())


def test_a_listed_base_is_the_base_for_optional_base_methods(tmp_path, monkeypatch):
    """model_stock's recipe lists the base among its models, as model cards do: mergekit takes it as the base."""
    recipe = yaml.safe_load((FIX / "bert" / "recipes" / "model_stock.yaml").read_text())
    assert recipe["models"][0]["model"] == recipe["base_model"]
    monkeypatch.chdir(FIX / "bert")
    recipe = yaml.safe_load((FIX / "bert" / "recipes" / "nuslerp.yaml").read_text())
    recipe["models"].insert(0, {"model": recipe["base_model"]})
    out = run_merge(recipe, tmp_path / "nuslerp", hash="none")
    ref = load_file(FIX / "bert" / "refs" / "nuslerp.safetensors")
    got = load_file(out / "model.safetensors")
    assert all(torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-7) for k in ref)
