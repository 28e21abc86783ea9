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
