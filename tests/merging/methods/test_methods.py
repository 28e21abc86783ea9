"""Merge methods: the registry/config contract, each method's invariants (docs/methods.md) as
property tests on small random tensors, chunking independence, and cross-checks with peft's merge_utils."""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import merging.methods
from merging.base import METHODS, param_key
from merging.methods._gta import dare_generator, dare_keep, tensor_seed
from merging.methods._kth_largest import KthLargest, kth_largest
from merging.recipe import parse_recipe
from peft_lab.config import conf_dir
from peft_lab.errors import UserError
from tests.helpers.merge import stream_merge

ALL = METHODS.names()
SEEDS = st.integers(0, 2**16)


def make(method: str, shared=None, per_model=None, n_models=2):
    """A method instance and its per-model params from recipe-style dicts (through the recipe parser's rules)."""
    cls = METHODS.get(method)
    keys = {param_key(f): f.name for f in dataclasses.fields(cls.Params)}
    m = cls(cls.Params(**{keys[k]: v for k, v in (shared or {}).items()}))
    mkeys = {param_key(f): f.name for f in dataclasses.fields(cls.ModelParams)}
    pm = [
        cls.ModelParams(**{mkeys[k]: v for k, v in (per_model[i] if per_model else {}).items()})
        for i in range(n_models)
    ]
    return m, pm


