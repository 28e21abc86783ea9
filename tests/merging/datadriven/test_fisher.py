"""Fisher merging: the per-example Fisher (torch.func vs a Python loop), the invariants of Fisher merging
(docs/methods.md#fisher), the merge method through its `prepare`/`merge_tensor` interface, and bad input."""

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging.base import MergeInputs
from merging.datadriven.fisher import diagonal_fisher, diagonal_fisher_loop
from merging.methods.fisher import Fisher, FisherModelParams, FisherParams, fisher_merge, save_fisher
from peft_lab.errors import UserError
from peft_lab.tree import Tree, load_tree


class MLP(torch.nn.Module):
    def __init__(self, d_in=5, d_h=7, c=3):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(d_in, d_h), torch.nn.Tanh())
        self.classifier = torch.nn.Linear(d_h, c)

    def forward(self, x):
        return self.classifier(self.body(x))


def _batches(n=10, bs=4, d_in=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return [{"x": x[i : i + bs], "labels": y[i : i + bs]} for i in range(0, n, bs)]


NAMES = ["body.0.weight", "body.0.bias", "classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("labels", ["sample", "expected", "empirical"])
def test_vmap_fisher_equals_python_loop(labels):
    model = MLP()
    batches = _batches()
    fast = diagonal_fisher(
        model, NAMES, batches, labels=labels, chunk_size=3, generator=torch.Generator().manual_seed(1)
    )
    slow = diagonal_fisher_loop(model, NAMES, batches, labels=labels, generator=torch.Generator().manual_seed(1))
    for n in NAMES:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-5, atol=1e-8)


def test_fisher_is_per_example_not_squared_mean_gradient():
    model = MLP()
    batches = _batches(n=8, bs=8)
    f = diagonal_fisher(model, NAMES, batches, labels="empirical")
    b = batches[0]
    lp = torch.log_softmax(model(b["x"]), -1).gather(1, b["labels"][:, None]).mean()
    g = torch.autograd.grad(lp, [dict(model.named_parameters())[n] for n in NAMES])
    # E[g²] >= (E g)² element-wise, strictly somewhere for distinct examples
    assert all(bool((f[n] >= gi.square() - 1e-7).all()) for n, gi in zip(NAMES, g, strict=True))
    assert any(bool((f[n] > gi.square() + 1e-6).any()) for n, gi in zip(NAMES, g, strict=True))


def test_fisher_on_own_argmax_labels_is_nonnegative_and_finite():
    torch.manual_seed(3)
    model = MLP(d_in=6, d_h=16, c=4)
    x = torch.randn(32, 6) * 5  # large inputs: saturated softmax, tiny gradients, still no NaN/Inf
    with torch.no_grad():
        y = model(x).argmax(-1)
    f = diagonal_fisher(model, NAMES, [{"x": x, "labels": y}], labels="empirical", chunk_size=8)
    for n, t in f.items():
        assert t.dtype == torch.float32 and t.shape == dict(model.named_parameters())[n].shape
        assert bool(torch.isfinite(t).all()) and bool((t >= 0).all()), n
    assert sum(float(t.sum()) for t in f.values()) > 0


def test_fisher_of_hf_model_through_vmap():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 50, (4, 6))
    att = torch.ones_like(ids)
    att[0, 4:] = 0
    names = ["bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"]
    batch = [{"input_ids": ids, "attention_mask": att}]
    fast = diagonal_fisher(model, names, batch, labels="expected", chunk_size=5)
    slow = diagonal_fisher_loop(model, names, batch, labels="expected")
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-9)


def test_fisher_num_examples_and_empty_data():
    model = MLP()
    full = _batches(n=10, bs=10)[0]
    three = [{k: v[i : i + 3] for k, v in full.items()} for i in range(0, 10, 3)]
    f4 = diagonal_fisher(model, NAMES, three, labels="expected", num_examples=4)
    f4b = diagonal_fisher(model, NAMES, [{k: v[:4] for k, v in full.items()}], labels="expected")
    for n in NAMES:
        torch.testing.assert_close(f4[n], f4b[n])
    with pytest.raises(UserError, match="no examples"):
        diagonal_fisher(model, NAMES, [], labels="sample")
    with pytest.raises(UserError, match="gold labels"):
        diagonal_fisher(model, NAMES, [{"x": torch.randn(2, 5)}], labels="empirical")
    with pytest.raises(UserError, match="no parameters named"):
        diagonal_fisher(model, ["nope.weight"], _batches())


