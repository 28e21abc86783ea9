"""Recipe parameters are typed by their dataclass: a string list parameter is one pattern (not its characters),
wrong types are refused with the key, the value and the expected type while the recipe is parsed (before any
model is read), and numeric strings (PyYAML reads `lr: 1e-3` as a string) are numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merging import run_merge
from merging.cli import main as merge_main
from merging.methods.fisher import save_fisher
from merging.recipe import load_recipe, parse_recipe
from peft_lab.errors import UserError


@pytest.fixture
def fisher_files(tmp_path):
    """Two models (a body and a classifier head) as .safetensors files, and a saved Fisher for each."""
    g = torch.Generator().manual_seed(0)
    for j in range(2):
        model = {"body.weight": torch.randn(4, 3, generator=g), "classifier.weight": torch.randn(2, 4, generator=g)}
        save_file(model, tmp_path / f"m{j}.safetensors")
        fisher = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in model.items()}
        save_fisher(fisher, tmp_path / f"f{j}.safetensors")
    return tmp_path


def _fisher_recipe(root: Path, heads) -> dict:
    models = [
        {"model": str(root / f"m{j}.safetensors"), "parameters": {"fisher": str(root / f"f{j}.safetensors")}}
        for j in range(2)
    ]
    return {"merge_method": "fisher", "models": models, "parameters": {"heads": heads}}


def _merged(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_a_string_heads_is_one_pattern_in_a_yaml_recipe(fisher_files, tmp_path):
    m0 = load_file(fisher_files / "m0.safetensors")
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(_fisher_recipe(fisher_files, "classifier.*")))
    assert load_recipe(rec).method.params.heads == ("classifier.*",)
    as_string = _merged(run_merge(rec, tmp_path / "s"))
    as_list = _merged(run_merge(_fisher_recipe(fisher_files, ["classifier.*"]), tmp_path / "l"))
    assert torch.equal(as_string["classifier.weight"], m0["classifier.weight"])  # the head: the first model's
    assert not torch.equal(as_string["body.weight"], m0["body.weight"])  # the body is merged
    for k in as_list:
        assert torch.equal(as_string[k], as_list[k]), k


def test_a_string_heads_is_one_pattern_in_the_hydra_form(fisher_files, tmp_path, monkeypatch):
    monkeypatch.chdir(fisher_files)
    models = (
        "models=[{model: m0.safetensors, parameters: {fisher: f0.safetensors}},"
        "{model: m1.safetensors, parameters: {fisher: f1.safetensors}}]"
    )
    assert merge_main(["method=fisher", models, f"out={tmp_path / 'h'}", "method.heads=classifier.*"]) == 0
    expected = _merged(run_merge(_fisher_recipe(fisher_files, ["classifier.*"]), tmp_path / "l"))
    merged = _merged(tmp_path / "h")
    assert not torch.equal(merged["body.weight"], load_file(fisher_files / "m0.safetensors")["body.weight"])
    for k in expected:
        assert torch.equal(merged[k], expected[k]), k


def _recipe(method: str, **parameters) -> dict:
    """A recipe over input paths that do not exist: a parameter error must come before any file is read."""
    return {
        "merge_method": method,
        "base_model": "/no/base",
        "parameters": parameters,
        "models": [{"model": "/no/m0"}, {"model": "/no/m1"}],
    }


@pytest.mark.parametrize(
    "method, parameters, match",
    [
        ("fisher", {"num_examples": "many"}, r"num_examples='many' must be an integer"),
        ("adamerging", {"steps": 2.5}, r"steps=2\.5 must be an integer"),
        ("adamerging", {"lr": "fast"}, r"lr='fast' must be a finite number"),
        ("adamerging", {"heads": ["classifier.*", 3]}, r"heads=\['classifier\.\*', 3\] must be a list of strings"),
        ("ties", {"normalize": "yes"}, r"normalize='yes' must be true or false"),
        ("ties", {"density": "1e-3x"}, r"density='1e-3x' must be a finite number"),
        ("task_arithmetic", {"lambda": "inf"}, r"lambda='inf' must be a finite number"),
        ("dare_linear", {"seed": True}, r"seed=True must be an integer"),
    ],
)
def test_wrong_types_are_refused_while_parsing(tmp_path, method, parameters, match):
    with pytest.raises(UserError, match=match) as e:
        run_merge(_recipe(method, **parameters), tmp_path / "out")
    assert "parameters" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_numeric_strings_from_yaml_are_numbers(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text(
        "merge_method: adamerging\nbase_model: b\nmodels: [m0, m1]\n"
        "parameters: {lr: 1e-3, density: 5e-1, steps: '12'}\n"
    )
    assert yaml.safe_load(rec.read_text())["parameters"]["lr"] == "1e-3"  # what PyYAML hands over
    p = load_recipe(rec).method.params
    assert (p.lr, p.density, p.steps) == (1e-3, 0.5, 12)
    assert isinstance(p.lr, float) and isinstance(p.steps, int)


def test_per_model_errors_name_the_entry(tmp_path):
    recipe = _recipe("ties")
    recipe["models"][1]["parameters"] = {"weight": "heavy"}
    with pytest.raises(UserError, match=r"models\[1\] \(/no/m1\): weight='heavy' must be a finite number"):
        parse_recipe(recipe, where="r.yaml")
    recipe["models"][1]["parameters"] = {"density": 0}
    with pytest.raises(UserError, match=r"r\.yaml: models\[1\].*density=0 is out of range: must be in \(0, 1\]"):
        parse_recipe(recipe, where="r.yaml")
