"""Atomic output dirs and reading errors: what must never be swallowed or lost."""
import os

import pytest
import torch

from peft_lab.errors import UserError
from peft_lab.tree import Tree, atomic_output_dir, load_tree, save_tree


class _Fake:
    def __init__(self, exc):
        self.exc = exc

    def get_tensor(self, key):
        raise self.exc


@pytest.mark.parametrize("exc", [MemoryError(), KeyboardInterrupt()])
def test_read_lets_memory_errors_and_interrupts_through(tmp_path, monkeypatch, exc):
    import safetensors

    p = tmp_path / "w.safetensors"
    save_tree(Tree({"w": torch.ones(3)}), p)
    leaf = load_tree(p)["w"]
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: _Fake(exc))
    with pytest.raises(type(exc)):
        leaf.dense()


def test_atomic_output_dir_never_touches_the_umask(tmp_path, monkeypatch):
    def boom(*a):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", boom)
    with atomic_output_dir(tmp_path / "o") as tmp:
        (tmp / "f").write_text("x")


def test_failed_second_replace_restores_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "old").write_text("previous")
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(5, "injected I/O error")
        return real(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="injected"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new").write_text("next")
    assert sorted(p.name for p in out.iterdir()) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
