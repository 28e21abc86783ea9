"""The parameter tree: leaves, lazy ops, checks, safetensors/HF/PEFT I/O, atomic output."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_lab.errors import UserError
from peft_lab.tree import (
    LDU,
    Dense,
    Kronecker,
    Lazy,
    LowRank,
    Sparse,
    Tree,
    apply,
    apply_to_module,
    atomic_output_dir,
    check_compatible,
    delta,
    exclude,
    load_tree,
    materialize,
    save_tree,
    select,
    tree_map,
    zip_map,
)
from peft_lab.tree.io import read_header

dims = st.integers(1, 9)


def _random_leaves(out, inp, r, seed):
    g = torch.Generator().manual_seed(seed)
    nnz = max(1, (out * inp) // 3)
    idx = torch.randperm(out * inp, generator=g)[:nnz].sort().values.to(torch.int32)
    o1 = next(d for d in (2, 3, 1) if out % d == 0)
    i1 = next(d for d in (2, 3, 1) if inp % d == 0)
    perm = torch.randperm(out, generator=g)
    k = min(out, inp, r)
    return {
        "low_rank": LowRank(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g), 0.7),
        "kronecker": Kronecker(torch.randn(o1, i1, generator=g), torch.randn(out // o1, inp // i1, generator=g), 1.3),
        "sparse": Sparse(idx, torch.randn(nnz, generator=g), (out, inp)),
        "ldu": LDU(perm, torch.randn(out, k, generator=g), torch.randn(k, generator=g), torch.randn(k, inp, generator=g), 0.5),
        "dense": Dense(torch.randn(out, inp, generator=g)),
    }


def _reference(leaf):
    """Dense value of each structured leaf from its definition, independently of the implementation."""
    if isinstance(leaf, LowRank):
        return leaf.scale * leaf.B @ leaf.A
    if isinstance(leaf, Kronecker):
        A, B = leaf.A, leaf.B
        out = torch.zeros(leaf.shape)
        for p in range(A.shape[0]):
            for j in range(A.shape[1]):
                out[p * B.shape[0] : (p + 1) * B.shape[0], j * B.shape[1] : (j + 1) * B.shape[1]] = A[p, j] * B
        return leaf.scale * out
    if isinstance(leaf, Sparse):
        out = torch.zeros(leaf.shape)
        for i, v in zip(leaf.indices.tolist(), leaf.values.tolist(), strict=True):
            out[i // leaf.shape[1], i % leaf.shape[1]] = v
        return out
    if isinstance(leaf, LDU):
        P = torch.eye(leaf.shape[0])[leaf.perm]  # (P @ M) == M[perm]
        return leaf.scale * P @ leaf.L @ torch.diag(leaf.d) @ leaf.U
    return leaf.tensor


@settings(max_examples=25, deadline=None)
@given(out=dims, inp=dims, r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_structured_leaves_match_their_definition(out, inp, r, seed):
    for kind, leaf in _random_leaves(out, inp, r, seed).items():
        ref = _reference(leaf)
        assert leaf.shape == (out, inp), kind
        torch.testing.assert_close(leaf.dense(), ref, rtol=1e-5, atol=1e-5, msg=kind)
        w = torch.randn(out, inp)
        w0 = w.clone()
        leaf.add_to(w, alpha=-0.5)
        torch.testing.assert_close(w, w0 - 0.5 * ref, rtol=1e-5, atol=1e-5, msg=kind)
        assert leaf.nbytes > 0


def test_add_to_half_precision_computes_in_float32():
    leaf = Sparse(torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1e-3, -2e-3]), (2, 2))
    w = torch.ones(2, 2, dtype=torch.bfloat16)
    leaf.add_to(w)
    expect = (torch.ones(2, 2) + leaf.dense()).to(torch.bfloat16)
    assert torch.equal(w, expect)


def test_kronecker_matvec_and_conv_shapes():
    A, B = torch.randn(3, 2), torch.randn(4, 5)
    k = Kronecker(A, B, 0.5)
    x = torch.randn(7, 10)
    torch.testing.assert_close(k.matvec(x), x @ k.dense().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.dense(), 0.5 * torch.kron(A, B))
    conv = Kronecker(torch.randn(2, 3), torch.randn(4, 5, 3, 3))
    assert conv.shape == (8, 15, 3, 3)
    flat = Kronecker(conv.A, conv.B.reshape(4, -1), shape=(8, 15, 3, 3))
    torch.testing.assert_close(conv.dense(), flat.dense())


def test_structured_round_trip_through_safetensors(tmp_path):
    leaves = _random_leaves(6, 4, 2, seed=1)
    tree = Tree({f"layer.{k}.weight": v for k, v in leaves.items()})
    save_tree(tree, tmp_path / "d.safetensors", metadata={"note": "x"})
    back = load_tree(tmp_path / "d.safetensors")
    assert list(back) == list(tree)
    for name in tree:
        assert type(back[name]).__name__ in (type(tree[name]).__name__, "Lazy")
        assert torch.equal(back[name].dense(), tree[name].dense()), name
    assert back.meta["note"] == "x"
    assert back["layer.sparse.weight"].indices.dtype == torch.int32


def test_sharded_dir_loads_in_transformers(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    model = BertModel(cfg)
    cfg.save_pretrained(tmp_path / "m")
    tree = Tree.from_module(model)
    files = save_tree(tree, tmp_path / "m", max_shard_size="8KB", metadata={"k": "v"})
    assert len(files) > 1
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = AutoModel.from_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # and our own lazy reader sees the same tensors in the same order
    lazy = load_tree(tmp_path / "m")
    assert list(lazy) == list(tree)
    assert all(isinstance(leaf, Lazy) for leaf in lazy.values())


def test_dtype_cast_on_save_keeps_int_buffers(tmp_path):
    tree = Tree({"w": torch.randn(3, 3), "ids": torch.arange(5)})
    save_tree(tree, tmp_path / "x.safetensors", dtype=torch.bfloat16)
    header, meta = read_header(tmp_path / "x.safetensors")
    assert header["w"]["dtype"] == "BF16" and header["ids"]["dtype"] == "I64"
    assert meta["format"] == "pt"


def test_ops_are_lazy_and_correct(tmp_path):
    base = Tree({"a": torch.ones(2, 2), "b": torch.zeros(3), "ids": torch.arange(3)})
    ft = Tree({"a": torch.full((2, 2), 3.0), "b": torch.ones(3), "ids": torch.arange(3)})
    d = delta(ft, base)
    assert set(d) == {"a", "b"}  # int buffers are not deltas
    assert torch.equal(d["a"].dense(), torch.full((2, 2), 2.0))
    back = materialize(apply(base, d, 0.5))
    assert torch.equal(back["a"].dense(), torch.full((2, 2), 2.0))
    assert torch.equal(base["a"].dense(), torch.ones(2, 2)), "apply must not modify its input"
    assert torch.equal(back["ids"].dense(None), torch.arange(3))
    doubled = tree_map(lambda t: 2 * t, base)
    assert torch.equal(doubled["a"].dense(), 2 * torch.ones(2, 2))
    s = zip_map(lambda x, y: x + y, base, ft)
    assert torch.equal(s["b"].dense(), torch.ones(3))
    # laziness: building deltas over files that do not exist reads nothing
    ghost = Tree({"a": Lazy("/nonexistent.safetensors", "a", torch.float32, (2, 2))})
    lazy_delta = delta(ghost, base)
    assert lazy_delta["a"].shape == (2, 2)


def test_select_exclude_patterns():
    t = Tree({n: torch.zeros(1) for n in ["enc.0.q.weight", "enc.0.q.bias", "enc.1.v.weight", "head.weight"]})
    assert list(select(t, "*.weight")) == ["enc.0.q.weight", "enc.1.v.weight", "head.weight"]
    assert list(select(t, "q.weight")) == ["enc.0.q.weight"]  # dotted suffix
    assert list(select(t, r"re:enc\.\d\.v")) == ["enc.1.v.weight"]
    assert list(exclude(t, ["head.*", "*.bias"])) == ["enc.0.q.weight", "enc.1.v.weight"]


def test_check_reports_every_mismatch_at_once():
    ref = Tree({"a": torch.zeros(2, 2), "b": torch.zeros(3), "c": torch.zeros(1)}, source="base")
    bad = Tree({"a": torch.zeros(2, 3), "c": torch.zeros(1), "z": torch.zeros(1)}, source="m1")
    with pytest.raises(UserError) as e:
        check_compatible(ref, {"m1": bad})
    msg = str(e.value)
    assert "tensor a has shape (2, 3)" in msg and "missing: b" in msg and "not in base: z" in msg
    check_compatible(ref, {"sub": Tree({"a": torch.zeros(2, 2)})}, allow_subset=True)


def test_apply_to_module_structured():
    lin = torch.nn.Linear(4, 3)
    w0 = lin.weight.detach().clone()
    d = Tree({"weight": Sparse(torch.tensor([0, 5]), torch.tensor([1.0, 2.0]), (3, 4))})
    apply_to_module(lin, d, 2.0)
    assert lin.weight[0, 0] == w0[0, 0] + 2 and lin.weight[1, 1] == w0[1, 1] + 4
    apply_to_module(lin, d, -2.0)
    torch.testing.assert_close(lin.weight.detach(), w0)


@pytest.fixture
def tiny_bert_dir(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base", model


@pytest.mark.parametrize("kind", ["lora", "lora_rs", "lokr"])
def test_peft_dirs_open_as_deltas_matching_peft_merge(tiny_bert_dir, tmp_path, kind):
    from peft import LoKrConfig, LoraConfig, get_peft_model

    base_dir, model = tiny_bert_dir
    if kind == "lokr":
        cfg = LoKrConfig(r=2, alpha=4, target_modules=["query", "intermediate.dense"], init_weights=False)
    else:
        cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"], modules_to_save=["classifier"],
                         init_lora_weights=False, use_rslora=kind == "lora_rs", rank_pattern={"value": 3})
    pm = get_peft_model(model, cfg)
    if kind != "lokr":
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    pm.save_pretrained(tmp_path / "ad")
    base = load_tree(base_dir)
    d = load_tree(tmp_path / "ad", base=base)
    merged = pm.merge_and_unload().state_dict()
    assert d, "no deltas"
    for name, leaf in d.items():
        torch.testing.assert_close(leaf.dense(), merged[name] - base[name].dense(), rtol=1e-5, atol=1e-6, msg=name)
    if kind != "lokr":
        assert "classifier.weight" in d


def test_peft_dir_needs_matching_base(tiny_bert_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir, model = tiny_bert_dir
    get_peft_model(model, LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "ad")
    other = Tree({"encoder.x.weight": torch.zeros(2, 2)}, source="other")
    with pytest.raises(UserError, match="does not have"):
        load_tree(tmp_path / "ad", base=other)


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


def test_pickle_refused_unless_allowed(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle") as e:
        load_tree(tmp_path)
    assert "safetensors" in str(e.value) and "allow_pickle" in str(e.value)
    with pytest.raises(UserError, match="pickle"):
        load_tree(tmp_path / "pytorch_model.bin")
    t = load_tree(tmp_path, allow_pickle=True)
    assert torch.equal(t["w"].dense(), torch.ones(2))


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("done")
    assert (out / "a").read_text() == "done"
    with pytest.raises(UserError, match="not empty"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_own_adapter_dir_opens_as_delta_tree(tmp_path):
    from peft_lab.tree import is_delta
    from peft_lab.tree.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TREE_KIND_KEY

    d = tmp_path / "ad"
    d.mkdir()
    (d / ADAPTER_CONFIG).write_text('{"adapter": "sparse"}')
    delta_tree = Tree({"encoder.w": Sparse(torch.tensor([1, 2]), torch.tensor([0.5, -1.0]), (2, 2))})
    save_tree(delta_tree, d / ADAPTER_WEIGHTS, metadata={TREE_KIND_KEY: "delta"})
    base = Tree({"bert.encoder.w": torch.zeros(2, 2)})
    t = load_tree(d, base=base)
    assert is_delta(t) and list(t) == ["bert.encoder.w"]
    assert torch.equal(t["bert.encoder.w"].dense(), torch.tensor([[0.0, 0.5], [-1.0, 0.0]]))
    assert not is_delta(base)
    with pytest.raises(UserError, match="do not fit"):
        load_tree(d, base=Tree({"encoder.w": torch.zeros(3, 2)}))


def test_save_tree_streams_chunked_leaves(tmp_path):
    """A leaf exposing `chunks(dtype)` is written slice by slice and reads back as the whole tensor."""
    from peft_lab.tree import Thunk

    full = torch.randn(5, 7)

    class Chunked(Thunk):
        def chunks(self, dtype):
            flat = full.reshape(-1).to(dtype)
            return (flat[i : i + 4] for i in range(0, flat.numel(), 4))

    leaf = Chunked(lambda: full, [], full.shape, torch.float32, name="w")
    save_tree(Tree({"w": leaf, "b": torch.ones(3)}), tmp_path / "m.safetensors", dtype=torch.bfloat16)
    back = load_tree(tmp_path / "m.safetensors")
    assert torch.equal(back["w"].dense(None), full.to(torch.bfloat16))

    class Short(Thunk):
        def chunks(self, dtype):
            return iter([full.reshape(-1)[:10].to(dtype)])

    with pytest.raises(RuntimeError, match="declared"):
        save_tree(Tree({"w": Short(lambda: full, [], full.shape, torch.float32)}), tmp_path / "bad.safetensors")


def test_file_rewritten_at_same_path_is_read_afresh(tmp_path):
    p = tmp_path / "w.safetensors"
    save_tree(Tree({"w": torch.zeros(4)}), p)
    assert torch.equal(load_tree(p)["w"].dense(), torch.zeros(4))
    # same path, new layout: read through the new header, never the old file's memory map
    save_tree(Tree({"a": torch.full((3,), 2.0), "w": torch.ones(4)}), p)
    assert torch.equal(load_tree(p)["w"].dense(), torch.ones(4))


def test_atomic_output_dir_has_the_usual_permissions(tmp_path):
    import os

    with atomic_output_dir(tmp_path / "o") as tmp:
        (tmp / "f").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~mask
