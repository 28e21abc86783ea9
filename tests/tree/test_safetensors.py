"""The safetensors layer: header validation, the one reader (chunks, whole tensors, errors, bounded resources)."""

import os
import struct

import pytest
import torch

import peft_lab.tree.safetensors as st
from peft_lab.errors import UserError
from peft_lab.tree import Tree, load_tree, read_header, save_tree
from peft_lab.tree.safetensors import TensorReader

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool]


def _tensor(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10
    return (x > 0) if dtype == torch.bool else x.to(dtype)


def test_corrupt_and_truncated_files_are_named(tmp_path):
    good = tmp_path / "g.safetensors"
    save_tree(Tree({"w": torch.randn(64, 64)}), good)
    raw = good.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_tree(tmp_path / "t.safetensors")
    (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"x" * 10)
    with pytest.raises(UserError, match="corrupt"):
        load_tree(tmp_path / "c.safetensors")
    (tmp_path / "e.safetensors").write_bytes(b"abc")
    with pytest.raises(UserError, match="not a safetensors"):
        load_tree(tmp_path / "e.safetensors")
    with pytest.raises(UserError, match="no such file"):
        load_tree(tmp_path / "missing")
    with pytest.raises(UserError, match="no such file"):
        read_header(tmp_path / "missing.safetensors")
    bad = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}'  # 2 floats in 4 bytes
    (tmp_path / "o.safetensors").write_bytes(struct.pack("<Q", len(bad)) + bad + b"\0" * 8)
    with pytest.raises(UserError, match="corrupt safetensors entry for tensor 'w'"):
        read_header(tmp_path / "o.safetensors")


def test_file_rewritten_at_same_path_is_read_afresh(tmp_path):
    p = tmp_path / "w.safetensors"
    save_tree(Tree({"w": torch.zeros(4)}), p)
    old = load_tree(p)["w"]
    assert torch.equal(old.dense(), torch.zeros(4))
    # same path, new layout: read through the new header, never the old file's offsets
    save_tree(Tree({"a": torch.full((3,), 2.0), "w": torch.ones(4)}), p)
    assert torch.equal(load_tree(p)["w"].dense(), torch.ones(4))
    # a leaf opened on the old file whose tensor changed dtype: named, not misread
    save_tree(Tree({"w": torch.ones(4, dtype=torch.float16)}), p)
    with pytest.raises(UserError, match="rewritten"):
        old.dense()


@pytest.mark.parametrize("dtype", DTYPES)
def test_reader_slices_and_whole_tensors_match(tmp_path, dtype):
    tensors = {
        "a": _tensor(dtype, (7, 13), 1),
        "b": _tensor(dtype, (5,), 2),
        "e": _tensor(dtype, (0, 3), 3),
        "s": _tensor(dtype, (), 4),
    }
    save_tree(Tree(tensors), tmp_path / "m.safetensors")
    tree = load_tree(tmp_path / "m.safetensors")
    reader = TensorReader()
    try:
        for k, t in tensors.items():
            assert torch.equal(tree[k].dense(None), t) and tree[k].dense(None).dtype == dtype
            assert torch.equal(reader.read_tensor(tmp_path / "m.safetensors", k), t)
            flat = t.reshape(-1)
            for s, e in [(0, flat.numel()), (0, min(3, flat.numel())), (flat.numel() // 2, flat.numel())]:
                assert torch.equal(reader.read(tree[k], s, e), flat[s:e].float())
                assert torch.equal(reader.read((str(tmp_path / "m.safetensors"), k, dtype), s, e), flat[s:e].float())
                raw = torch.empty((e - s) * dtype.itemsize, dtype=torch.uint8)
                reader.read_into(tree[k], s, e, raw.numpy())
                assert torch.equal(raw.view(dtype), flat[s:e])
        with pytest.raises(ValueError):
            reader.read(tree["a"], 0, 7 * 13 + 1)
        with pytest.raises(ValueError):
            reader.read_into(tree["a"], 0, 2, torch.empty(3, dtype=torch.uint8).numpy())
    finally:
        reader.close()


@pytest.mark.parametrize("exc", [MemoryError(), KeyboardInterrupt()])
def test_read_lets_memory_errors_and_interrupts_through(tmp_path, monkeypatch, exc):
    p = tmp_path / "w.safetensors"
    save_tree(Tree({"w": torch.ones(3)}), p)
    leaf = load_tree(p)["w"]

    def fail(*a):
        raise exc

    monkeypatch.setattr(st, "_read_at", fail)
    with pytest.raises(type(exc)):
        leaf.dense()
    with pytest.raises(type(exc)):
        TensorReader().read(leaf, 0, 3)


def test_io_errors_and_files_truncated_after_opening_are_named(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    save_tree(Tree({"w": torch.ones(1000), "v": torch.ones(10)}), p)
    leaf = load_tree(p)["w"]
    reader = TensorReader()
    assert torch.equal(reader.read(leaf, 0, 10), torch.ones(10))  # opened: header parsed, descriptor kept
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 3000)
    with pytest.raises(UserError, match=r"w\.safetensors: the file ended while reading tensor w"):
        reader.read(leaf, 0, 1000)
    reader.close()

    def eio(*a):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(st, "_read_at", eio)
    save_tree(Tree({"w": torch.ones(3)}), p)
    with pytest.raises(UserError, match=r"cannot read tensor 'w' \(Input/output error\)"):
        load_tree(p)["w"].dense()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_reading_leaves_no_memory_map_and_bounded_descriptors(tmp_path):
    """Whole-tensor reads go into fresh buffers (no file stays mapped) and the shared reader keeps at most 32
    files open however many are read."""
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"f{i}.safetensors")
        save_tree(Tree({"w": torch.full((256,), float(i))}), paths[-1])
    for i, p in enumerate(paths):
        assert float(load_tree(p)["w"].dense()[0]) == i
    maps = open("/proc/self/maps").read()
    assert str(tmp_path) not in maps
    fds = [
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    ]
    open_here = [f for f in fds if f.startswith(str(tmp_path))]
    assert 0 < len(open_here) <= 32