# ---------------------------------------------------------------------------------------------------------
# The weighted average (Fisher merging's invariants)
# ---------------------------------------------------------------------------------------------------------
shapes = st.sampled_from([(1,), (3,), (2, 5), (4, 1, 3)])


@settings(max_examples=30, deadline=None)
@given(shape=shapes, T=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_equal_fishers_give_the_weighted_average(shape, T, seed):
    g = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(shape, generator=g) for _ in range(T)]
    w = torch.rand(T, generator=g) + 0.1
    F = torch.rand(shape, generator=g) + 0.01
    out = fisher_merge(thetas, [F] * T, w.tolist())
    ref = sum(wi * t for wi, t in zip(w, thetas, strict=True)) / w.sum()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # convex combination: element-wise between the models' min and max, whatever the Fishers
    Fs = [torch.rand(shape, generator=g) * 10 for _ in range(T)]
    out2 = fisher_merge(thetas, Fs, w.tolist())
    lo, hi = torch.stack(thetas).min(0).values, torch.stack(thetas).max(0).values
    assert bool((out2 >= lo - 1e-5).all() and (out2 <= hi + 1e-5).all())


def test_one_hot_weights_and_zero_fishers():
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(4, 3, generator=g) for _ in range(3)]
    Fs = [torch.rand(4, 3, generator=g) for _ in range(3)]
    torch.testing.assert_close(fisher_merge(thetas, Fs, [0.0, 1.0, 0.0]), thetas[1])
    # all-zero Fishers: the floor makes it the plain weighted average, never NaN
    out = fisher_merge(thetas, [torch.zeros(4, 3)] * 3, [1.0, 2.0, 1.0])
    torch.testing.assert_close(out, (thetas[0] + 2 * thetas[1] + thetas[2]) / 4)
    # favor_target: other models' zero Fisher stays 0, so the result is the target model
    out = fisher_merge(thetas, [Fs[0], torch.zeros(4, 3), torch.zeros(4, 3)], [1, 1, 1], favor_target=True)
    torch.testing.assert_close(out, thetas[0])


def _inputs(T=3, fishers=None, shape=(4, 3), seed=0, weights=None):
    g = torch.Generator().manual_seed(seed)
    models = [
        Tree({"body.w": torch.randn(shape, generator=g), "classifier.weight": torch.randn(2, 3, generator=g)})
        for _ in range(T)
    ]
    mps = [FisherModelParams(weight=1.0 if weights is None else weights[j]) for j in range(T)]
    return MergeInputs(
        base=None,
        models=models,
        deltas=[],
        model_params=mps,
        labels=[f"m{j}" for j in range(T)],
        extra={"fishers": fishers} if fishers is not None else {},
    )


def _run(method, inputs):
    method.prepare(inputs)
    return {
        n: method.merge_tensor(n, None, [m[n].dense() for m in inputs.models], inputs.model_params)
        for n in inputs.models[0]
    }


def test_method_normalisation_makes_fisher_scale_irrelevant():
    g = torch.Generator().manual_seed(5)
    F = [{"body.w": torch.rand(4, 3, generator=g) + 0.5} for _ in range(3)]
    a = _run(Fisher(FisherParams(normalize=True)), _inputs(fishers=F))
    F2 = [dict(F[0]), {"body.w": F[1]["body.w"] * 1000.0}, dict(F[2])]
    b = _run(Fisher(FisherParams(normalize=True)), _inputs(fishers=F2))
    torch.testing.assert_close(a["body.w"], b["body.w"], rtol=1e-5, atol=1e-6)
    c = _run(Fisher(FisherParams(normalize=False)), _inputs(fishers=F2))
    assert not torch.allclose(a["body.w"], c["body.w"], atol=1e-3)
    # heads are not merged: the first model's head is kept
    inp = _inputs(fishers=F)
    torch.testing.assert_close(a["classifier.weight"], inp.models[0]["classifier.weight"].dense())


