"""The fused merge loops (merging/fused.py) against the torch reference they replace: bit-identical float32
results, signed zeros, ties at the threshold and the weight/normalize/λ variants included."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging import fused
from merging.methods._gta import combine, dare_generator, dare_keep, hardshrink_at_least
from merging.methods._kth_largest import kth_largest
from tests.conftest import REPO
from tests.helpers.merge import stream_merge
from tests.merging.methods.test_methods import make, rand

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is a dependency; PEFT_LAB_FUSED=0 set")


def tricky(n: int, seed: int, T: int) -> list[torch.Tensor]:
    """Task vectors with exact zeros of both signs, repeated magnitudes and opposite signs."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(T):
        x = torch.randn(n, generator=g)
        x = torch.where(torch.rand(n, generator=g) < 0.2, torch.round(x * 4) / 4, x)  # ties
        x[torch.rand(n, generator=g) < 0.1] = 0.0
        x[torch.rand(n, generator=g) < 0.1] = -0.0
        xs.append(x)
    if T > 1:  # exact cancellations
        xs[1][: n // 8] = -xs[0][: n // 8]
    return xs


@contextlib.contextmanager
def torch_path():
    fused.ENABLED = False
    try:
        yield
    finally:
        fused.ENABLED = True


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    T=st.integers(1, 4),
    consensus=st.booleans(),
    normalize=st.booleans(),
    signed=st.booleans(),
    lam=st.sampled_from([1.0, 0.3, -1.7]),
    with_base=st.booleans(),
    trim=st.booleans(),
)
def test_combine_matches_the_torch_ops_bit_for_bit(seed, T, consensus, normalize, signed, lam, with_base, trim):
    n = 4099  # not a multiple of any vector width: the vectorised and scalar tails of the torch ops both run
    xs = tricky(n, seed, T)
    g = torch.Generator().manual_seed(seed + 1)
    weights = [float(w) for w in (torch.rand(T, generator=g) * (2 if signed else 1) - (0.7 if signed else -0.1))]
    weights[0] = 1.0 if T > 1 else weights[0]
    base = torch.randn(n, generator=g) if with_base else None
    if base is not None:
        base[::7] = -0.0
    thr = [float(torch.quantile(x.abs(), 0.6)) if trim else 0.0 for x in xs]

    ref_xs = [
        hardshrink_at_least(x.clone(), t).mul_(w) if w != 1 else hardshrink_at_least(x.clone(), t)
        for x, t, w in zip(xs, thr, weights, strict=True)
    ]
    ref = combine(
        None if base is None else base.clone(), ref_xs, weights, consensus=consensus, normalize=normalize, lam=lam
    )
    before = [x.clone() for x in xs]
    got = fused.gta_combine(base, xs, thr, weights, consensus=consensus, normalize=normalize, lam=lam)
    assert same_bits(got, ref)
    assert all(
        torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(xs, before, strict=True)
    )  # inputs untouched


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    T=st.integers(1, 3),
    consensus=st.booleans(),
    skip=st.floats(0, 0.5),
    keep=st.floats(0, 0.6),
    chunk=st.sampled_from([4099, 1000, 137]),
)
def test_breadcrumbs_windows_inside_the_combine_loop_give_window_then_combine(seed, T, consensus, skip, keep, chunk):
    """`gta_combine(windows=...)` is `window_` on each task vector, then `gta_combine`: same bits, same tie counts
    carried from chunk to chunk (ties split across blocks and chunks: the task vectors are on a coarse grid)."""
    from merging.methods._sparsifiers import window

    n = 4099
    xs = [torch.round(x * 3) / 3 for x in tricky(n, seed, T)]
    weights = [1.0, 0.6, -0.4][:T]
    wins = [window(x, min(int(skip * n), n - int(keep * n)), int(keep * n)) for x in xs]
    wins = [w if w.keep else None for w in wins]
    ref_wins = [None if w is None else copy.deepcopy(w) for w in wins]
    for s in range(0, n, chunk):
        part = [x[s : s + chunk] for x in xs]
        before = [p.clone() for p in part]
        specs = [None if w is None else w.spec() for w in wins]
        got = fused.gta_combine(
            None, part, [0.0] * T, weights, consensus=consensus, normalize=True, lam=1.0, windows=specs
        )
        for w, spec in zip(wins, specs, strict=True):
            if w is not None:
                w.advance(spec)
        masked = [p.clone() if w is None else w.apply_(p.clone()) for p, w in zip(part, ref_wins, strict=True)]
        ref = fused.gta_combine(None, masked, [0.0] * T, weights, consensus=consensus, normalize=True, lam=1.0)
        assert same_bits(got, ref)
        assert all(same_bits(a, b) for a, b in zip(part, before, strict=True))  # inputs untouched
    for w, r in zip(wins, ref_wins, strict=True):
        assert w == r  # the same ties counted at both edges


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 5000), frac=st.floats(0, 1), levels=st.sampled_from([0, 3, 50]))
def test_fused_count_finds_the_same_threshold(seed, n, frac, levels):
    x = rand(n, seed)
    if levels:
        x = torch.round(x * levels) / levels
    x[::5] = -x[::5]
    k = max(1, min(n, int(frac * n)))
    want = torch.topk(x.abs(), k).values[-1].item()
    assert kth_largest(x, k, absolute=True) == want
    with torch_path():
        assert kth_largest(x, k, absolute=True) == want