def rand(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def inputs_for(cls, base, thetas):
    """What merge_tensor gets: task vectors or the models' tensors."""
    return [t - base for t in thetas] if cls.uses_deltas else thetas


# ---------------------------------------------------------------------------------------------------------
# registry <-> modules <-> configs
# ---------------------------------------------------------------------------------------------------------
def _config_names() -> dict[str, str]:
    """conf/method file stem -> the `name:` it selects."""
    return {p.stem: yaml.safe_load(p.read_text())["name"] for p in (conf_dir() / "method").glob("*.yaml")}


# configs that select another method under a name users look for (WiSE-FT is task arithmetic of one fine-tune)
ALIASES = {"wise_ft": "task_arithmetic"}


def test_module_name_registry_key_and_config_agree():
    modules = {m.name for m in pkgutil.iter_modules(merging.methods.__path__) if not m.name.startswith("_")}
    configs = {stem for stem, name in _config_names().items() if stem == name}
    assert set(ALL) == modules == configs
    assert {stem: name for stem, name in _config_names().items() if stem != name} == ALIASES
    assert not set(ALIASES) & set(ALL) and set(ALIASES.values()) <= set(ALL)
    for name in ALL:
        cls = METHODS.get(name)
        assert cls.name == name and cls.__module__ == f"merging.methods.{name}"
        assert importlib.import_module(cls.__module__).__doc__.count("http") >= 1  # paper link


@pytest.mark.parametrize("name", ALL)
def test_method_config_matches_its_schema(name):
    """Every key of conf/method/<name>.yaml is a parameter of the method and every value validates."""
    cfg = yaml.safe_load((conf_dir() / "method" / f"{name}.yaml").read_text())
    assert cfg.pop("name") == name
    cls = METHODS.get(name)
    shared = {param_key(f): f.name for f in dataclasses.fields(cls.Params)}
    model = {param_key(f): f.name for f in dataclasses.fields(cls.ModelParams)}
    assert set(cfg) <= set(shared) | set(model), set(cfg) - set(shared) - set(model)
    assert set(shared) <= set(cfg), "every shared parameter has a documented default in the YAML"
    cls.Params(**{shared[k]: v for k, v in cfg.items() if k in shared})
    cls.ModelParams(**{model[k]: v for k, v in cfg.items() if k in model})
    first = (conf_dir() / "method" / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# peft-lab merge") and f"method={name}" in first


def test_root_merge_config_opens_with_its_command():
    text = (conf_dir() / "merge.yaml").read_text()
    assert text.startswith("# peft-lab merge method=")
    assert yaml.safe_load(text)["defaults"][0] == {"method": "linear"}


# ---------------------------------------------------------------------------------------------------------
# contract over every method: chunking independence, order, identity, dtype
# ---------------------------------------------------------------------------------------------------------
def _model_count(cls, want: int = 3) -> int:
    """`want` models, within what the method merges."""
    return max(cls.min_models, min(want, cls.max_models or want))


def _contract_params(name):
    shared = {
        "ties": {"lambda": 0.8},
        "dare_linear": {"rescale": "keep_rate"},
        "dare_ties": {"rescale": "l1"},
        "slerp": {"t": 0.35},
        "della": {"rescale": "l1"},
        "della_linear": {"rescale": "keep_rate"},
        "breadcrumbs": {"rescale": "l1"},
        "sce": {"select_topk": 0.5},
        "pcb": {"ratio": 0.3},
    }.get(name, {})
    cls = METHODS.get(name)
    n = _model_count(cls)
    fields = {param_key(f) for f in dataclasses.fields(cls.ModelParams)}
    per = [
        {k: v for k, v in {"weight": w, "density": d}.items() if k in fields}
        for w, d in zip((1.0, 0.7, 1.3), (0.4, 0.6, 1.0), strict=False)
    ][:n]
    return shared, per, n


# methods whose coefficients come from whole-tensor sums (norms, inner products), accumulated chunk by chunk
# (float32 within a chunk, float64 across): equal to float32 rounding, not bit for bit
FLOAT_SUMS = {"slerp", "model_stock", "nuslerp", "multislerp", "karcher", "sce"}


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).streaming])
@pytest.mark.parametrize("shape", [(7, 13), (64, 33), (5,)])
def test_result_does_not_depend_on_chunking(name, shape):
    shared, per, n = _contract_params(name)
    m, pm = make(name, shared, per, n)
    base = rand(shape, 1)
    thetas = [base + rand(shape, 10 + i, 0.1) for i in range(n)]
    if name == "soup":  # shared mask
        mask = rand(shape, 99) > 0
        base, thetas = base * mask, [t * mask for t in thetas]
    ins = inputs_for(type(m), base, thetas)
    whole = m.merge_tensor("layer.w", base.clone(), [t.clone() for t in ins], pm)
    assert whole.dtype == torch.float32 and whole.shape == base.shape and torch.isfinite(whole).all()
    for chunk in (4, 10, 32):
        m2, _ = make(name, shared, per, n)
        got = stream_merge(m2, "layer.w", base, ins, pm, chunk)
        if name in FLOAT_SUMS or shared.get("rescale") == "l1":
            # whole-tensor statistics accumulate chunk by chunk (float32 within, float64 across)
            torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, whole), f"{name} chunk={chunk}: max diff {(got - whole).abs().max()}"


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).max_models != 1])
def test_model_order_does_not_matter(name):
    shared, per, n = _contract_params(name)
    if name.startswith(("dare", "della")):  # masks depend on the model's position: compare at density 1
        per = [{**p, "density": 1.0} for p in per]
    m, pm = make(name, shared, per, n)
    base = rand((9, 11), 2)
    thetas = [base + rand((9, 11), 20 + i, 0.1) for i in range(n)]
    ins = inputs_for(type(m), base, thetas)
    a = m.merge_tensor("w", base, ins, pm)
    b = m.merge_tensor("w", base, ins[::-1], pm[::-1])
    # SVDs of the reordered (concatenated) factors round differently
    tol = {"rtol": 1e-5, "atol": 1e-6} if name in ("tsv", "iso_c", "iso_cts") else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(a, b, **tol)


INTERPOLATE_WITH_BASE = ("slerp", "nearswap", "arcee_fusion")


# AdaMerging learns one coefficient per task (and layer) with no normalisation: T identical task vectors give
# θ0 + (Σλ)τ, not θ0 + τ (its tests cover what it does instead). The SVD-based methods reshape the summed task
# matrix by design (TSV keeps each task's 1/T leading directions, Iso-C/CTS flatten the spectrum), so identical tasks
# do not give τ back either (tests/merging/methods/test_svd.py has their invariants).
# consensus sums the task vectors (task arithmetic's multi-task vector) before masking; PCB clips each task vector's
# largest and smallest magnitudes and drops the entries below its top `ratio`.
NOT_IDEMPOTENT = ("adamerging", "adamerging_ties", "tsv", "iso_c", "iso_cts", "consensus", "pcb")


