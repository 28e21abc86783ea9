"""Robust Weight Signatures: extract, quantize, compose, patch and unpatch (property tests on small trees)."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging.signatures.patch import PATCHES_KEY, patch, read_record, unpatch
from merging.signatures.signature import (
    LayerSelection,
    apply_signatures,
    extract,
    load_signatures,
    resolve_signature,
    save_signatures,
    weight_layers,
)
from peft_lab.errors import UserError
from peft_lab.tree import Tree, load_tree, save_tree
from peft_lab.tree.quantized import error_bound

HALF = (torch.bfloat16, torch.float16)


def _model(seed: int, dtype=torch.float32) -> Tree:
    """conv -> bn -> fc: two weight layers, so the default (shallow half) keeps conv and bn."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    t = {
        "conv.weight": r(4, 2, 3, 3),
        "conv.bias": r(4),
        "bn.weight": 1 + 0.1 * r(4),
        "bn.bias": r(4),
        "bn.running_mean": r(4),
        "bn.running_var": r(4).abs() + 0.5,
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": r(5, 36),
        "fc.bias": r(5),
    }
    return Tree({k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}, source=f"model{seed}")


def _robust(clean: Tree, seed: int, size: float = 0.05) -> Tree:
    g = torch.Generator().manual_seed(seed + 1000)
    out = {}
    for k, leaf in clean.items():
        v = leaf.dense(None)
        if not v.is_floating_point():
            out[k] = v + 3
        elif k.endswith("running_var"):
            out[k] = (v.float() * torch.exp(size * torch.randn(v.shape, generator=g))).to(v.dtype)
        else:
            out[k] = (v.float() + size * torch.randn(v.shape, generator=g)).to(v.dtype)
    return Tree(out, source=f"robust{seed}")


def _mant(dtype):
    return {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]


def _spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    e = torch.floor(torch.log2(x.float().abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(e - _mant(dtype))


def _sigs(seed: int, n: int, dtype, bits=32):
    clean = _model(seed, dtype)
    return clean, [extract(clean, _robust(clean, seed + i), bits=bits, name=f"s{i}") for i in range(n)]


def _save_model(tree: Tree, d: Path) -> Path:
    save_tree(tree, d / "model.safetensors")
    (d / "config.json").write_text('{"model_type": "toy"}')
    return d


def _tensors(path) -> dict[str, torch.Tensor]:
    return {k: v.dense(None) for k, v in load_tree(path).items()}


def _bitwise(a: dict, b: dict) -> bool:
    """Same names, dtypes and bytes (so -0.0 != 0.0, unlike torch.equal)."""

    def raw(t):
        return t.reshape(-1).view(torch.uint8)

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(raw(a[k]), raw(b[k])) for k in a)


# ---------------------------------------------------------------------------------------------------------
# Round trips (acceptance)
# ---------------------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, *HALF]),
    scales=st.lists(st.floats(-2, 2, allow_nan=False), min_size=3, max_size=3),
    bits=st.sampled_from([32, 16, 8, 4]),
)
def test_patch_then_unpatch_is_identity_bitwise(seed, n, dtype, scales, bits):
    clean, sigs = _sigs(seed, n, dtype, bits)
    pairs = list(zip(sigs, scales[:n], strict=True))
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        m = _save_model(clean, td / "m")
        patch(m, pairs, td / "p")
        res = unpatch(td / "p", pairs[::-1], td / "u")  # given in another order: still the same step
        assert res.how == "restored"
        assert _bitwise(_tensors(td / "u" / "model.safetensors"), _tensors(m / "model.safetensors"))
        assert (td / "u" / "config.json").read_text() == '{"model_type": "toy"}'
        assert not (td / "u" / "rws_restore.safetensors").exists()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, *HALF]), scale=st.floats(-2, 2))