def test_method_all_zero_fisher_and_missing_tensors_fall_back(caplog):
    inputs = _inputs(fishers=[{"body.w": torch.zeros(4, 3)}] * 3)
    with caplog.at_level(logging.WARNING):
        out = _run(Fisher(), inputs)
    assert "zero everywhere" in caplog.text
    ref = sum(m["body.w"].dense() for m in inputs.models) / 3
    torch.testing.assert_close(out["body.w"], ref)
    # a tensor no model has a Fisher for: plain weighted average, said in the log
    inputs = _inputs(fishers=[{}, {}, {}], weights=[1.0, 0.0, 3.0])
    with caplog.at_level(logging.INFO):
        out = _run(Fisher(FisherParams(heads=())), inputs)
    assert "no Fisher in any model" in caplog.text and "body.w" in caplog.text
    ref = (inputs.models[0]["body.w"].dense() + 3 * inputs.models[2]["body.w"].dense()) / 4
    torch.testing.assert_close(out["body.w"], ref)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


def test_saved_fisher_is_reused_from_a_path(tmp_path):
    g = torch.Generator().manual_seed(2)
    F = [{"body.w": torch.rand(4, 3, generator=g) + 0.1} for _ in range(2)]
    paths = []
    for j, f in enumerate(F):
        save_fisher(f, tmp_path / f"f{j}.safetensors")
        paths.append(str(tmp_path / f"f{j}.safetensors"))
    assert load_tree(paths[0]).meta.get("peft_lab.tree_kind") == "fisher"
    inputs = _inputs(T=2, seed=1)
    inputs.model_params = [FisherModelParams(weight=1.0, fisher=p) for p in paths]
    from_files = _run(Fisher(), inputs)
    from_memory = _run(Fisher(), _inputs(T=2, seed=1, fishers=F))
    torch.testing.assert_close(from_files["body.w"], from_memory["body.w"])


def test_bad_input_is_a_clear_user_error(tmp_path):
    with pytest.raises(UserError, match="data"):
        Fisher().prepare(_inputs())  # no Fisher and no data config
    with pytest.raises(UserError, match="does not fit the model"):
        Fisher().prepare(_inputs(fishers=[{"body.w": torch.ones(3, 4)}] * 3))
    with pytest.raises(UserError, match="not in the model"):
        Fisher().prepare(_inputs(fishers=[{"other.w": torch.ones(1)}] * 3))
    with pytest.raises(UserError, match="floor"):
        FisherParams(floor=0.0)
    with pytest.raises(UserError, match="labels"):
        FisherParams(labels="gold")
    with pytest.raises(UserError, match="weight"):
        FisherModelParams(weight=-1.0)
    with pytest.raises(UserError, match="sum to 0"):
        Fisher().prepare(_inputs(fishers=[{}] * 2, T=2, weights=[0.0, 0.0]))
    assert math.isfinite(FisherParams().floor)


# ---------------------------------------------------------------------------------------------------------
# The hooks engine (merging/datadriven/fisher_hooks.py): the same Fisher from one batched backward
# ---------------------------------------------------------------------------------------------------------
def _tiny_bert(layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 50, (7, 6))
    ids[1, 2] = ids[1, 4]  # a token twice in one example: its embedding row's gradient is the sum of both
    att = torch.ones_like(ids)
    att[0, 4:] = 0
    att[3, 5:] = 0
    return model, [k for k, _ in model.named_parameters()], [{"input_ids": ids, "attention_mask": att}]


@pytest.mark.parametrize("labels", ["sample", "expected", "empirical"])
@pytest.mark.parametrize("chunk", [2, 16])  # batches split into chunks (labels drawn first) and whole
def test_hooks_engine_equals_python_loop(labels, chunk):
    model = MLP()
    batches = _batches()
    fast = diagonal_fisher(
        model,
        NAMES,
        batches,
        labels=labels,
        chunk_size=chunk,
        engine="hooks",
        generator=torch.Generator().manual_seed(1),
    )
    slow = diagonal_fisher_loop(model, NAMES, batches, labels=labels, generator=torch.Generator().manual_seed(1))
    for n in NAMES:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("labels", ["sample", "expected"])
