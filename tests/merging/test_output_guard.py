"""Commands that write an output never delete or modify their inputs, and `--overwrite` only replaces a previous
output of the same command (`peft_lab.tree.fs.guard_output`), for `peft-lab merge` and `peft-lab signature`."""

import os

import pytest
import torch

from merging import run_merge
from merging.signatures.signature import extract, save_signatures
from peft_lab.cli import main as cli_main
from peft_lab.errors import UserError
from peft_lab.tree import Tree, save_tree


def _toy(seed: int) -> Tree:
    g = torch.Generator().manual_seed(seed)
    return Tree(
        {
            "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
            "conv.bias": torch.randn(4, generator=g),
            "fc.weight": torch.randn(5, 36, generator=g),
            "fc.bias": torch.randn(5, generator=g),
        }
    )


def _model_dir(d, seed: int):
    save_tree(_toy(seed), d / "model.safetensors")
    (d / "config.json").write_text('{"model_type": "toy"}')
    return d


def _sig_file(path, seed: int = 0):
    clean = _toy(seed)
    robust = clean.replace((k, v.dense() + 0.01) for k, v in clean.items())
    return save_signatures([extract(clean, robust, name=f"s{seed}")], path)


def _snapshot(*roots):
    """Every file under the roots with its bytes (to check that nothing was deleted or changed)."""
    out = {}
    for r in roots:
        for f in sorted([r] if r.is_file() else r.rglob("*")):
            if f.is_file():
                out[str(f)] = f.read_bytes()
    return out


def _recipe(*models):
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": 1.0 / len(models)}} for m in models],
    }


