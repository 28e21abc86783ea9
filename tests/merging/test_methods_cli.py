"""Every merge method through `peft-lab merge`'s Hydra form with its conf/method config (each config's defaults run as
given), a sweep over the SVD, consensus and PCB methods, and the `wise_ft` alias config."""

from __future__ import annotations

import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging import METHODS
from merging.cli import main as merge_main

DATA_DRIVEN = {"fisher", "adamerging", "adamerging_ties", "regmean"}  # need examples (tests/merging/datadriven)


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """base + three models as .safetensors files (a matrix, a vector) in the working dir."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    for i in range(3):
        save_file(
            {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / f"m{i}.safetensors"
        )
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _models(name: str) -> str:
    cls = METHODS.get(name)
    n = max(cls.min_models, min(3, cls.max_models or 3))
    return "models=[" + ",".join(f"m{i}.safetensors" for i in range(n)) + "]"


@pytest.mark.parametrize("name", [n for n in METHODS.names() if n not in DATA_DRIVEN])
def test_every_data_free_method_runs_with_its_config(inputs, name, capsys):
    base = [] if name == "passthrough" else ["base=base.safetensors"]  # passthrough copies one model: no base
    assert merge_main([f"method={name}", *base, _models(name), f"out={name}"]) == 0
    out = load_file(inputs / name / "model.safetensors")
    assert set(out) == {"w", "b"} and all(torch.isfinite(v).all() for v in out.values())


def test_a_sweep_over_the_svd_consensus_and_pcb_methods(inputs, capsys):
    methods = "tsv,iso_c,iso_cts,consensus,pcb"
    args = ["-m", f"method={methods}", "base=base.safetensors", _models("tsv"), "out=sw"]
    assert merge_main(args) == 0
    assert capsys.readouterr().out.split() == [f"sw/method={m}" for m in methods.split(",")]


def test_wise_ft_is_the_weight_space_ensemble(inputs):
    assert (
        merge_main(["method=wise_ft", "base=base.safetensors", "models=[m0.safetensors]", "out=w", "method.lambda=0.3"])
        == 0
    )
    base, ft = load_file(inputs / "base.safetensors"), load_file(inputs / "m0.safetensors")
    out = load_file(inputs / "w" / "model.safetensors")
    for k in base:
        torch.testing.assert_close(out[k], 0.7 * base[k] + 0.3 * ft[k])