def test_subtracting_is_within_one_rounding_step(seed, dtype, scale):
    """Without copies (another tool's model, --force), unpatch subtracts: within one step of the dtype's spacing."""
    clean, (sig,) = _sigs(seed, 1, dtype)
    patched = apply_signatures(clean, [(sig, scale)])
    back = apply_signatures(patched, [(sig, scale)], sign=-1.0)
    for k in sig.tree:
        w, p, u = clean[k].dense(None).float(), patched[k].dense(None).float(), back[k].dense(None).float()
        step = torch.maximum(_spacing(w, dtype), _spacing(p, dtype))
        slack = 8 * torch.finfo(torch.float32).eps * w.abs()  # exp/log of log-ratio tensors, in float32
        assert ((u - w).abs() <= step + slack).all(), k


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, *HALF]))
def test_extract_then_patch_at_one_reproduces_robust_on_kept_layers(seed, dtype):
    clean = _model(seed, dtype)
    robust = _robust(clean, seed)
    sig = extract(clean, robust)
    assert sig.record["layers"] == ["conv", "bn"]
    assert "bn.num_batches_tracked" not in sig.tree  # a counter, not a parameter
    patched = apply_signatures(clean, [(sig, 1.0)])
    for k, leaf in clean.items():
        got = patched[k].dense(None)
        if k in sig.tree:
            r = robust[k].dense(None).float()
            assert (
                (got.float() - r).abs() <= _spacing(r, dtype) + 8 * torch.finfo(torch.float32).eps * r.abs()
            ).all(), k
        else:
            assert torch.equal(got, leaf.dense(None)), f"{k} is not kept and must not change"
    # scale 0 changes nothing, bit for bit
    zero = apply_signatures(clean, [(sig, 0.0)])
    assert all(torch.equal(zero[k].dense(None), clean[k].dense(None)) for k in clean)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    perm=st.permutations([0, 1, 2]),
    scales=st.lists(st.floats(-1.5, 1.5, allow_nan=False), min_size=3, max_size=3),
)
def test_composition_is_order_independent_and_linear(seed, perm, scales):
    clean, sigs = _sigs(seed, 3, torch.float32)
    pairs = list(zip(sigs, scales, strict=True))
    a = apply_signatures(clean, pairs)
    b = apply_signatures(clean, [pairs[i] for i in perm])
    for k in clean:
        assert torch.equal(a[k].dense(None), b[k].dense(None)), k
    # = the sum of the scaled signatures (additive tensors) / product of ratios (running_var)
    for k in sigs[0].tree:
        total = sum(s * sig.tree[k].dense().double() for sig, s in pairs)
        w = clean[k].dense().double()
        expect = w * torch.exp(total) if k.endswith("running_var") else w + total
        torch.testing.assert_close(a[k].dense().double(), expect, rtol=1e-6, atol=1e-6)


def test_patch_stack_restores_bitwise_in_reverse_order(tmp_path):
    clean, (s0, s1) = _sigs(3, 2, torch.bfloat16)
    m = _save_model(clean, tmp_path / "m")
    patch(m, [(s0, 0.5)], tmp_path / "p1")
    patch(tmp_path / "p1", [(s1, 1.5)], tmp_path / "p2")
    steps = read_record(load_tree(tmp_path / "p2"))["steps"]
    assert [[e["name"] for e in st["signatures"]] for st in steps] == [["s0"], ["s1"]]
    assert unpatch(tmp_path / "p2", [(s1, 1.5)], tmp_path / "u1").how == "restored"
    assert _bitwise(_tensors(tmp_path / "u1"), _tensors(tmp_path / "p1"))
    assert unpatch(tmp_path / "u1", [(s0, 0.5)], tmp_path / "u0").how == "restored"
    assert _bitwise(_tensors(tmp_path / "u0"), _tensors(m))
    # sequential patching equals one composed patch within rounding
    patch(m, [(s1, 1.5), (s0, 0.5)], tmp_path / "both")
    for k, v in _tensors(tmp_path / "both").items():
        torch.testing.assert_close(v.float(), _tensors(tmp_path / "p2")[k].float(), rtol=2**-7, atol=1e-6)