def test_hooks_engine_on_a_whole_hf_model(labels):
    """Every parameter of a BERT classifier: word/position/token-type embeddings (position ids broadcast over the
    batch), LayerNorms, attention and FFN linears, pooler, head; padded examples; a repeated token."""
    model, names, batch = _tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    fast = diagonal_fisher(
        model, names, batch, labels=labels, chunk_size=3, engine="hooks", generator=torch.Generator().manual_seed(2)
    )
    slow = diagonal_fisher_loop(model, names, batch, labels=labels, generator=torch.Generator().manual_seed(2))
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-9)
    assert sum(float(fast[n].sum()) for n in names if "embeddings" in n) > 0
    for k, v in model.state_dict().items():  # the model is left as it was
        assert torch.equal(v, before[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_hooks_engine_on_llama_and_torch_rms_norm():
    """RMSNorm: transformers' (Llama: `variance_epsilon`, float32 statistics) and torch's `nn.RMSNorm`."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    llama = transformers.LlamaForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 50, (5, 6))
    att = torch.ones_like(ids)
    ids[0, 4:], att[0, 4:] = 0, 0
    rms = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.RMSNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        rms[1].weight.uniform_(0.5, 1.5)
    for model, batches in (
        (llama, [{"input_ids": ids, "attention_mask": att}]),
        (rms, [{"input": b["x"]} for b in _batches()]),
    ):
        names = [k for k, _ in model.named_parameters()]
        assert any("norm" in n or n.startswith("1.") for n in names)
        fast = diagonal_fisher(
            model,
            names,
            batches,
            labels="sample",
            chunk_size=2,
            engine="hooks",
            generator=torch.Generator().manual_seed(1),
        )
        slow = diagonal_fisher_loop(model, names, batches, labels="sample", generator=torch.Generator().manual_seed(1))
        for n in names:
            torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-9)


class TwiceMLP(torch.nn.Module):
    """One Linear applied twice per forward: per-example gradients are sums over both uses, outside the hooks'
    closed form."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 5)
        self.classifier = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class SideUseMLP(MLP):
    """A weight used outside its module's forward, which no hook sees (only the check against a loop does)."""

    def forward(self, x):
        h = self.body(x)
        return self.classifier(h) + (h @ self.classifier.weight.T).tanh()


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 2, 3)
        self.classifier = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(self.conv(x[:, None, :]).flatten(1))


@pytest.mark.parametrize(
    ("model", "names", "why"),
    [
        (TwiceMLP(), ["lin.weight", "lin.bias", "classifier.weight"], "more than once"),
        (SideUseMLP(), NAMES, "differ from a per-example backward"),
        (ConvNet(), ["conv.weight", "classifier.weight"], "not the weight or bias"),
    ],
)
def test_auto_falls_back_to_vmap_where_hooks_do_not_apply(model, names, why, caplog):
    torch.manual_seed(0)
    batches = _batches()
    with caplog.at_level(logging.INFO, logger="merging.datadriven.fisher"):
        auto = diagonal_fisher(model, names, batches, labels="sample", generator=torch.Generator().manual_seed(1))
    assert "vmap" in caplog.text and why in caplog.text
    slow = diagonal_fisher_loop(model, names, batches, labels="sample", generator=torch.Generator().manual_seed(1))
    for n in names:
        torch.testing.assert_close(auto[n], slow[n], rtol=1e-5, atol=1e-8)
    with pytest.raises(UserError, match=f"engine='hooks' cannot.*{why}"):
        diagonal_fisher(model, names, batches, engine="hooks")


def test_tied_weights_and_bad_engine():
    model = MLP(d_in=3, d_h=3, c=3)
    model.body[0].weight = model.classifier.weight  # tied: one parameter, two modules
    with pytest.raises(UserError, match="tied"):
        diagonal_fisher(model, ["body.0.weight"], _batches(d_in=3), engine="hooks")
    with pytest.raises(UserError, match="engine"):
        diagonal_fisher(MLP(), NAMES, _batches(), engine="fast")
    with pytest.raises(UserError, match="engine"):
        FisherParams(engine="fast")