def test_band_counts_like_the_torch_count():
    x = tricky(50_000, 3, 1)[0]
    x[7], x[8], x[9] = float("inf"), float("-inf"), float("nan")
    a = x.abs()
    lo, hi = float(torch.quantile(a[a.isfinite()], 0.3)), float(torch.quantile(a[a.isfinite()], 0.7))
    above, inside = fused.band(x, lo, hi)
    assert above == int((a > hi).sum())
    assert torch.equal(inside, a[(a >= lo) & (a <= hi)])  # the values themselves, in order
    v = 0.25  # a bracket of one value (tricky() rounds a fifth of the entries to quarters): its count
    above, inside = fused.band(x, v, v)
    assert above == int((a > v).sum()) and inside == int((a == v).sum()) > 0


def test_band2_counts_two_brackets_like_the_torch_counts():
    x = tricky(50_000, 4, 1)[0]
    x[7], x[8], x[9] = float("inf"), float("-inf"), float("nan")
    x[100:5000:3] = 0.5  # sparse runs and dense runs of values in a bracket, across sub-blocks
    a = x.abs()
    q = [float(torch.quantile(a[a.isfinite()], f)) for f in (0.1, 0.2, 0.6, 0.99)]
    for b1, b2 in (
        ((q[2], q[3]), (q[0], q[1])),
        ((q[0], q[2]), (q[1], q[3])),
        ((q[1], q[1]), (0.5, 0.5)),
        ((0.5, 0.5), (0.49, 0.51)),
        ((q[0], q[0] * 1.0001), (q[3], q[3])),
    ):
        got = fused.band2(x, *b1, *b2)
        for (lo, hi), above, inside in ((b1, *got[:2]), (b2, *got[2:])):
            assert above == int((a > hi).sum())
            want = a[(a >= lo) & (a <= hi)]
            assert inside == want.numel() if lo == hi else torch.equal(inside, want)