def test_out_of_order_and_partial_unpatch(tmp_path):
    clean, (s0, s1) = _sigs(4, 2, torch.float32)
    m = _save_model(clean, tmp_path / "m")
    patch(m, [(s0, 1.0), (s1, 1.0)], tmp_path / "p")
    # part of the last step: subtracted; the rest stays patched and its later removal is bitwise
    res = unpatch(tmp_path / "p", [(s0, 1.0)], tmp_path / "u0")
    assert res.how == "subtracted" and "part of the last patch step" in res.notes[0]
    only1 = apply_signatures(clean, [(s1, 1.0)])
    for k, v in _tensors(tmp_path / "u0").items():
        torch.testing.assert_close(v, only1[k].dense(None), rtol=1e-6, atol=1e-6)
    assert unpatch(tmp_path / "u0", [(s1, 1.0)], tmp_path / "u").how == "restored"
    assert _bitwise(_tensors(tmp_path / "u"), _tensors(m))
    # out of patch order: the lower step is subtracted, the upper one loses its copies
    patch(m, [(s0, 1.0)], tmp_path / "q1")
    patch(tmp_path / "q1", [(s1, 1.0)], tmp_path / "q2")
    res = unpatch(tmp_path / "q2", [(s0, 1.0)], tmp_path / "q3")
    assert res.how == "subtracted" and "out of patch order" in res.notes[0]
    assert [st["restore"] for st in read_record(load_tree(tmp_path / "q3"))["steps"]] == [False]


def test_single_file_model_keeps_copies_beside_it(tmp_path):
    clean, (sig,) = _sigs(5, 1, torch.float16)
    save_tree(clean, tmp_path / "m.safetensors")
    patch(tmp_path / "m.safetensors", [(sig, 0.7)], tmp_path / "p.safetensors")
    assert (tmp_path / "p.rws_restore.safetensors").exists()
    unpatch(tmp_path / "p.safetensors", [(sig, 0.7)], tmp_path / "u.safetensors")
    assert _bitwise(_tensors(tmp_path / "u.safetensors"), _tensors(tmp_path / "m.safetensors"))
    assert not (tmp_path / "u.rws_restore.safetensors").exists()
    with pytest.raises(UserError, match="must be one too"):
        patch(tmp_path / "m.safetensors", [(sig, 1.0)], tmp_path / "dir_out")


# ---------------------------------------------------------------------------------------------------------
# Quantized signatures, projection, layer selection, files and banks
# ---------------------------------------------------------------------------------------------------------
def test_quantized_signatures_size_and_error(tmp_path):
    """On a model whose layers have fan-in >= 36: int8 >= 1.8x and int4 >= 3.2x smaller than 16-bit, and the
    patched model is within the stated bound of the float32 patch."""
    g = torch.Generator().manual_seed(0)
    clean = Tree(
        {
            "l0.weight": torch.randn(256, 256, generator=g),
            "l0.bias": torch.randn(256, generator=g),
            "l1.weight": torch.randn(32, 8, 3, 3, generator=g),
            "l2.weight": torch.randn(10, 32, generator=g),
        }
    )
    robust = _robust(clean, 1)
    full = extract(clean, robust, layers="all")
    sizes, files = {}, {}
    for bits in (16, 8, 4):
        sig = extract(clean, robust, layers="all", bits=bits, name=f"b{bits}")
        path = save_signatures([sig], tmp_path / f"b{bits}.safetensors")
        sizes[bits], files[bits] = sig.nbytes, path.stat().st_size
        p = apply_signatures(clean, [(sig, 1.0)])
        for k in clean:
            exact = robust[k].dense() - clean[k].dense()
            err = (p[k].dense() - clean[k].dense() - exact).abs()
            if bits == 16:
                bound = exact.abs() * 2**-11 + 2**-24
            else:
                bound = error_bound(full.tree[k].dense(), bits)
            assert (err <= bound * (1 + 1e-4) + 1e-6).all(), (bits, k)
    assert sizes[16] / sizes[8] >= 1.8 and sizes[16] / sizes[4] >= 3.2, sizes  # stored tensors
    assert files[16] / files[8] >= 1.8 and files[16] / files[4] >= 3.2, files  # whole files, header included


