"""Atomic outputs (what a failure leaves, file modes) and the output guard (inputs and foreign data are never
replaced)."""

import json
import os

import pytest
import torch

from peft_lab.errors import UserError
from peft_lab.tree import Tree, atomic_output_dir, guard_output, save_tree
from peft_lab.tree.fs import MARKER, OUTPUT_KEY, atomic_file, output_kind


def _umask() -> int:  # a test runs alone: reading the umask by setting it is fine here, not in the library
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, kind="k") as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, kind="k") as tmp:
            (tmp / "a").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out, kind="k") as tmp:
        (tmp / "a").write_text("done")
    assert (out / "a").read_text() == "done" and output_kind(out) == "k"
    with pytest.raises(UserError, match="not empty"):
        with atomic_output_dir(out, kind="k"):
            pass
    with atomic_output_dir(out, kind="k", overwrite=True) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(UserError, match="not written by peft-lab as a 'other' output"):
        with atomic_output_dir(out, kind="other", overwrite=True):
            pass
    assert (out / "b").read_text() == "new"


def test_atomic_outputs_have_the_usual_permissions(tmp_path):
    with atomic_output_dir(tmp_path / "o", kind="k") as tmp:
        (tmp / "f").write_text("x")
    with atomic_file(tmp_path / "f.safetensors") as tmp:
        tmp.write_bytes(b"x")
    mask = _umask()
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_outputs_never_touch_the_umask(tmp_path, monkeypatch):
    """`os.umask` is process-wide: reading it by setting it races with other threads creating files."""

    def boom(*a):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", boom)
    with atomic_output_dir(tmp_path / "o", kind="k") as tmp:
        (tmp / "f").write_text("x")
    with atomic_file(tmp_path / "f.safetensors") as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "f.safetensors").read_bytes() == b"x"


def test_failed_second_replace_restores_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_output_dir(out, kind="k") as tmp:
        (tmp / "old").write_text("previous")
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(5, "injected I/O error")
        return real(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="injected"):
        with atomic_output_dir(out, kind="k", overwrite=True) as tmp:
            (tmp / "new").write_text("next")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------------
# guard_output
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def tree_of_dirs(tmp_path):
    (tmp_path / "runs" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "model" / "w.safetensors").write_bytes(b"weights")
    (tmp_path / "runs" / "other").mkdir()
    return tmp_path


def test_guard_refuses_every_relation_to_an_input(tree_of_dirs):
    t = tree_of_dirs
    model = t / "runs" / "model"
    for out, says in [
        (model, "is the input"),
        (model / "sub", "is inside the input"),
        (model / "w.safetensors", "is inside the input"),
        (t / "runs", "contains the input"),
        (t, "contains the input"),
    ]:
        with pytest.raises(UserError, match=says):
            guard_output(out, [None, model], kind="k", overwrite=True)
    # a dir written into, not replaced, may hold inputs
    guard_output(t / "runs", [model], kind="k", replaces=False)
    with pytest.raises(UserError, match="is the input"):
        guard_output(model, [model], kind="k", replaces=False)
    # a side file
    with pytest.raises(UserError, match=r"would also write .*w\.safetensors, which is the input"):
        guard_output(t / "new.safetensors", [model / "w.safetensors"], kind="k", side_files=[model / "w.safetensors"])
    assert guard_output(t / "runs" / "new", [model], kind="k") == (t / "runs" / "new").resolve()


def test_guard_follows_symlinks(tree_of_dirs):
    t = tree_of_dirs
    (t / "alias").symlink_to(t / "runs", target_is_directory=True)
    with pytest.raises(UserError, match=r"contains the input .*alias/model \(that is, .*runs/model\)"):
        guard_output(t / "runs", [t / "alias" / "model"], kind="k", overwrite=True)
    with pytest.raises(UserError, match="is the input"):
        guard_output(t / "alias" / "model", [t / "runs" / "model"], kind="k", overwrite=True)
    # an input dir holding links to files elsewhere (a Hugging Face cache snapshot links to its blobs)
    (t / "blobs").mkdir()
    (t / "blobs" / "abc").write_bytes(b"w")
    (t / "snap").mkdir()
    (t / "snap" / "model.safetensors").symlink_to(t / "blobs" / "abc")
    with pytest.raises(UserError, match="contains the input"):
        guard_output(t / "blobs", [t / "snap"], kind="k", overwrite=True)


def test_guard_replaces_only_marked_outputs_of_the_same_kind(tmp_path):
    out = tmp_path / "out"
    guard_output(out, [], kind="k")  # absent
    out.mkdir()
    guard_output(out, [], kind="k")  # empty
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        guard_output(out, [], kind="k")
    with pytest.raises(UserError, match=r"not written by peft-lab as a 'k' output \(it has no peft-lab output marker"):
        guard_output(out, [], kind="k", overwrite=True)
    (out / MARKER).write_text(json.dumps({"kind": "other"}))
    with pytest.raises(UserError, match="it is marked as a 'other' output"):
        guard_output(out, [], kind="k", overwrite=True)
    (out / MARKER).write_text(json.dumps({"kind": "k"}))
    guard_output(out, [], kind="k", overwrite=True)
    # files: the marker is the header metadata
    f = tmp_path / "f.safetensors"
    save_tree(Tree({"w": torch.ones(2)}), f)
    with pytest.raises(UserError, match="already exists"):
        guard_output(f, [], kind="k")
    with pytest.raises(UserError, match="not written by"):
        guard_output(f, [], kind="k", overwrite=True)
    save_tree(Tree({"w": torch.ones(2)}), f, metadata={OUTPUT_KEY: "k"})
    guard_output(f, [], kind="k", overwrite=True)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not written by"):
        guard_output(tmp_path / "junk.safetensors", [], kind="k", overwrite=True)
