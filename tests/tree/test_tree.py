"""The parameter tree: leaves, lazy ops, checks, and structured leaves through safetensors."""

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
        "ldu": LDU(
            perm, torch.randn(out, k, generator=g), torch.randn(k, generator=g), torch.randn(k, inp, generator=g), 0.5
        ),
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