def test_projection_is_orthogonal_to_the_clean_change():
    pre = _model(0)
    clean, robust = _robust(pre, 1), _robust(pre, 2)
    sig = extract(clean, robust, pretrained=pre, layers="all")
    assert sig.record["mode"] == "projection" and "pretrained" in sig.record["sources"]
    for k in sig.tree:
        a = clean[k].dense().double() - pre[k].dense().double()
        if k.endswith("running_var"):
            a = torch.log(clean[k].dense().double()) - torch.log(pre[k].dense().double())
        v = sig.tree[k].dense().double()
        assert abs(float((v * a).sum())) <= 1e-5 * float(v.norm() * a.norm()), k
    # with θ_pre = θ_clean there is nothing to project out: the projection is the difference
    same = extract(clean, robust, pretrained=clean, layers="all")
    diff = extract(clean, robust, layers="all")
    for k in diff.tree:
        torch.testing.assert_close(same.tree[k].dense(), diff.tree[k].dense(), rtol=1e-6, atol=1e-7)


def test_layer_selection_rules():
    clean = _model(0)
    robust = _robust(clean, 0)
    assert weight_layers(clean) == ["conv", "fc"]
    assert extract(clean, robust, layers=1).record["layers"] == ["conv", "bn"]
    assert extract(clean, robust, layers=2).record["layers"] == ["conv", "bn", "fc"]
    assert extract(clean, robust, layers="fc").record["keys"] == ["fc.weight", "fc.bias"]
    assert extract(clean, robust, layers="bn.*,re:^conv\\.").record["layers"] == ["conv", "bn"]
    assert extract(clean, robust, layers="all", stats=False).record["keys"] == [
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "fc.weight",
        "fc.bias",
    ]
    # relative change: make fc change a lot, the rest barely
    big = Tree(
        {
            k: (v.dense(None) * (3.0 if k.startswith("fc") else 1.0)) if v.dtype.is_floating_point else v.dense(None)
            for k, v in clean.items()
        }
    )
    assert extract(clean, big, layers="rel:0.5").record["layers"] == ["fc"]
    for bad, msg in (
        (3, "only 2 weight layers"),
        ("nomatch*", "no tensor"),
        ("rel:5", "no module changed"),
        (0, "at least 1"),
        ("rel:x", "needs a number"),
    ):
        with pytest.raises(UserError, match=msg):
            extract(clean, big, layers=bad)
    assert LayerSelection.parse(None).describe() == "shallow-half"


def test_bank_file_and_folder(tmp_path):
    clean, (a, b) = _sigs(1, 2, torch.float32)
    bank = save_signatures([a, b], tmp_path / "bank.safetensors")
    got = load_signatures(bank)
    assert [s.name for s in got] == ["s0", "s1"] and [s.hash for s in got] == [a.hash, b.hash]
    assert resolve_signature(f"{bank}::s1").hash == b.hash
    with pytest.raises(UserError, match="holds 2 signatures"):
        resolve_signature(bank)
    with pytest.raises(UserError, match="no signature"):
        resolve_signature(f"{bank}::zz")
    with pytest.raises(UserError, match="distinct names"):
        save_signatures([a, a], tmp_path / "dup.safetensors")
    folder = tmp_path / "sigs"
    save_signatures([a], folder / "a.safetensors")
    save_signatures([b], folder / "b.safetensors")
    assert [s.name for s in load_signatures(folder)] == ["s0", "s1"]
    # a single signature file is a plain delta tree keyed by parameter names
    t = load_tree(folder / "a.safetensors")
    assert list(t) == list(a.tree) and t.meta["peft_lab.tree_kind"] == "delta"
    meta = json.loads(t.meta["peft_lab.signatures"])["s0"]
    assert {"format", "sources", "layers", "keys", "bits", "scheme", "hash"} <= set(meta)
    assert meta["sources"]["clean"]["hash"] != meta["sources"]["robust"]["hash"]


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written, inputs untouched
# ---------------------------------------------------------------------------------------------------------
def test_different_architectures_are_listed():
    clean = _model(0)
    other = Tree(
        {
            **{k: v for k, v in clean.items() if k != "fc.bias"},
            "fc.weight": torch.zeros(6, 36),
            "extra.weight": torch.zeros(2, 2),
        },
        source="other",
    )
    with pytest.raises(UserError) as e:
        extract(clean, other)
    msg = str(e.value)
    assert "fc.weight has shape (6, 36)" in msg and "fc.bias" in msg and "extra.weight" in msg