@pytest.mark.parametrize(
    "method,shared,per_model",
    [
        ("ties", {}, [{"density": 0.3}, {"density": 0.5, "weight": 0.7}, {"density": 1.0}]),
        ("ties", {"normalize": False, "lambda": 0.8}, [{"density": 0.2, "weight": -0.5}, {"density": 0.6}, {}]),
        ("dare_ties", {"seed": 3}, [{"density": 0.4}, {"density": 0.7, "weight": 0.5}, {"density": 1.0}]),
        ("dare_linear", {"rescale": "keep_rate", "normalize": True}, [{"density": 0.5}, {"density": 0.5}, {}]),
        ("dare_linear", {"rescale": "q", "q": 0.3}, [{"density": 0.2}, {"density": 0.25, "weight": 2.0}, {}]),
        ("dare_ties", {"rescale": "none", "lambda": 1.5}, [{"density": 0.2}, {"density": 0.9}, {"density": 0.5}]),
        ("task_arithmetic", {"lambda": 0.4}, [{}, {"weight": 2.0}, {}]),
    ],
)
@pytest.mark.parametrize("chunk", [1 << 30, 1000])
def test_methods_give_the_same_bits_with_and_without_the_fused_loops(monkeypatch, method, shared, per_model, chunk):
    base = rand((97, 211), 0)
    taus = [rand((97, 211), i + 1, 0.05) for i in range(3)]
    for tau in taus:
        tau.view(-1)[::13] = 0.0  # exact zeros in every task vector

    def run():
        m, pm = make(method, shared, per_model, n_models=3)
        return stream_merge(m, "w", base, [t.clone() for t in taus], pm, chunk=chunk)

    fast = run()
    monkeypatch.setattr(fused, "ENABLED", False)
    assert same_bits(fast, run())


