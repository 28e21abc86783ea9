"""AdaMerging / AdaMerging++: AdaMerging's invariants on a tiny multi-head model, the merge method
through its `prepare`/`merge_tensor` interface, the saved coefficients and bad input."""

import copy
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from merging.base import METHODS, MergeInputs
from merging.datadriven.adamerging import adamerge, entropy, merged_params
from merging.methods.adamerging import AdaMerging, AdaMergingParams, official_ties, ties_task_vectors
from merging.sources import in_memory
from peft_lab.errors import UserError


class Net(torch.nn.Module):
    """A body of a few layers and one head; each task swaps in its own head tensors."""

    def __init__(self, d=6, c=3):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, d), torch.nn.Tanh(), torch.nn.Linear(d, d), torch.nn.Tanh())
        self.classifier = torch.nn.Linear(d, c)

    def forward(self, x):
        return self.classifier(self.body(x))


BODY = ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"]


def _setting(T=3, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    net = Net()
    base = {n: p.detach().clone() for n, p in net.named_parameters() if n in BODY}
    deltas = [{n: scale * torch.randn(base[n].shape, generator=g) for n in BODY} for _ in range(T)]
    heads = [
        {"classifier.weight": torch.randn(3, 6, generator=g), "classifier.bias": torch.randn(3, generator=g)}
        for _ in range(T)
    ]
    xs = [torch.randn(64, 4, generator=g) + k for k in range(T)]
    return net, base, deltas, heads, xs


def _samplers(xs, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [lambda x=x: {"x": x[torch.randint(len(x), (bs,), generator=g)]} for x in xs]


@settings(max_examples=20, deadline=None)
@given(lam=st.floats(0.0, 1.0), T=st.integers(1, 4), seed=st.integers(0, 1000))
def test_frozen_coefficients_equal_task_arithmetic(lam, T, seed):
    net, base, deltas, heads, xs = _setting(T=T, seed=seed)
    res = adamerge(net, base, deltas, heads, _samplers(xs), AdaMergingParams(granularity="task", init=lam, steps=0))
    assert res.lambdas.shape == (1, T)
    merged = merged_params(base, deltas, res.lambdas, res.names)
    for n in BODY:
        torch.testing.assert_close(merged[n], base[n] + lam * sum(d[n] for d in deltas), rtol=1e-6, atol=1e-6)
    # the merge method with given coefficients is task arithmetic too, tensor by tensor
    m = AdaMerging(AdaMergingParams(granularity="task"))
    m.prepare(_inputs(base, deltas, extra={"lambdas": [[lam] * T]}))
    for n in BODY:
        torch.testing.assert_close(
            m.merge_tensor(n, base[n], [d[n] for d in deltas], [None] * T),
            base[n] + lam * sum(d[n] for d in deltas),
            rtol=1e-6,
            atol=1e-6,
        )


def test_functional_forward_equals_materialised_model():
    net, base, deltas, heads, xs = _setting(T=3)
    lam = torch.rand(len(BODY), 3)
    merged = merged_params(base, deltas, lam, BODY)
    for k in range(3):
        y_func = functional_call(net, {**merged, **heads[k]}, (xs[k],))
        real = copy.deepcopy(net)
        sd = real.state_dict()
        sd.update({n: t.detach() for n, t in merged.items()})
        sd.update(heads[k])
        real.load_state_dict(sd)
        torch.testing.assert_close(y_func, real(xs[k]), rtol=1e-6, atol=1e-6)
    # the module's own weights were never touched
    assert all(torch.equal(p, base[n]) for n, p in net.named_parameters() if n in BODY)


def test_gradient_wrt_lambda_is_inner_product_with_task_vector():
    net, base, deltas, heads, xs = _setting(T=2)
    net = net.double()
    base = {n: t.double() for n, t in base.items()}
    deltas = [{n: t.double() for n, t in d.items()} for d in deltas]
    heads = [{n: t.double() for n, t in h.items()} for h in heads]
    x = xs[0].double()
    lam = torch.full((len(BODY), 2), 0.3, dtype=torch.float64, requires_grad=True)

    def loss_of(lam_):
        return entropy(functional_call(net, {**merged_params(base, deltas, lam_, BODY), **heads[0]}, (x,)))

    (g_lam,) = torch.autograd.grad(loss_of(lam), lam)
    theta = {n: t.clone().requires_grad_(True) for n, t in merged_params(base, deltas, lam.detach(), BODY).items()}
    g_theta = torch.autograd.grad(entropy(functional_call(net, {**theta, **heads[0]}, (x,))), list(theta.values()))
    for i, n in enumerate(BODY):
        for k in range(2):
            torch.testing.assert_close(g_lam[i, k], (g_theta[i] * deltas[k][n]).sum())
    # and a finite difference agrees
    eps = 1e-6
    e = torch.zeros_like(lam)
    e[2, 1] = eps
    fd = (loss_of(lam.detach() + e) - loss_of(lam.detach() - e)) / (2 * eps)
    torch.testing.assert_close(g_lam[2, 1], fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_training_lowers_entropy_and_keeps_lambda_in_the_box(granularity):
    net, base, deltas, heads, xs = _setting(T=3, scale=1.0)
    p = AdaMergingParams(granularity=granularity, steps=40, lr=0.05, batch_size=8)
    res = adamerge(net, base, deltas, heads, _samplers(xs, bs=32), p)
    assert res.lambdas.shape == ((len(BODY), 3) if granularity == "layer" else (1, 3))
    assert bool((res.lambdas >= 0).all() and (res.lambdas <= 1).all())
    assert not torch.allclose(res.lambdas, torch.full_like(res.lambdas, 0.3))
    assert sum(res.losses[-5:]) / 5 < sum(res.losses[:5]) / 5
    payload = json.loads(res.to_json(["a", "b", "c"], p))
    assert payload["granularity"] == granularity and len(payload["lambdas"][0]) == 3
    assert payload["params"]["lr"] == 0.05 and len(payload["losses"]) == 40


def test_adamerging_pp_with_unit_lambdas_is_ties_dis_sum():
    _, base, deltas, _, _ = _setting(T=3, seed=4)
    density = 0.3
    tv = ties_task_vectors(_inputs(base, deltas, {}), BODY, density)
    # an independent global computation on the flattened model (official TIES, "dis-sum")
    flat = torch.stack([torch.cat([d[n].reshape(-1) for n in BODY]) for d in deltas])
    N = flat.shape[1]
    thr = flat.abs().kthvalue(N - int(N * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= thr)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    kept = torch.where(sign > 0, trimmed * (trimmed > 0), trimmed * (trimmed < 0))
    ref = kept.sum(0)
    ours = torch.cat([sum(v[n] for v in tv).reshape(-1) for n in BODY])
    torch.testing.assert_close(ours, ref)
    ties, mp = official_ties(1.0, 3)  # density 1 trims nothing
    ties.prepare(dataclasses.replace(_inputs(base, deltas, {}), model_params=mp), names=BODY)
    assert ties.global_thresholds == [0.0, 0.0, 0.0]
    # through the method: AdaMerging++ at λ ≡ 1 merges to base + dis-sum, tensor by tensor
    m = AdaMerging(AdaMergingParams(ties=True, density=density, granularity="task"))
    m.prepare(_inputs(base, deltas, extra={"lambdas": [[1.0] * 3]}))
    out = torch.cat(
        [(m.merge_tensor(n, base[n], [d[n] for d in deltas], [None] * 3) - base[n]).reshape(-1) for n in BODY]
    )
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def _inputs(base, deltas, extra):
    """In-memory MergeInputs (with the streaming `scan`) of a base with a head and per-task deltas."""
    bt = {**base, "classifier.weight": torch.zeros(3, 6)}
    dts = [{**d, "classifier.weight": torch.full((3, 6), float(k))} for k, d in enumerate(deltas)]
    inputs = in_memory(AdaMerging(), bt, dts, deltas=True).merge_inputs(extra)
    return dataclasses.replace(inputs, labels=[f"t{k}" for k in range(len(deltas))])


def test_method_keeps_first_head_and_writes_coefficients():
    _, base, deltas, _, _ = _setting(T=2)
    m = METHODS.get("adamerging")(AdaMergingParams())
    m.prepare(_inputs(base, deltas, extra={"lambdas": torch.rand(len(BODY), 2).tolist()}))
    head = m.merge_tensor(
        "classifier.weight", torch.zeros(3, 6), [torch.full((3, 6), 0.0), torch.full((3, 6), 1.0)], [None] * 2
    )
    assert torch.equal(head, torch.zeros(3, 6))
    art = json.loads(m.artifacts()["adamerging_coefficients.json"])
    assert art["granularity"] == "layer" and art["tensors"] == BODY and art["tasks"] == ["t0", "t1"]
    assert METHODS.get("adamerging_ties")().params.ties is True


def test_bad_input():
    net, base, deltas, heads, xs = _setting(T=2)
    with pytest.raises(UserError, match="must match"):
        adamerge(net, base, deltas, heads[:1], _samplers(xs), AdaMergingParams(steps=1))
    bad = [heads[0], {"classifier.weight": heads[1]["classifier.weight"]}]
    with pytest.raises(UserError, match="heads do not fit"):
        adamerge(net, base, deltas, bad, _samplers(xs), AdaMergingParams(steps=1))
    with pytest.raises(UserError, match="does not have"):
        adamerge(net, base, deltas, [{"head.w": torch.ones(1)}] * 2, _samplers(xs), AdaMergingParams(steps=1))
    with pytest.raises(UserError, match="granularity"):
        AdaMergingParams(granularity="block")
    with pytest.raises(UserError, match="init"):
        AdaMergingParams(init=1.5)
    with pytest.raises(UserError, match="density"):
        AdaMergingParams(density=0.0)
    m = AdaMerging()
    with pytest.raises(UserError, match="do not fit"):
        m.prepare(_inputs(base, deltas, extra={"lambdas": [[0.3] * 5]}))
    with pytest.raises(UserError, match="base model"):
        m.prepare(MergeInputs(base=None, models=[], deltas=[], model_params=[], labels=[]))