def _run(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    return code, " ".join(capsys.readouterr().err.split())  # the message as one line, however it was wrapped


@pytest.fixture
def runs(tmp_path):
    """runs/clean (a model), runs/sibling (someone's results) and a signature file outside runs/."""
    r = tmp_path / "runs"
    (r / "clean").mkdir(parents=True)
    _model_dir(r / "clean", 0)
    (r / "sibling").mkdir()
    (r / "sibling" / "results.txt").write_text("a week of experiments")
    _sig_file(tmp_path / "sig.safetensors")
    return r


def test_patch_onto_the_dir_holding_its_input_is_refused(runs, capsys):
    before = _snapshot(runs)
    code, err = _run(
        capsys,
        "signature",
        "patch",
        "--model",
        runs / "clean",
        "--signature",
        runs.parent / "sig.safetensors",
        "--out",
        runs,
        "--overwrite",
    )
    assert code != 0
    assert "contains the input" in err and str(runs / "clean") in err
    assert _snapshot(runs) == before


def test_symlinked_paths_are_resolved(runs, capsys):
    alias = runs.parent / "alias"
    alias.symlink_to(runs, target_is_directory=True)
    before = _snapshot(runs)
    # the input reached through a link into the output
    code, err = _run(
        capsys,
        "signature",
        "patch",
        "--model",
        alias / "clean",
        "--signature",
        runs.parent / "sig.safetensors",
        "--out",
        runs,
        "--overwrite",
    )
    assert code != 0 and "contains the input" in err
    # the output reached through a link onto the input
    code, err = _run(
        capsys,
        "signature",
        "patch",
        "--model",
        runs / "clean",
        "--signature",
        runs.parent / "sig.safetensors",
        "--out",
        alias / "clean",
        "--overwrite",
    )
    assert code != 0 and "is the input" in err
    assert _snapshot(runs) == before and alias.is_symlink()


def test_output_inside_an_input_is_refused(runs):
    before = _snapshot(runs)
    with pytest.raises(UserError, match="inside the input"):
        run_merge(_recipe(runs / "clean", runs / "clean"), runs / "clean" / "merged")
    assert _snapshot(runs) == before


def test_merge_refuses_an_output_that_contains_an_input(runs):
    before = _snapshot(runs)
    with pytest.raises(UserError, match="contains the input"):
        run_merge(_recipe(runs / "clean", runs / "clean"), runs, overwrite=True)
    assert _snapshot(runs) == before


def test_side_file_that_is_an_input_is_refused(tmp_path, capsys):
    save_tree(_toy(0), tmp_path / "m.safetensors")
    # the signature sits where the patch would put its restore copies (p.rws_restore.safetensors)
    sig = _sig_file(tmp_path / "p.rws_restore.safetensors")
    before = _snapshot(tmp_path)
    code, err = _run(
        capsys,
        "signature",
        "patch",
        "--model",
        tmp_path / "m.safetensors",
        "--signature",
        sig,
        "--out",
        tmp_path / "p.safetensors",
    )
    assert code != 0 and "is the input" in err and str(sig) in err
    assert _snapshot(tmp_path) == before


def test_file_output_that_is_an_input_is_refused(tmp_path, capsys):
    a, b = _sig_file(tmp_path / "a.safetensors", 0), _sig_file(tmp_path / "b.safetensors", 1)
    before = _snapshot(tmp_path)
    code, err = _run(capsys, "signature", "pack", a, b, "--out", a, "--overwrite")
    assert code != 0 and "is the input" in err
    _model_dir(tmp_path / "m", 0)
    code, err = _run(
        capsys,
        "signature",
        "extract",
        "--clean",
        tmp_path / "m",
        "--robust",
        tmp_path / "m",
        "--out",
        tmp_path / "m" / "sig.safetensors",
    )
    assert code != 0 and "inside the input" in err
    assert not (tmp_path / "m" / "sig.safetensors").exists()
    assert {k: v for k, v in _snapshot(tmp_path).items() if k in before} == before


@pytest.mark.parametrize("command", ["merge", "patch", "pack"])
def test_overwrite_refuses_what_the_command_did_not_write(runs, tmp_path, capsys, command):
    victim = tmp_path / ("victim.safetensors" if command == "pack" else "victim")
    if command == "pack":
        save_tree(_toy(3), victim)  # a model file, not a signature file
    else:
        victim.mkdir()
        (victim / "notes.txt").write_text("mine")
    before = _snapshot(victim)
    if command == "merge":
        with pytest.raises(UserError, match="not written by"):
            run_merge(_recipe(runs / "clean", runs / "clean"), victim, overwrite=True)
    else:
        args = (
            ["signature", "patch", "--model", runs / "clean", "--signature", tmp_path / "sig.safetensors"]
            if command == "patch"
            else ["signature", "pack", tmp_path / "sig.safetensors"]
        )
        code, err = _run(capsys, *args, "--out", victim, "--overwrite")
        assert code != 0 and "not written by" in err
    assert _snapshot(victim) == before


def test_overwrite_replaces_a_previous_output_of_the_same_command(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    run_merge(_recipe(runs / "clean", runs / "clean"), out)
    run_merge(_recipe(runs / "clean", runs / "clean"), out, overwrite=True)
    assert (out / "merge_recipe.yaml").exists()
    sig = tmp_path / "sig.safetensors"
    for _ in range(2):
        code, err = _run(
            capsys,
            "signature",
            "patch",
            "--model",
            runs / "clean",
            "--signature",
            sig,
            "--out",
            tmp_path / "patched",
            "--overwrite",
        )
        assert code == 0, err
    # a merge output is not a patch output, and the other way round
    code, err = _run(
        capsys, "signature", "patch", "--model", runs / "clean", "--signature", sig, "--out", out, "--overwrite"
    )
    assert code != 0 and "not written by" in err
    with pytest.raises(UserError, match="not written by"):
        run_merge(_recipe(runs / "clean", runs / "clean"), tmp_path / "patched", overwrite=True)
    for _ in range(2):
        code, err = _run(capsys, "signature", "pack", sig, "--out", tmp_path / "bank.safetensors", "--overwrite")
        assert code == 0, err
    assert os.path.exists(tmp_path / "bank.safetensors")