@pytest.mark.parametrize("name", [n for n in ALL if n not in NOT_IDEMPOTENT])
def test_identical_models_merge_to_that_model(name):
    """Linear/soup of identical models, and every task-vector method with identical task vectors (weights 1,
    nothing dropped) give back that model; slerp between identical tensors returns them."""
    cls = METHODS.get(name)
    n = _model_count(cls)
    takes_normalize = "normalize" in {param_key(f) for f in dataclasses.fields(cls.Params)}
    m, pm = make(name, {"normalize": True} if takes_normalize else {}, None, n)
    base = rand((6, 10), 3)
    # methods that interpolate one model with the base (or pick entries from either) return that model when it is
    # the base; the others get identical task vectors
    theta = base + rand((6, 10), 4, 0.1) if cls.needs_base and name not in INTERPOLATE_WITH_BASE else base.clone()
    ins = inputs_for(cls, base, [theta.clone() for _ in range(n)])
    torch.testing.assert_close(m.merge_tensor("w", base, ins, pm), theta, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# task arithmetic (B1)
# ---------------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, lam=st.floats(-2, 2), n=st.integers(1, 4))
def test_task_arithmetic_is_linear_in_lambda(seed, lam, n):
    base = rand((5, 8), seed)
    taus = [rand((5, 8), seed + 1 + i, 0.1) for i in range(n)]
    ws = [0.5 + 0.25 * i for i in range(n)]
    m, pm = make("task_arithmetic", {"lambda": lam}, [{"weight": w} for w in ws], n)
    got = m.merge_tensor("w", base, taus, pm)
    want = base + lam * sum(w * t for w, t in zip(ws, taus, strict=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    m0, pm0 = make("task_arithmetic", {"lambda": 0.0}, None, n)
    assert torch.equal(m0.merge_tensor("w", base, taus, pm0), base)


# ---------------------------------------------------------------------------------------------------------
# TIES (B2)
# ---------------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, lam=st.floats(0.1, 2))
def test_ties_one_model_at_density_1_is_task_arithmetic(seed, lam):
    base, tau = rand((7, 9), seed), rand((7, 9), seed + 1, 0.1)
    tau[0, :3] = 0  # exact zeros: the divisor-0 rule
    m, pm = make("ties", {"lambda": lam}, [{"density": 1.0}], 1)
    ta, tpm = make("task_arithmetic", {"lambda": lam}, None, 1)
    assert torch.equal(m.merge_tensor("w", base, [tau], pm), ta.merge_tensor("w", base, [tau], tpm))


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 4), density=st.floats(0.05, 1.0), normalize=st.booleans())
def test_ties_sign_and_support_invariants(seed, n, density, normalize):
    base = rand((6, 17), seed)
    taus = [rand((6, 17), seed + 1 + i, 0.1) for i in range(n)]
    m, pm = make("ties", {"normalize": normalize}, [{"density": density}] * n, n)
    delta = m.merge_tensor("w", base, [t.clone() for t in taus], pm) - base
    k = max(1, int(density * base.numel()))
    trimmed = []
    for t in taus:
        kept = t.abs() >= torch.topk(t.abs().reshape(-1), k).values[-1]
        assert int(kept.sum()) == k  # distinct random values: exactly k kept (mergekit/peft)
        trimmed.append(t * kept)
    gamma = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    assert ((delta.sign() == gamma) | (delta == 0)).all()  # merged sign ∈ {γ, 0}
    support = torch.stack([t != 0 for t in trimmed]).any(0)
    assert (delta[~support] == 0).all()  # support ⊆ ∪ support(trimmed)


def test_ties_global_trim_ranks_over_the_whole_model():
    """trim_scope=global ranks |τ_t| over all tensors together, with the official code's threshold
    (`kthvalue(|τ|, N − int(N·density))`, kept where |τ| >= it)."""
    from merging.base import MergeInputs
    from peft_lab.tree import Tree

    shapes = {"a": (40, 30), "b": (7,), "c": (25, 25)}
    base = {k: rand(s, i) for i, (k, s) in enumerate(shapes.items())}
    taus = [{k: rand(s, 100 * j + i, 0.1 * (1 + i)) for i, (k, s) in enumerate(shapes.items())} for j in range(2)]
    m, pm = make("ties", {"trim_scope": "global", "normalize": True}, [{"density": 0.3}, {"density": 0.5}], 2)

    def scan(fn, kind="full", names=None):
        from merging.base import TensorJob

        for k in names or shapes:
            fn(TensorJob(k, shapes[k], pm, sample_rate=1.0), 0, base[k].reshape(-1), [t[k].reshape(-1) for t in taus])

    m.prepare(MergeInputs(Tree(base), [], [], pm, ["m0", "m1"], scan=scan))
    flat = [torch.cat([t[k].reshape(-1) for k in shapes]) for t in taus]
    N = flat[0].numel()
    for j, d in enumerate((0.3, 0.5)):
        kth = flat[j].abs().kthvalue(max(N - int(N * d), 1)).values.item()
        assert m._global_thr[j] == kth
    for k in shapes:
        got = m.merge_tensor(k, base[k], [t[k] for t in taus], pm)
        trimmed = [t[k] * (t[k].abs() >= m._global_thr[j]) for j, t in enumerate(taus)]
        ref, rpm = make("ties", {"normalize": True}, [{"density": 1.0}] * 2, 2)
        torch.testing.assert_close(got, ref.merge_tensor(k, base[k], trimmed, rpm), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# exact k-th largest (TIES thresholds)
# ---------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 3000), frac=st.floats(0, 1), levels=st.sampled_from([0, 3, 50]))
def test_kth_largest_is_exact(seed, n, frac, levels):
    x = rand((n,), seed).abs()
    if levels:  # many ties, as with bfloat16 deltas
        x = (x * levels).round() / levels
    k = max(1, min(n, int(frac * n)))
    assert kth_largest(x, k) == torch.topk(x, k).values[-1].item()


@pytest.mark.parametrize("mode", ["histogram", "values"])
@pytest.mark.parametrize("sample", ["unlike the data", "a biased subset"])
def test_kth_largest_recovers_from_a_bad_sample_and_tight_memory(monkeypatch, mode, sample):
    import merging.methods._kth_largest as sel_mod

    monkeypatch.setattr(sel_mod, "_CANDIDATE_CAP", 500)
    if mode == "values":  # no histogram: held values, thinned past the cap
        monkeypatch.setattr(sel_mod, "_HIST_BINS", 0)
    x = torch.cat([torch.full((20000,), 0.5), rand((30000,), 1).abs(), torch.zeros(50000)])
    for k in (1, 700, 20000, 35000, 90000):
        s = KthLargest(x.numel(), k)
        # the bracket must move when the sample misleads it
        s.add_sample(torch.full((100,), 9.0) if sample == "unlike the data" else x[20000:20400].abs() * 0.9, 1000.0)
        s.bracket()
        while True:
            s.begin_count()
            for c in x.split(7777):
                s.count(c)
            if s.resolve():
                break
        assert s.threshold == torch.topk(x, k).values[-1].item(), k


# ---------------------------------------------------------------------------------------------------------
# DARE (B6)
# ---------------------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, density=st.floats(0.05, 0.95))
def test_dare_keeps_tau_over_density_on_a_random_support(seed, density):
    base, tau = rand((30, 40), seed), rand((30, 40), seed + 1, 0.1)
    tau[:3] = 0
    base = torch.zeros_like(base)  # the merged tensor is then the dropped-and-rescaled τ itself
    m, pm = make("dare_linear", {"rescale": "keep_rate", "seed": seed}, [{"density": density}], 1)
    out = m.merge_tensor("w", base, [tau.clone()], pm)
    kept = out != 0
    assert (kept <= (tau != 0)).all()  # support ⊆ support(τ)
    assert torch.equal(out[kept], tau[kept] / density)
    n = int((tau != 0).sum())
    frac = int(kept.sum()) / n
    assert abs(frac - density) < 5 * math.sqrt(density * (1 - density) / n) + 1e-9  # binomial, 5 sigma
    mq, pmq = make("dare_linear", {"rescale": "q", "q": density, "seed": seed}, [{"density": density}], 1)
    assert torch.equal(mq.merge_tensor("w", base, [tau.clone()], pmq), out)  # q = density is DARE


def test_dare_is_unbiased_and_seeded():
    tau = rand((2000,), 5, 0.1)
    mean = torch.zeros(2000)
    outs = []
    for seed in range(200):
        m, pm = make("dare_linear", {"rescale": "keep_rate", "seed": seed}, [{"density": 0.3}], 1)
        outs.append(m.merge_tensor("w", torch.zeros(2000), [tau.clone()], pm))
        mean += outs[-1] / 200
    # E[τ̃] = τ: per entry the mean of 200 draws has sd |τ|·sqrt(0.7/0.3/200) ≈ 0.108 |τ|
    assert ((mean - tau).abs() <= 0.5 * tau.abs() + 1e-7).float().mean() > 0.99
    assert not torch.equal(outs[0], outs[1])
    m, pm = make("dare_linear", {"rescale": "keep_rate", "seed": 0}, [{"density": 0.3}], 1)
    assert torch.equal(m.merge_tensor("w", torch.zeros(2000), [tau.clone()], pm), outs[0])
    assert tensor_seed(0, "a.weight", 0) != tensor_seed(0, "b.weight", 0) != tensor_seed(0, "a.weight", 1)


def test_dare_masks_do_not_depend_on_chunking():
    g1, g2 = dare_generator(7, "w", 0), dare_generator(7, "w", 0)
    whole = dare_keep(1001, 0.37, g1)
    parts = torch.cat([dare_keep(400, 0.37, g2), dare_keep(400, 0.37, g2), dare_keep(201, 0.37, g2)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_at_density_1_is_its_base_method(name):
    base = rand((8, 8), 1)
    taus = [rand((8, 8), 2 + i, 0.1) for i in range(3)]
    ws = [{"weight": w, "density": 1.0} for w in (1.0, 0.5, 0.8)]
    m, pm = make(name, {"normalize": True}, ws, 3)
    ref_name = "task_arithmetic" if name == "dare_linear" else "ties"
    ref_per_model = [{k: v for k, v in w.items() if ref_name == "ties" or k == "weight"} for w in ws]
    r, rpm = make(ref_name, {"normalize": True}, ref_per_model, 3)
    assert torch.equal(m.merge_tensor("w", base, taus, pm), r.merge_tensor("w", base, taus, rpm))


def test_dare_l1_rescale_restores_the_l1_norm():
    tau = rand((50, 50), 3, 0.1)
    m, pm = make("dare_linear", {"rescale": "l1"}, [{"density": 0.2}], 1)
    out = m.merge_tensor("w", torch.zeros(50, 50), [tau], pm)
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------
# SLERP (B7)
# ---------------------------------------------------------------------------------------------------------
def _slerp(t, a, b):
    m, pm = make("slerp", {"t": t}, None, 1)
    return m.merge_tensor("w", a.clone(), [b.clone()], pm)


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, t=st.floats(0, 1))
def test_slerp_endpoints_and_symmetry(seed, t):
    a, b = rand((4, 9), seed), rand((4, 9), seed + 1)
    assert torch.equal(_slerp(0.0, a, b), a) and torch.equal(_slerp(1.0, a, b), b)
    torch.testing.assert_close(_slerp(t, a, b), _slerp(1 - t, b, a), rtol=1e-5, atol=1e-6)


def test_slerp_geometry_and_colinear_fallback():
    e1, e2 = torch.zeros(10), torch.zeros(10)
    e1[0], e2[1] = 1.0, 1.0
    mid = _slerp(0.5, e1, e2)
    torch.testing.assert_close(mid.norm(), torch.tensor(1.0))
    torch.testing.assert_close(mid, (e1 + e2) / math.sqrt(2))
    a = rand((3, 5), 1)
    torch.testing.assert_close(_slerp(0.3, a, 2.5 * a), 0.7 * a + 0.3 * 2.5 * a)  # colinear: lerp
    torch.testing.assert_close(_slerp(0.3, a, -a), 0.7 * a - 0.3 * a)  # anti-colinear: lerp
    # a zero tensor keeps norm 1 (mergekit), so it counts as orthogonal: sin(tπ/2)·v1
    torch.testing.assert_close(_slerp(0.4, torch.zeros(5), torch.ones(5)), math.sin(0.4 * math.pi / 2) * torch.ones(5))


# ---------------------------------------------------------------------------------------------------------
# linear and soup (B8)
# ---------------------------------------------------------------------------------------------------------
def test_linear_weights_and_normalize():
    xs = [rand((3, 4), i) for i in range(3)]
    m, pm = make("linear", {"normalize": True}, [{"weight": w} for w in (1.0, 2.0, 1.0)], 3)
    torch.testing.assert_close(m.merge_tensor("w", None, [x.clone() for x in xs], pm), (xs[0] + 2 * xs[1] + xs[2]) / 4)
    m, pm = make("linear", {"normalize": False}, [{"weight": w} for w in (1.0, 2.0, 1.0)], 3)
    torch.testing.assert_close(m.merge_tensor("w", None, [x.clone() for x in xs], pm), xs[0] + 2 * xs[1] + xs[2])


def test_soup_keeps_the_shared_mask_and_refuses_different_masks():
    mask = rand((20, 20), 1) > 0.3
    cands = [rand((20, 20), 10 + i) * mask for i in range(3)]
    m, pm = make("soup", None, None, 3)
    soup = m.merge_tensor("w", None, [c.clone() for c in cands], pm)
    assert torch.equal(soup == 0, ~mask)
    torch.testing.assert_close(soup, sum(cands) / 3)
    one, pm1 = make("soup", None, None, 1)
    assert torch.equal(one.merge_tensor("w", None, [cands[0].clone()], pm1), cands[0])
    bad = cands[2].clone()
    bad[0, mask[0].int().argmin()] = 1.0  # one entry outside the mask
    with pytest.raises(UserError, match=r"different sparsity masks in tensor w"):
        m.merge_tensor("w", None, [cands[0], cands[1], bad], pm)
    loose, lpm = make("soup", {"check_masks": False}, None, 3)
    loose.merge_tensor("w", None, [cands[0], cands[1], bad], lpm)


@pytest.mark.parametrize("shape", [(20, 20), (3, 7)])  # masks compared as int64 words, and as bools (21 values)
def test_soup_names_the_first_differing_entry(shape):
    mask = torch.ones(shape, dtype=torch.bool)
    mask.view(-1)[5] = False
    a = rand(shape, 1) * mask
    b = rand(shape, 2) * mask
    b.view(-1)[5] = 0.5
    m, pm = make("soup", None, None, 2)
    with pytest.raises(UserError, match=r"\(1 entries differ in this chunk, the first at flat index 5\)"):
        m.merge_tensor("w", None, [a, b], pm)


# ---------------------------------------------------------------------------------------------------------
# cross-checks with peft.utils.merge_utils
# ---------------------------------------------------------------------------------------------------------
def test_matches_peft_merge_utils():
    from peft.utils import merge_utils as mu

    base = rand((12, 20), 1)
    taus = [rand((12, 20), 2 + i, 0.1) for i in range(3)]
    w = torch.tensor([1.0, 0.6, 0.9])

    m, pm = make("task_arithmetic", None, [{"weight": float(x)} for x in w], 3)
    got = m.merge_tensor("w", base, taus, pm) - base
    torch.testing.assert_close(got, mu.task_arithmetic(taus, w), rtol=1e-5, atol=1e-6)

    # peft's TIES divides by the number of agreeing models: our normalize with weights 1
    ones = torch.ones(3)
    m, pm = make("ties", {"normalize": True}, [{"density": 0.4}] * 3, 3)
    peft_ties = mu.ties(taus, ones, density=0.4, majority_sign_method="total")
    torch.testing.assert_close(m.merge_tensor("w", base, taus, pm) - base, peft_ties, rtol=1e-5, atol=1e-6)
    # and its magnitude pruning keeps the same top-k
    for t in taus:
        ours = m.merge_tensor("w", torch.zeros_like(t), [t], [pm[0]])
        assert torch.equal(ours != 0, mu.magnitude_based_pruning(t, 0.4) != 0)

    # DARE at density 1 (peft's random pruning returns its input)
    m, pm = make("dare_linear", None, [{"weight": float(x), "density": 1.0} for x in w], 3)
    got = m.merge_tensor("w", base, taus, pm) - base
    torch.testing.assert_close(got, mu.dare_linear(taus, w, density=1.0), rtol=1e-5, atol=1e-6)
    m, pm = make("dare_ties", {"normalize": True}, [{"density": 1.0}] * 3, 3)
    got = m.merge_tensor("w", base, taus, pm) - base
    torch.testing.assert_close(got, mu.dare_ties(taus, ones, density=1.0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# parameter validation (each bad value names the parameter)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, params, per_model, match",
    [
        ("ties", {}, {"density": 0.0}, r"density=0\.0 is out of range.*\(0, 1\]"),
        ("ties", {}, {"density": 1.5}, r"density=1\.5 is out of range"),
        ("dare_ties", {"density": -0.1}, {}, r"density=-0\.1 is out of range"),
        ("linear", {}, {"weight": -1.0}, r"weight=-1\.0 is out of range: must be >= 0 \(linear and soup average"),
        ("soup", {}, {"weight": -0.5}, r"weight=-0\.5 is out of range: must be >= 0"),
        ("slerp", {"t": 1.2}, None, r"t=1\.2 is out of range"),
        ("slerp", {"t": -0.1}, None, r"t=-0\.1 is out of range"),
        ("task_arithmetic", {"lambda": float("nan")}, {}, r"lambda=nan must be a finite number"),
        ("ties", {"trim_scope": "layer"}, {}, r"trim_scope='layer' must be one of: tensor, global"),
        ("dare_linear", {"rescale": "q"}, {}, r"rescale=q needs q"),
        ("dare_linear", {"rescale": "q", "q": 1.5}, {}, r"q=1\.5 is out of range"),
        ("ties", {"normalize": "yes"}, {}, r"normalize='yes' must be true or false"),
        ("task_arithmetic", {"density": 0.5}, {}, r"task_arithmetic has no parameter density"),
        ("linear", {"normalize": True}, {"weight": 0.0}, r"sum to 0"),
    ],
)
def test_out_of_range_parameters_are_refused(method, params, per_model, match):
    recipe = {
        "merge_method": method,
        "base_model": "b",
        "models": [{"model": "m1", "parameters": per_model or {}}],
        "parameters": params,
    }
    if method == "slerp":
        recipe["models"] = [{"model": "m1"}]
    if method in ("linear", "soup"):  # a base would be averaged in (linear) or is not needed
        del recipe["base_model"]
    with pytest.raises(UserError, match=match):
        parse_recipe(recipe)


def test_thinned_sample_keeps_its_weight(monkeypatch):
    """A long sample in many pieces (some of one value) is thinned to bounded memory without biasing the
    bracket: the pieces' weights still add up to the stream's size and the bracket holds the k-th largest."""
    import merging.methods._kth_largest as sel_mod

    monkeypatch.setattr(sel_mod, "_SAMPLE_CAP", 256)
    x = rand((200_000,), 3).abs()
    k = 40_000
    s = KthLargest(x.numel(), k, z=6.0)
    pieces = [x[i : i + n] for i, n in zip(range(0, 200_000, 1000), [1, 7, 64, 1000] * 50, strict=False)]
    covered = 0
    for p in pieces:
        s.add_sample(p, 1000 / p.numel())  # each piece stands for its 1000-value block
        covered += 1000
    assert s._sample_size <= 4 * 256 + 1000
    assert math.isclose(sum(v.numel() * w for v, w in s._sample), covered, rel_tol=1e-9)
    s.bracket()
    kth = torch.topk(x, k).values[-1].item()
    assert s.lo <= kth <= s.hi