def test_signature_that_does_not_fit_names_tensors(tmp_path):
    clean, (sig,) = _sigs(0, 1, torch.float32)
    other = Tree({**{k: v for k, v in clean.items() if k != "bn.bias"}, "conv.weight": torch.zeros(8, 2, 3, 3)})
    m = _save_model(other, tmp_path / "m")
    with pytest.raises(UserError) as e:
        patch(m, [(sig, 1.0)], tmp_path / "p")
    assert "conv.weight is (4, 2, 3, 3) in the signature, (8, 2, 3, 3) in the model" in str(e.value)
    assert "bn.bias is not in the model" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "nothing half-written"


def test_unpatch_of_what_was_never_patched(tmp_path):
    clean, (s0, s1) = _sigs(0, 2, torch.float32)
    m = _save_model(clean, tmp_path / "m")
    # no record at all: undetectable in general, so refused unless --force
    with pytest.raises(UserError, match="no record.*--force"):
        unpatch(m, [(s0, 1.0)], tmp_path / "x")
    forced = unpatch(m, [(s0, 1.0)], tmp_path / "forced", force=True)
    assert forced.how == "subtracted"
    patch(m, [(s0, 0.5)], tmp_path / "p")
    with pytest.raises(UserError, match="never patched.*lists s0"):
        unpatch(tmp_path / "p", [(s1, 1.0)], tmp_path / "x")
    with pytest.raises(UserError, match="at scale 0.5, not 1.*--scale 0.5"):
        unpatch(tmp_path / "p", [(s0, 1.0)], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_edited_patched_model_is_subtracted_not_overwritten(tmp_path):
    clean, (sig,) = _sigs(0, 1, torch.float32)
    m = _save_model(clean, tmp_path / "m")
    patch(m, [(sig, 1.0)], tmp_path / "p")
    t = load_tree(tmp_path / "p")
    edited = {k: v.dense(None) for k, v in t.items()}
    edited["conv.bias"] = edited["conv.bias"] + 1.0  # a change made after patching, metadata kept
    (tmp_path / "e").mkdir()
    save_tree(Tree(edited), tmp_path / "e" / "model.safetensors", metadata={PATCHES_KEY: t.meta[PATCHES_KEY]})
    (tmp_path / "e" / "rws_restore.safetensors").write_bytes((tmp_path / "p" / "rws_restore.safetensors").read_bytes())
    res = unpatch(tmp_path / "e", [(sig, 1.0)], tmp_path / "u")
    assert res.how == "subtracted" and "changed after patching" in res.notes[0]
    torch.testing.assert_close(_tensors(tmp_path / "u")["conv.bias"], clean["conv.bias"].dense() + 1.0)


def test_failures_leave_nothing_and_inputs_unchanged(tmp_path, monkeypatch):
    clean, (sig,) = _sigs(0, 1, torch.float32)
    m = _save_model(clean, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in m.iterdir()}
    import merging.signatures.patch as sp

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sp, "save_tree", boom)
    with pytest.raises(KeyboardInterrupt):
        patch(m, [(sig, 1.0)], tmp_path / "p")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(UserError, match="is the input"):
        patch(m, [(sig, 1.0)], m)
    patch(m, [(sig, 1.0)], tmp_path / "p")
    with pytest.raises(UserError, match="not empty"):
        patch(m, [(sig, 1.0)], tmp_path / "p")
    assert {p.name: p.read_bytes() for p in m.iterdir()} == before
    sig_file = save_signatures([sig], tmp_path / "s.safetensors")
    with pytest.raises(UserError, match="adapter or a delta"):
        patch(sig_file, [(sig, 1.0)], tmp_path / "z.safetensors")


