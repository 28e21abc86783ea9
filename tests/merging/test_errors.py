"""Bad input: each case gets one clear UserError naming the file/tensor/parameter, leaves no output (or
temporary) dir behind and never touches the inputs; through the CLI: exit 2, one paragraph, no traceback."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from merging import run_merge
from peft_lab.errors import UserError
from tests.conftest import REPO
from tests.helpers.merge import file_digests


def _tensors(seed: int, drop=(), reshape=None, extra=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {f"layer{i}.weight": torch.randn(8, 6, generator=g) for i in range(4)}
    t["layer0.bias"] = torch.randn(8, generator=g)
    for k in drop:
        del t[k]
    for k, shape in (reshape or {}).items():
        t[k] = torch.randn(shape, generator=g)
    t.update(extra or {})
    return t


@pytest.fixture
def files(tmp_path):
    """base + two models as single .safetensors files."""
    paths = {}
    for name, seed in (("base", 0), ("m0", 1), ("m1", 2)):
        save_file(_tensors(seed), tmp_path / f"{name}.safetensors")
        paths[name] = tmp_path / f"{name}.safetensors"
    return paths


def ta(files, **kw):
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(files["base"]),
        "models": [{"model": str(files["m0"])}, {"model": str(files["m1"])}],
        **kw,
    }


def assert_nothing_left(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")) and not list(out.parent.glob(f".{out.name}.old-*"))


def test_mismatched_shapes_and_missing_tensors_are_listed_at_once(files, tmp_path):
    save_file(_tensors(1, reshape={"layer1.weight": (6, 8)}, drop=["layer2.weight"]), files["m0"])
    save_file(_tensors(2, drop=["layer3.weight", "layer0.bias"], extra={"stray": torch.zeros(2)}), files["m1"])
    before = file_digests(tmp_path)
    with pytest.raises(UserError) as e:
        run_merge(ta(files), tmp_path / "out")
    msg = str(e.value)
    for needle in (
        "layer1.weight has shape (6, 8)",
        "layer2.weight",
        "layer3.weight",
        "layer0.bias",
        "stray",
        "m0.safetensors",
        "m1.safetensors",
    ):
        assert needle in msg, needle
    assert_nothing_left(tmp_path / "out")
    assert file_digests(tmp_path) == before


def test_float_vs_int_tensor_is_a_mismatch(files, tmp_path):
    save_file(_tensors(1, extra={"layer0.bias": torch.arange(8)}), files["m0"])
    with pytest.raises(UserError, match=r"layer0\.bias is torch\.int64"):
        run_merge(ta(files), tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_safetensors(files, tmp_path, damage):
    data = files["m1"].read_bytes()
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + data[18:]
    files["m1"].write_bytes(data[: len(data) - 100] if damage == "truncate" else garbage)
    with pytest.raises(UserError, match=r"m1\.safetensors.*(truncated|corrupt)"):
        run_merge(ta(files), tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_nonexistent_paths_are_all_named(files, tmp_path):
    r = ta(files)
    r["models"] = [{"model": str(tmp_path / "nope1")}, {"model": str(tmp_path / "nope2")}]
    with pytest.raises(UserError, match=r"No such file or directory: .*nope1, .*nope2"):
        run_merge(r, tmp_path / "out")
    with pytest.raises(UserError, match=r"nope\.yaml: recipe file not found"):
        run_merge(tmp_path / "nope.yaml", tmp_path / "out")


def test_unknown_method_lists_the_available_ones(files, tmp_path):
    match = r"Unknown merge method 'tiez'\. Available: .*dare_linear.*linear.*slerp.*soup.*ties"
    with pytest.raises(UserError, match=match):
        run_merge({**ta(files), "merge_method": "tiez"}, tmp_path / "out")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"slices": [{"sources": []}]}, r"give exactly one of `models`.*this recipe has models and slices"),
        ({"slices": [{"sources": []}], "models": None}, r"slices\[0\]: a slice is \{sources"),
        ({"parameters": {"lambda": [0.1, "big"]}}, r"parameters: lambda='big' must be a finite number"),
        ({"parameters": {"lambda": []}}, r"lambda=\[\] is empty: give a value, a gradient"),
        ({"parameters": {"lambda": [0.1, {"filter": "mlp", "value": 1}]}}, r"mixes values and filters"),
        ({"dtype": "float8"}, r"dtype 'float8' is not one of"),
        ({"frobnicate": 1}, r"unknown key\(s\) frobnicate"),
        ({"merge_method": "ties", "base_model": None}, r"ties needs base_model"),
        ({"merge_method": "slerp"}, r"slerp merges exactly 1 model\(s\) besides the base, got 2"),
        ({"tokenizer_source": "union"}, r"tokenizer settings need each model's dir \(its tokenizer files\)"),
        ({"tokenizer_source": "elsewhere/m"}, r"tokenizer_source names elsewhere/m, which is not a model of this"),
    ],
)
def test_unsupported_or_invalid_recipes(files, tmp_path, change, match):
    with pytest.raises(UserError, match=match):
        run_merge({**ta(files), **change}, tmp_path / "out")


def test_unknown_option_and_bad_yaml(files, tmp_path):
    with pytest.raises(UserError, match=r"Unknown option\(s\) overwrit"):
        run_merge(ta(files), tmp_path / "out", overwrit=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [ties\n")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML"):
        run_merge(bad, tmp_path / "out")


def test_non_empty_output_dir_needs_overwrite(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match=r"already exists and is not empty.*overwrite=true"):
        run_merge(ta(files), out)
    # overwrite replaces only a previous merge output, never a dir of something else
    with pytest.raises(UserError, match=r"was not written by peft-lab as a 'merge' output"):
        run_merge(ta(files), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    run_merge(ta(files), tmp_path / "merged")
    run_merge(ta(files), tmp_path / "merged", overwrite=True)
    assert (tmp_path / "merged" / "model.safetensors").exists()
    # replacing an input (or a dir holding one) is refused even with overwrite
    with pytest.raises(UserError, match=r"contains the input"):
        run_merge(ta(files), tmp_path, overwrite=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_are_refused_unless_allowed(files, tmp_path, bad):
    t = _tensors(2)
    t["layer2.weight"][3, 4] = bad
    save_file(t, files["m1"])
    match = r"m1\.safetensors: tensor layer2\.weight contains (NaN|inf).*flat index 22.*allow_nonfinite=true"
    with pytest.raises(UserError, match=match):
        run_merge(ta(files), tmp_path / "out")
    assert_nothing_left(tmp_path / "out")
    out = run_merge(ta(files), tmp_path / "out", allow_nonfinite=True)
    assert yaml.safe_load((out / "merge_recipe.yaml").read_text())["allow_nonfinite"] is True


def test_merge_overflow_is_reported(files, tmp_path):
    with pytest.raises(UserError, match=r"the task_arithmetic merge: tensor layer0\.\w+ contains inf"):
        run_merge(ta(files, parameters={"lambda": 1e38}), tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_pickle_inputs_are_refused_unless_allowed(files, tmp_path):
    torch.save(_tensors(3), tmp_path / "m2.bin")
    r = ta(files)
    r["models"].append({"model": str(tmp_path / "m2.bin")})
    with pytest.raises(UserError, match=r"m2\.bin is a pickle file.*safetensors.*allow_pickle=true"):
        run_merge(r, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")
    run_merge(r, tmp_path / "out", allow_pickle=True)
    # a model dir holding only pickle weights, allowed: merged and hashed like any input
    (tmp_path / "bindir").mkdir()
    torch.save(_tensors(4), tmp_path / "bindir" / "pytorch_model.bin")
    r["models"][-1] = {"model": str(tmp_path / "bindir")}
    out = run_merge(r, tmp_path / "out2", allow_pickle=True)
    assert "pytorch_model.bin" in yaml.safe_load((out / "merge_recipe.yaml").read_text())["inputs"][-1]["files"]


def test_adapter_inputs_need_a_full_base(files, tmp_path):
    from peft_lab.tree import LowRank, Tree, save_tree
    from peft_lab.tree.load import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from peft_lab.tree.safetensors import TREE_KIND_KEY

    d = tmp_path / "adapter"
    d.mkdir()
    (d / ADAPTER_CONFIG).write_text("{}")
    delta = Tree({"layer1.weight": LowRank(torch.ones(8, 1), torch.ones(1, 6))})
    save_tree(delta, d / ADAPTER_WEIGHTS, metadata={TREE_KIND_KEY: "delta"})
    with pytest.raises(UserError, match=r"adapter.*give base_model"):
        run_merge(
            {"merge_method": "linear", "models": [{"model": str(d)}, {"model": str(files["m0"])}]}, tmp_path / "out"
        )
    with pytest.raises(UserError, match=r"base_model .*adapter is an adapter"):
        run_merge({**ta(files), "base_model": str(d)}, tmp_path / "out")


def test_soup_with_different_masks_fails_cleanly(files, tmp_path):
    a, b = _tensors(1), _tensors(2)
    for t, cut in ((a, 2), (b, 3)):
        t["layer1.weight"][:cut] = 0
    save_file(a, files["m0"])
    save_file(b, files["m1"])
    soup = {"merge_method": "soup", "models": [{"model": str(files["m0"])}, {"model": str(files["m1"])}]}
    with pytest.raises(UserError, match=r"different sparsity masks in tensor layer1\.weight.*check_masks=false"):
        run_merge(soup, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_a_failed_merge_stops_hashing_its_inputs(files, tmp_path, monkeypatch):
    """The background hasher stops when the merge fails (it used to read every input to the end)."""
    import threading

    from merging import provenance

    reads = []
    started = threading.Event()

    class SlowHasher(provenance.Hasher):
        CHUNK = 64  # many small reads, each slowed down until the hasher is told to stop

        def run(self):
            real_open = open
            hasher = self

            def slow_open(*a, **k):
                fh = real_open(*a, **k)
                real_readinto = fh.readinto

                def readinto(buf):
                    started.set()
                    hasher._cancel.wait(0.2)
                    reads.append(1)
                    return real_readinto(buf)

                fh.readinto = readinto
                return fh

            import builtins

            builtins_open, builtins.open = builtins.open, slow_open
            try:
                super().run()
            finally:
                builtins.open = builtins_open

    def failing_prepare(self, inputs):
        started.wait(5)
        raise UserError("prepare failed")

    import merging.run as run_mod
    from merging.methods.task_arithmetic import TaskArithmetic

    monkeypatch.setattr(run_mod, "Hasher", SlowHasher)
    monkeypatch.setattr(TaskArithmetic, "prepare", failing_prepare)
    with pytest.raises(UserError, match="prepare failed"):
        run_merge(ta(files), tmp_path / "out")
    assert not any(t.name == "peft-lab-hash" and t.is_alive() for t in threading.enumerate())
    total = sum(f.stat().st_size for f in files.values())
    assert 0 < len(reads) < total // SlowHasher.CHUNK  # it stopped long before reading everything
    assert_nothing_left(tmp_path / "out")


def test_disk_full_while_writing(files, tmp_path, monkeypatch):
    import peft_lab.tree.safetensors as io

    real, calls = io._write_tensor, []

    def full_after_two(f, t):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, t)

    monkeypatch.setattr(io, "_write_tensor", full_after_two)
    before = file_digests(tmp_path)
    with pytest.raises(UserError, match=r"Disk full while writing .*out.*Free space"):
        run_merge(ta(files), tmp_path / "out")
    assert_nothing_left(tmp_path / "out")
    assert file_digests(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------
# through the CLI: exit code, one paragraph, no traceback; interrupted runs leave nothing behind
# ---------------------------------------------------------------------------------------------------------
def test_cli_errors_are_one_paragraph_without_traceback(files, tmp_path, cli):
    rec = tmp_path / "r.yaml"
    models = [{"model": str(files["m0"]), "parameters": {"weight": "x"}}]
    rec.write_text(yaml.safe_dump({**ta(files), "parameters": {"lambda": 1.0}, "models": models}))
    r = cli("merge", "--config", rec, "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("peft-lab: error: ")
    assert "weight='x' must be a finite number" in " ".join(r.stderr.split())
    assert "\n\n" not in r.stderr.strip()
    r = cli(
        "merge",
        "method=ties",
        f"base={files['base']}",
        f"models=[{files['m0']}]",
        f"out={tmp_path / 'o'}",
        "method.density=0",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "density=0 is out of range" in " ".join(r.stderr.split())
    assert "Error executing job" not in r.stderr
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_merge_leaves_nothing_behind(tmp_path, sig):
    """A merge paused by a hook while its third tensor is being computed (two are written into the temporary
    dir), then interrupted: no sleeps, no race with the merge's speed."""
    g = torch.Generator().manual_seed(0)
    names = [f"t{i}" for i in range(6)]
    base = {n: torch.randn(64, 64, generator=g) for n in names}
    save_file(base, tmp_path / "base.safetensors")
    for j in range(2):
        model = {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in base.items()}
        save_file(model, tmp_path / f"m{j}.safetensors")
    out = tmp_path / "out"
    code = """
import pathlib, sys, time
from merging import sources
real, calls = sources.MergeStreams.tensor_chunks, []
def paused(self, name, dtype):
    calls.append(name)
    if len(calls) == 3:  # tell the test where we are, then wait for its signal
        pathlib.Path("paused").write_text(name)
        while True:
            time.sleep(1)
    yield from real(self, name, dtype)
sources.MergeStreams.tensor_chunks = paused
from peft_lab.cli import main
sys.exit(main(["merge", "--config", "r.yaml", "--out", "out", "chunk_size=512", "hash=none"]))
"""
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "merge_method": "dare_ties",
                "base_model": "base.safetensors",
                "parameters": {"density": 0.5, "rescale": "l1"},
                "models": [{"model": "m0.safetensors"}, {"model": "m1.safetensors"}],
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = file_digests(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (tmp_path / "paused").exists():
        time.sleep(0.05)
    assert p.poll() is None, f"the merge ended before reaching the pause: {p.stderr.read()}"
    assert list(tmp_path.glob(".out.tmp-*")), "the merge is paused inside its temporary output dir"
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err
    assert "interrupted; nothing was left half-written" in err and "Traceback" not in err
    assert_nothing_left(out)
    assert file_digests(*[f for f in tmp_path.iterdir() if f.suffix in (".safetensors", ".yaml")]) == {
        k: v for k, v in before.items() if k.endswith((".safetensors", ".yaml"))
    }
