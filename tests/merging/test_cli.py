"""`peft-lab merge`'s Hydra form in process: what it leaves behind (only the output dirs) and its errors, each one
UserError naming the problem (Hydra's own messages translated, a job's UserError carried out unchanged)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from safetensors.torch import save_file

from merging.cli import main as merge_main
from peft_lab.errors import UserError


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """base + two models as .safetensors files in the working dir; temporary dirs go to tmp_path/tmp."""
    g = torch.Generator().manual_seed(0)
    for name in ("base", "m0", "m1"):
        save_file({"w": torch.randn(4, 3, generator=g)}, tmp_path / f"{name}.safetensors")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path)
    return ["base=base.safetensors", "models=[m0.safetensors,m1.safetensors]"]


def test_a_run_and_a_sweep_leave_only_their_outputs(inputs, tmp_path, capsys):
    assert merge_main(["method=ties", *inputs, "out=one", "method.density=0.5"]) == 0
    assert merge_main(["-m", "method=ties,task_arithmetic", *inputs, "out=sw", "method.lambda=0.5,1.0"]) == 0
    assert capsys.readouterr().out.split() == [
        "one",
        "sw/method=ties,method.lambda=0.5",
        "sw/method=ties,method.lambda=1.0",
        "sw/method=task_arithmetic,method.lambda=0.5",
        "sw/method=task_arithmetic,method.lambda=1.0",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["base.safetensors", "m0.safetensors", "m1.safetensors", "one", "sw", "tmp"]
    )
    assert not list((tmp_path / "tmp").iterdir())  # Hydra's scratch dirs are gone
    assert (tmp_path / "sw" / "method=task_arithmetic,method.lambda=0.5" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["method=ties", "method.nope=1"], r"^peft-lab merge: the method has no parameter 'nope' \(see conf/method"),
        (["method=ties"], r"^peft-lab merge: give the output dir, e\.g\. out=merged/"),
        (["method=tiez", "out=o"], r"^Unknown merge method 'tiez'\. Available: .*ties"),
        (
            ["method=ties", "out=o", "method.density=[1,"],
            r"^peft-lab merge: cannot parse the override 'method\.density=\[1,'",
        ),
        (["method=ties", "out=o", "method.density=0"], r"^overrides: parameters: density=0 is out of range"),
    ],
)
def test_errors_are_one_user_error(inputs, tmp_path, capsys, args, match):
    with pytest.raises(UserError, match=match) as e:
        merge_main([*inputs, *args])
    assert "\n" not in str(e.value).strip()
    assert "Error executing job" not in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list((tmp_path / "tmp").iterdir())


def test_a_sweep_stops_at_its_first_failing_job(inputs, tmp_path, capsys):
    with pytest.raises(UserError, match=r"^overrides: parameters: density=0 is out of range"):
        merge_main([*inputs, "-m", "method=ties", "out=o", "method.density=0.5,0,0.7"])  # -m after overrides too
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["method=ties,method.density=0.5"]
    assert "Error executing job" not in capsys.readouterr().err and not list((tmp_path / "tmp").iterdir())