@pytest.mark.parametrize(
    "method,shared,per_model",
    [
        ("ties", {}, [{"density": 0.3}, {"density": 0.5, "weight": 0.7}, {"density": 0.1}]),
        ("ties", {"normalize": False}, [{"density": 0.05, "weight": -0.5}, {"density": 0.6}, {}]),
        ("breadcrumbs", {}, [{"density": 0.8, "gamma": 0.05}, {"density": 0.5, "gamma": 0.3}, {"density": 0.9}]),
        ("breadcrumbs", {"rescale": "l1"}, [{"density": 0.2, "gamma": 0.0}, {"density": 0.3, "gamma": 0.7}, {}]),
        ("breadcrumbs_ties", {}, [{"density": 0.6, "gamma": 0.1}, {"density": 0.7, "gamma": 0.02}, {}]),
        ("sce", {"select_topk": 0.3}, None),
        ("sce", {}, None),
        ("ram", {}, None),
        ("ramplus_tl", {"r": 0.5, "alpha": 0.9}, None),
        ("della", {"seed": 2}, [{"density": 0.5, "epsilon": 0.2}, {"density": 0.3}, {"density": 0.7}]),
        ("della", {"rescale": "keep_rate"}, [{"density": 0.4, "epsilon": 0.3}, {"density": 0.6}, {}]),
        (
            "della_linear",
            {"rescale": "none"},
            [{"density": 0.2, "epsilon": 0.1}, {"density": 0.9, "epsilon": 0.05}, {}],
        ),
    ],
)
@pytest.mark.parametrize("chunk", [1 << 30, 1000, 333])
def test_fused_loops_give_the_same_bits_on_tied_magnitudes(monkeypatch, method, shared, per_model, chunk):
    """Task vectors on a coarse grid (as bfloat16 deltas are: many entries share a magnitude, so the thresholds of
    TIES and breadcrumbs fall on long runs of ties), with exact zeros and entries below RAM's epsilon."""
    base = rand((97, 211), 0)
    taus = []
    for i in range(3):
        tau = torch.round(rand((97, 211), i + 1) * 8) / 256
        tau.view(-1)[:: 7 + i] = 0.0
        tau.view(-1)[1 :: 11 + i] = 1e-7  # below ramplus_tl's / ram's epsilon
        taus.append(tau)
    taus[1].view(-1)[: 97 * 20] = -taus[0].view(-1)[: 97 * 20]  # exact cancellations (sign elections at 0)

    def run():
        m, pm = make(method, shared, per_model, n_models=3)
        return stream_merge(m, "w", base, [t.clone() for t in taus], pm, chunk=chunk)

    fast = run()
    monkeypatch.setattr(fused, "ENABLED", False)
    slow = run()
    assert same_bits(fast, slow)
    assert not torch.equal(fast, base)  # the merge did something


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (300,), (7, 1), (9, 64)])
@pytest.mark.parametrize("rescale", ["l1", "keep_rate"])
def test_fused_della_ranks_along_dimension_1_of_any_shape(monkeypatch, shape, rescale):
    """Ranks along dimension 1 of a conv-like tensor (strided), of a 1-D tensor (one row), of rows of one element."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g)
    taus = []
    for _ in range(2):  # fine-grained magnitudes, with runs of ties among them
        x = torch.randn(shape, generator=g) / 16
        taus.append(torch.where(torch.rand(shape, generator=g) < 0.3, torch.round(x * 64) / 64, x))

    def run():
        m, pm = make("della", {"rescale": rescale}, [{"density": 0.5, "epsilon": 0.3}, {"density": 0.4}], n_models=2)
        return stream_merge(m, "w", base, [t.clone() for t in taus], pm, chunk=64)

    fast = run()
    monkeypatch.setattr(fused, "ENABLED", False)
    assert same_bits(fast, run())


@pytest.mark.parametrize("chunk", [1 << 20, 777])
def test_fused_breadcrumbs_keeps_the_rank_window_of_an_all_tied_tensor(chunk):
    """Every magnitude tied: the window is positions [g, g + k) of the one run of ties, in index order, across
    blocks and chunks."""
    n = 50_000
    tau = torch.full((n,), 0.25)
    tau[1::2] = -0.25
    m, pm = make("breadcrumbs", {}, [{"density": 0.3, "gamma": 0.1}], n_models=1)
    out = stream_merge(m, "w", torch.zeros(n), [tau.clone()], pm, chunk=chunk)
    g, k = int(0.1 * n), int(0.3 * n)
    assert torch.equal(torch.nonzero(out).reshape(-1), torch.arange(g, g + k))


def test_fused_ties_keeps_exactly_k_entries_of_a_streamed_tensor():
    """Every magnitude tied: the threshold is the only value, and exactly k = floor(density·n) entries survive,
    the first ones in index order, across chunks."""
    n = 5000
    tau = torch.full((n,), 0.25)
    tau[1::2] = -0.25
    m, pm = make("ties", {}, [{"density": 0.3}], n_models=1)
    out = stream_merge(m, "w", torch.zeros(n), [tau.clone()], pm, chunk=777)
    kept = torch.nonzero(out).reshape(-1)
    assert kept.numel() == int(0.3 * n)
    assert torch.equal(kept, torch.arange(int(0.3 * n)))


@pytest.mark.parametrize(
    "recipe",
    [
        {"merge_method": "ties", "parameters": {"trim_scope": "global"}, "density": [0.3, 0.5]},
        {"merge_method": "ties", "density": [0.2, 0.9]},
        {"merge_method": "dare_ties", "density": [0.5, 0.6], "parameters": {"seed": 1}},
    ],
)
def test_merge_cli_output_is_identical_with_and_without_the_fused_loops(tmp_path, monkeypatch, recipe):
    from merging.run import run_merge
    from tests.helpers.merge import tiny_llama_dirs

    base, fts = tiny_llama_dirs(tmp_path, n_models=2)
    dens = recipe.pop("density")
    rec = {
        **recipe,
        "base_model": str(base),
        "dtype": "float32",
        "models": [{"model": str(p), "parameters": {"density": d}} for p, d in zip(fts, dens, strict=True)],
    }
    outs = []
    for enabled in (True, False):
        monkeypatch.setattr(fused, "ENABLED", enabled)
        out = run_merge(rec, tmp_path / f"out{enabled}", chunk_size=100, progress=False)
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("n", [1, 7, 10, 4097])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9999])
def test_dare_drop_draws_the_reference_mask_and_leaves_the_stream_where_it_does(n, density):
    x = rand(n, n)
    x[::5] = -0.0
    g_ref, g = dare_generator(0, "w", 1), dare_generator(0, "w", 1)
    want = x * dare_keep(n, density, g_ref)
    y = x.clone()
    before, after = fused.dare_drop(y, g, density, apply=True)
    assert same_bits(y, want)
    assert g.random_raw() == g_ref.random_raw()  # both streams continue from the same word
    assert before == pytest.approx(float(x.abs().double().sum()), rel=1e-12)
    assert after == pytest.approx(float(want.abs().double().sum()), rel=1e-12)


@pytest.mark.parametrize("n", [1, 5000])
def test_first_mask_mismatch_finds_the_first_differing_zero(n):
    xs = [rand(n, t) for t in range(3)]
    for x in xs:
        x[::3] = 0.0
    xs[2][::6] = -0.0  # -0 is a zero like +0
    assert fused.first_mask_mismatch(xs) == (-1, -1)
    if n > 1:
        xs[2][4000] = 0.0
        xs[1][4500] = 0.0
        assert fused.first_mask_mismatch(xs) == (2, 4000)
        xs[1][10] = float("nan")
        assert fused.first_mask_mismatch(xs) == (2, 4000)  # NaN is not a zero (and 10 is not a zero in model 0)
        xs[1][9] = float("nan")  # 9 is a zero in model 0
        assert fused.first_mask_mismatch(xs) == (1, 9)


def test_merges_without_fused_loops_do_not_import_numba(tmp_path):
    """numba (~0.25 s, ~60 MB) is imported by the first fused loop, not by `import merging`."""
    import subprocess
    import sys

    from tests.helpers.merge import tiny_llama_dirs

    base, fts = tiny_llama_dirs(tmp_path, n_models=2)
    code = (
        "import sys\nfrom merging.run import run_merge\n"
        f"run_merge({{'merge_method': 'task_arithmetic', 'base_model': {str(base)!r}, "
        f"'models': [{{'model': {str(fts[0])!r}}}, {{'model': {str(fts[1])!r}}}]}}, {str(tmp_path / 'o1')!r})\n"
        "assert 'numba' not in sys.modules\n"
        f"run_merge({{'merge_method': 'ties', 'base_model': {str(base)!r}, "
        f"'models': [{{'model': {str(fts[0])!r}, 'parameters': {{'density': 0.5}}}}]}}, {str(tmp_path / 'o2')!r})\n"
        "assert 'numba' in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-2000:]


RAW_RECIPES = [
    {"merge_method": "linear", "weights": [0.3, 0.7], "parameters": {}},
    {"merge_method": "linear", "weights": [2.0, 1.0], "parameters": {"normalize": False}, "base_weight": 0.5},
    {"merge_method": "task_arithmetic", "weights": [1.0, 1.0], "parameters": {}},
    {"merge_method": "task_arithmetic", "weights": [0.6, -0.3], "parameters": {"lambda": 0.7, "normalize": True}},
]


def _raw_recipe(base, fts, spec, dtype):
    spec = dict(spec)
    rec = {
        "merge_method": spec["merge_method"],
        "parameters": spec["parameters"],
        "dtype": dtype,
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, spec["weights"], strict=True)],
    }
    if spec["merge_method"] == "task_arithmetic" or "base_weight" in spec:
        rec["base_model"] = str(base)
    if "base_weight" in spec:  # linear averages an unlisted base_model in, with the top-level weight
        rec["parameters"] = {**rec["parameters"], "weight": spec["base_weight"]}
    return rec


def _with_and_without_raw_pass(rec, tmp_path, monkeypatch, loop: str, chunk: int):
    """Output dirs of `rec` with the fused loops on, then off; checks that `fused.<loop>` ran only in the first."""
    from merging.run import run_merge

    calls = []
    real = getattr(fused, loop)
    monkeypatch.setattr(fused, loop, lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = []
    for enabled in (True, False):
        monkeypatch.setattr(fused, "ENABLED", enabled)
        outs.append(run_merge(rec, tmp_path / f"out{enabled}", chunk_size=chunk, progress=False, hash="none"))
        if enabled:
            assert calls, "the raw pass was not used"
            n_fast = len(calls)
    assert len(calls) == n_fast  # ... and not with the fused loops off
    return outs


def _errors_with_and_without_raw_pass(rec, tmp_path, monkeypatch, chunk: int):
    """The UserError messages of `rec` with the fused loops on, then off, and the output dirs it was given."""
    from merging.run import run_merge
    from peft_lab.errors import UserError

    msgs, outs = [], []
    for enabled in (True, False):
        monkeypatch.setattr(fused, "ENABLED", enabled)
        outs.append(tmp_path / f"out{enabled}")
        with pytest.raises(UserError) as e:
            run_merge(rec, outs[-1], chunk_size=chunk, progress=False, hash="none")
        msgs.append(str(e.value))
    return msgs, outs


@pytest.mark.parametrize("spec", RAW_RECIPES, ids=lambda s: f"{s['merge_method']}-{s['weights']}")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("chunk", [1 << 20, 100])
def test_raw_bf16_pass_writes_the_bytes_of_the_torch_path(tmp_path, monkeypatch, spec, dtype, chunk):
    from merging.fused import raw
    from tests.helpers.merge import tiny_llama_dirs

    base, fts = tiny_llama_dirs(tmp_path, n_models=2)  # bfloat16 files
    rec = _raw_recipe(base, fts, spec, dtype)
    monkeypatch.setattr(raw, "MIN_NUMEL", 0)
    fast, slow = _with_and_without_raw_pass(rec, tmp_path, monkeypatch, "raw_merge", chunk)
    assert (fast / "model.safetensors").read_bytes() == (slow / "model.safetensors").read_bytes()


@pytest.mark.parametrize("where", ["input", "result"])
def test_raw_pass_refuses_nonfinite_values_with_the_torch_paths_message(tmp_path, monkeypatch, where):
    from safetensors.torch import load_file, save_file

    from merging.fused import raw
    from tests.helpers.merge import tiny_llama_dirs

    base, fts = tiny_llama_dirs(tmp_path, n_models=2)
    f = fts[1] / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.0.mlp.up_proj.weight"
    if where == "input":
        sd[name].view(-1)[37] = float("nan")
    else:  # finite inputs whose weighted sum overflows float32
        sd[name].view(-1)[37] = 3e38
    save_file(sd, f, metadata={"format": "pt"})
    rec = {
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "dtype": "float32",
        "models": [{"model": str(p), "parameters": {"weight": 2.0}} for p in fts],
    }
    monkeypatch.setattr(raw, "MIN_NUMEL", 0)
    msgs, outs = _errors_with_and_without_raw_pass(rec, tmp_path, monkeypatch, 1000)
    assert not any(o.exists() for o in outs)
    assert msgs[0] == msgs[1] and name in msgs[0] and "flat index 37" in msgs[0]
    assert ("NaN" if where == "input" else "inf") in msgs[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("chunk,whole", [(1 << 20, 1 << 25), (100, 1 << 25), (100, 0)])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_raw_slerp_agrees_with_the_torch_path_to_float32_rounding(tmp_path, monkeypatch, dtype, chunk, whole, t):
    from safetensors.torch import load_file

    from merging.fused import raw
    from tests.helpers.merge import tiny_llama_dirs

    base, fts = tiny_llama_dirs(tmp_path, n_models=1)
    rec = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(fts[0])}],
        "parameters": {"t": t},
        "dtype": dtype,
    }
    monkeypatch.setattr(raw, "MIN_NUMEL", 0)
    monkeypatch.setattr(raw, "WHOLE_NUMEL", whole)  # 0: tensors over one chunk are read twice
    outs = [
        load_file(d / "model.safetensors")
        for d in _with_and_without_raw_pass(rec, tmp_path, monkeypatch, "raw_lerp", chunk)
    ]
    b, m = load_file(base / "model.safetensors"), load_file(fts[0] / "model.safetensors")
    for k, fast in outs[0].items():
        slow = outs[1][k]
        if t in (0.0, 1.0):  # the endpoints come out exactly
            assert torch.equal(fast, (b if t == 0 else m)[k].to(fast.dtype)), k
        elif dtype == "float32":
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)
        else:  # a coefficient off in its last float32 bits moves a bfloat16 rounding now and then, by one ulp
            diff = (fast.float() - slow.float()).abs()
            assert (diff <= slow.float().abs() * 2**-7).all(), k
            assert (diff > 0).float().mean() < 0.01, k


def test_raw_slerp_refuses_a_nan_input_with_the_torch_paths_message(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from merging.fused import raw
    from tests.helpers.merge import tiny_llama_dirs

    base, fts = tiny_llama_dirs(tmp_path, n_models=1)
    f = fts[0] / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.1.self_attn.q_proj.weight"
    sd[name].view(-1)[-1] = float("inf")
    save_file(sd, f, metadata={"format": "pt"})
    rec = {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(fts[0])}]}
    monkeypatch.setattr(raw, "MIN_NUMEL", 0)
    msgs, _ = _errors_with_and_without_raw_pass(rec, tmp_path, monkeypatch, 100)
    assert msgs[0] == msgs[1] and name in msgs[0] and "inf" in msgs[0]


def test_decode_sub_is_the_float_then_subtract_of_torch():
    """Every bfloat16 class (zeros of both signs, subnormals, normals, the largest) minus a float32 base."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(70000, generator=g).to(torch.bfloat16)
    x[:6] = torch.tensor([0.0, -0.0, 1e-40, -1e-39, 3.3e38, -3.3e38]).to(torch.bfloat16)
    base = torch.randn(70000, generator=g)
    base[6:9] = torch.tensor([-0.0, 0.0, 1e-41])
    bits = x.view(torch.uint16).numpy()
    got = fused.decode_sub(bits, base, check=True)
    assert same_bits(got, x.float().sub_(base))
    bad = x.clone()
    bad[65537] = float("nan")
    assert fused.decode_sub(bad.view(torch.uint16).numpy(), base, check=True) is None  # the caller names it
    unchecked = fused.decode_sub(bad.view(torch.uint16).numpy(), base, check=False)
    assert unchecked is not None and torch.isnan(unchecked[65537]) and same_bits(unchecked[:65537], got[:65537])