def test_corrupt_signature_file_is_caught(tmp_path):
    _, (sig,) = _sigs(0, 1, torch.float32)
    path = save_signatures([sig], tmp_path / "s.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="do not match its recorded hash"):
        load_signatures(path)
    save_tree(Tree({"w": torch.zeros(2)}), tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="not a signature file"):
        load_signatures(tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="already exists"):
        save_signatures([sig], path)


def test_running_var_is_patched_multiplicatively():
    """A variance must stay positive at any scale: var·(var_c/var)^α, never var + α(var_c − var)."""
    clean = _model(0)
    robust = Tree({k: (v.dense(None) * 0.3 if k.endswith("running_var") else v.dense(None)) for k, v in clean.items()})
    sig = extract(clean, robust)
    assert sig.record["multiplicative"] == ["bn.running_var"]
    var = clean["bn.running_var"].dense()
    for scale in (-2.0, 0.5, 2.0, 3.0):
        got = apply_signatures(clean, [(sig, scale)])["bn.running_var"].dense()
        assert (got > 0).all()
        torch.testing.assert_close(got, var * 0.3**scale, rtol=1e-5, atol=0)


def test_robust_given_as_an_adapter_delta_and_bad_values():
    """A robust *adapter* trained from the clean model is a delta tree: its signature is that delta."""
    from peft_lab.tree import LowRank
    from peft_lab.tree.safetensors import TREE_KIND_KEY

    clean = _model(0)
    g = torch.Generator().manual_seed(1)
    lr = LowRank(torch.randn(5, 2, generator=g), torch.randn(2, 36, generator=g), 0.5)
    adapter = Tree({"fc.weight": lr}, source="adapter", meta={TREE_KIND_KEY: "delta"})
    sig = extract(clean, adapter, layers="all")
    torch.testing.assert_close(sig.tree["fc.weight"].dense(), lr.dense(), rtol=1e-6, atol=1e-6)
    assert torch.equal(sig.tree["conv.weight"].dense(), torch.zeros(4, 2, 3, 3))
    bad = Tree({k: v.dense(None).clone() for k, v in clean.items()}, source="nan_model")
    bad["conv.bias"].dense(None)[0] = float("nan")
    with pytest.raises(UserError, match="nan_model: tensor conv.bias has NaN"):
        extract(clean, bad)
    with pytest.raises(UserError, match="full model"):
        extract(adapter, clean)
    with pytest.raises(UserError, match="--bits 3"):
        extract(clean, clean, bits=3)


def test_layer_order_of_sorted_files_is_natural(tmp_path):
    """safetensors' own writer sorts names (features.10 before features.2): depth counts in natural order."""
    from merging.signatures.signature import in_forward_order

    names = ["features.0.weight", "features.10.weight", "features.2.weight", "head.weight"]
    t = Tree({n: torch.zeros(2, 2) for n in names}, source=str(tmp_path))
    ordered, how = in_forward_order(t)
    assert how == "natural" and list(ordered) == [
        "features.0.weight",
        "features.2.weight",
        "features.10.weight",
        "head.weight",
    ]
    sig = extract(t, Tree({n: torch.ones(2, 2) for n in names}), layers=2)
    assert sig.record["layers"] == ["features.0", "features.2"] and sig.record["order"] == "natural"
    assert in_forward_order(_model(0))[1] == "file"  # conv, bn, fc: written in the model's own order


def test_sharded_model_dir_stays_sharded(tmp_path):
    clean, (sig,) = _sigs(2, 1, torch.float32)
    save_tree(clean, tmp_path / "m", max_shard_size=600)
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    patch(tmp_path / "m", [(sig, 1.0)], tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(clean)
    unpatch(tmp_path / "p", [(sig, 1.0)], tmp_path / "u")
    assert _bitwise(_tensors(tmp_path / "u"), _tensors(tmp_path / "m"))