@pytest.mark.parametrize("method", ["ties", "ties (tensor)", "breadcrumbs", "breadcrumbs_ties", "sce"])
def test_task_vectors_read_from_bfloat16_files_in_one_pass_give_the_torch_bytes(tmp_path, monkeypatch, method):
    """Methods on task vectors read bfloat16 chunks through `fused.decode_sub`, or, streamed, hand the raw bits to the
    fused loops (`fused.RawDelta`): the output bytes are those of the torch reader, whole tensors and chunked."""
    from merging import sources
    from merging.run import run_merge
    from tests.helpers.merge import tiny_llama_dirs

    base, fts = tiny_llama_dirs(tmp_path, n_models=2)  # bfloat16 files
    per = {
        "sce": {},
        "breadcrumbs": {"density": 0.8, "gamma": 0.05},
        "breadcrumbs_ties": {"density": 0.7, "gamma": 0.1},
    }
    shared = {"sce": {"select_topk": 0.5}, "ties (tensor)": {"trim_scope": "tensor"}}
    rec = {
        "merge_method": method.split()[0],
        "base_model": str(base),
        "dtype": "bfloat16",
        "parameters": shared.get(method, {}),
        "models": [{"model": str(p), "parameters": per.get(method, {"density": 0.3})} for p in fts],
    }
    monkeypatch.setattr(sources, "_FUSED_READ_MIN", 16)
    calls, raws = [], []
    real = fused.decode_sub
    monkeypatch.setattr(fused, "decode_sub", lambda *a, **k: calls.append(1) or real(*a, **k))
    raw_deltas = sources.MergeStreams._raw_deltas

    def spy(self, *a):
        out = raw_deltas(self, *a)
        raws.extend([1] if out is not None else [])
        return out

    monkeypatch.setattr(sources.MergeStreams, "_raw_deltas", spy)
    for chunk in (1 << 20, 100):  # whole tensors; streamed in chunks (the tiny model's matrices hold 512 entries)
        outs = []
        for enabled in (True, False):
            monkeypatch.setattr(fused, "ENABLED", enabled)
            n, r = len(calls), len(raws)
            outs.append(run_merge(rec, tmp_path / f"{chunk}{enabled}", chunk_size=chunk, progress=False, hash="none"))
            assert (len(calls) > n) == enabled
            # streamed tensors reach the fused loops undecoded (RawDelta): their counting and merge passes
            assert (len(raws) > r) == (enabled and chunk == 100)
        assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()


def test_a_nan_in_a_bfloat16_task_vector_read_is_named_by_the_torch_paths_message(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from merging import sources
    from tests.helpers.merge import tiny_llama_dirs

    base, fts = tiny_llama_dirs(tmp_path, n_models=2)
    f = fts[1] / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name].view(-1)[37] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    rec = {
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "bfloat16",
        "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in fts],
    }
    monkeypatch.setattr(sources, "_FUSED_READ_MIN", 16)
    msgs, outs = _errors_with_and_without_raw_pass(rec, tmp_path, monkeypatch, 1000)
    assert not any(o.exists() for o in outs)
    assert msgs[0] == msgs[1] and name in msgs[0] and "flat index 37" in msgs[0] and "NaN" in msgs[0]
    assert str(fts[1]) in msgs[0]


def test_to_bf16_rounds_as_torch_and_refuses_nonfinite():
    """The merged chunk's cast: bit for bit torch's float32 -> bfloat16 (round to nearest even, subnormals, -0,
    values past the largest bfloat16), and None for NaN/inf when checking (the caller's message then names it)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(70_001, generator=g) * torch.exp(torch.randn(70_001, generator=g) * 12).clamp(max=1e37)
    x[:8] = torch.tensor([0.0, -0.0, 1e-40, -1e-45, 3.4e38, -3.39e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8])
    got = fused.to_bf16(x, check=True)
    assert got is not None and torch.equal(got.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    x[60_000] = float("inf")
    assert fused.to_bf16(x, check=True) is None
    x[60_000] = float("nan")
    unchecked = fused.to_bf16(x, check=False)
    assert unchecked is not None and torch.isnan(unchecked[60_000].float())
    assert torch.equal(unchecked[:60_000].view(torch.int16), x[:60_000].to(torch.bfloat16).view(torch.int16))


def test_a_merge_overflow_in_a_fused_bfloat16_cast_is_named_by_the_torch_paths_message(tmp_path, monkeypatch):
    from merging import sources
    from merging.run import run_merge
    from peft_lab.errors import UserError
    from tests.helpers.merge import tiny_llama_dirs

    base, fts = tiny_llama_dirs(tmp_path, n_models=2)
    monkeypatch.setattr(sources, "_FUSED_READ_MIN", 16)  # the tiny model's tensors take the fused cast
    calls = []
    real = fused.to_bf16
    monkeypatch.setattr(fused, "to_bf16", lambda *a, **k: calls.append(1) or real(*a, **k))
    rec = {
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "bfloat16",
        "parameters": {"lambda": 1e36, "normalize": False},
        "models": [{"model": str(p), "parameters": {"density": 0.5, "weight": 1e6}} for p in fts],
    }
    with pytest.raises(UserError, match=r"the ties merge: tensor \S+ contains (inf|NaN)"):
        run_merge(rec, tmp_path / "out", progress=False, hash="none")
    assert calls
