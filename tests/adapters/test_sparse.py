"""Sparse adapter specifics: budget, selection strategies, the kernel path, SpIEL grow/drop
(docs/adapters.md#sparse)."""

from __future__ import annotations

import pytest
import torch

from peft_lab.adapters import build_adapter
from peft_lab.adapters._grow_drop import reselection_rate
from peft_lab.adapters.sparse import SparseLayer
from peft_lab.errors import UserError
from peft_lab.tree import Sparse
from tests.helpers.adapters import MLP, perturb


def test_budget_matches_lora_parameters_or_density():
    a = build_adapter("sparse", r=2, modules_to_save=[])
    a.attach(MLP())
    lora = build_adapter("lora", r=2, modules_to_save=[])
    lora.attach(MLP())
    assert a.num_trainable() == lora.num_trainable() == 2 * (50 + 50 + 38)
    d = build_adapter("sparse", density=0.1, modules_to_save=[])
    d.attach(MLP())
    assert {n: layer.values.numel() for n, layer in d.layers().items()} == {"fc1": 56, "fc2": 56, "head": 16}


def test_density_scope_model_is_spiels_fraction_of_the_whole_model():
    """SpIEL's density counts every parameter of the model and spreads that many entries over the targets by
    size; the layer scope takes the fraction of each target weight (fewer entries at the same number)."""
    model = MLP()
    n_model = sum(p.numel() for p in model.parameters())  # weights and biases of all three layers
    a = build_adapter("sparse", density=0.1, density_scope="model", target_modules=["fc1", "fc2"], modules_to_save=[])
    a.attach(model)
    k = {n: layer.values.numel() for n, layer in a.layers().items()}
    assert sum(k.values()) == round(0.1 * n_model)  # 1342 parameters -> 134 entries, split evenly (17x33, 33x17)
    assert k["fc1"] == k["fc2"] == round(0.1 * n_model / 2)
    layer = build_adapter("sparse", density=0.1, target_modules=["fc1", "fc2"], modules_to_save=[])
    layer.attach(MLP())
    assert sum(x.values.numel() for x in layer.layers().values()) == 2 * 56 < sum(k.values())
    with pytest.raises(UserError, match="density_scope=model .* set adapter.density"):
        build_adapter("sparse", density_scope="model")
    with pytest.raises(UserError, match="density_scope"):
        build_adapter("sparse", density=0.1, density_scope="global")


def test_indices_are_int32_unique_and_the_leaf_is_sparse():
    a = build_adapter("sparse", r=3)
    model = a.attach(MLP())
    layer = model.fc1
    assert layer.rows.dtype == torch.int32 and layer.cols.dtype == torch.int32
    leaf = a.delta_tree()["fc1.weight"]
    assert isinstance(leaf, Sparse) and leaf.indices.dtype == torch.int32
    assert leaf.indices.unique().numel() == leaf.nnz == 3 * 50


def test_magnitude_selects_the_smallest_weights():
    torch.manual_seed(0)
    model = MLP()
    W = model.fc1.weight.detach().abs().flatten()
    a = build_adapter("sparse", r=1, selection="magnitude", target_modules=["fc1"])
    a.attach(model)
    idx = a.layers()["fc1"].indices.long()
    assert idx.numel() == 50
    assert float(W[idx].max()) <= float(W[torch.ones_like(W, dtype=torch.bool).index_fill_(0, idx, False)].min())


def test_random_selection_is_seeded():
    def idx(seed):
        a = build_adapter("sparse", r=1, seed=seed, target_modules=["fc1"])
        a.attach(MLP())
        return a.layers()["fc1"].indices

    assert torch.equal(idx(3), idx(3))
    assert not torch.equal(idx(3), idx(4))


def test_rank_larger_than_layer_allows():
    with pytest.raises(UserError, match=r"k = r·\(out\+in\) = 600 entries, more than layer fc1 \(17, 33\) has \(561\)"):
        build_adapter("sparse", r=12, target_modules=["fc1"]).attach(MLP())
    with pytest.raises(UserError, match="density"):
        build_adapter("sparse", density=1.5)


def test_forward_and_value_gradient_match_dense_reference():
    torch.manual_seed(0)
    model = MLP()
    a = build_adapter("sparse", r=2, target_modules=["fc1"], modules_to_save=[])
    layer: SparseLayer = a.attach(model).fc1
    perturb(a)
    x = torch.randn(7, 33, requires_grad=True)
    y = layer(x)
    W = layer.base_layer.weight + a.delta_tree()["fc1.weight"].dense()
    v = layer.values.detach().clone().requires_grad_(True)
    dense = torch.zeros(17 * 33).index_put((layer.indices.long(),), v).view(17, 33)
    y_ref = x @ (layer.base_layer.weight + dense).T + layer.base_layer.bias
    torch.testing.assert_close(y, x @ W.T + layer.base_layer.bias)
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    y.backward(dy)
    gx_ref, gv_ref = torch.autograd.grad(y_ref, (x, v), dy)
    torch.testing.assert_close(layer.values.grad, gv_ref)
    torch.testing.assert_close(gx, gx_ref)
    assert layer.base_layer.weight.grad is None


def test_adapter_forward_is_the_delta_output():
    torch.manual_seed(0)
    model = MLP()
    a = build_adapter("sparse", r=2, target_modules=["fc1"], modules_to_save=[])
    layer: SparseLayer = a.attach(model).fc1
    perturb(a)
    x = torch.randn(2, 5, 33)
    with torch.no_grad():
        torch.testing.assert_close(layer.adapter_forward(x), layer(x) - layer.base_layer(x), rtol=1e-5, atol=1e-6)


def test_reselection_rate_schedule():
    assert reselection_rate(5, 100, True, 0.2, "linear") == 1.0
    assert reselection_rate(50, 100, False, 0.2, "linear") == pytest.approx(0.1)
    assert reselection_rate(50, 100, False, 0.2, "cosine") == pytest.approx(0.1)
    assert reselection_rate(25, 100, False, 0.2, "cosine") == pytest.approx(0.2 * (1 + 2**-0.5) / 2)


def _grow_drop_run(steps, S=4, A=2, r=1, on_select=None):
    """Train the MLP with Adam and SpIEL grow/drop; `on_select(adapter, step)` runs right before each
    on_optimizer_step that ends a phase."""
    torch.manual_seed(0)
    model = MLP()
    a = build_adapter(
        "sparse", r=r, selection="grow_drop", reselection_steps=S, selection_accumulation_steps=A, modules_to_save=[]
    )
    a.attach(model)
    opt = torch.optim.Adam(list(a.trainable_parameters().values()), lr=1e-2)
    x, t = torch.randn(32, 33), torch.randint(0, 5, (32,))
    selections = []
    for step in range(1, steps + 1):
        for half in (x[:16], x[16:]):  # two backward passes per optimizer step (gradient accumulation)
            loss = torch.nn.functional.cross_entropy(model(half), t[: len(half)])
            loss.backward()
        opt.step()
        opt.zero_grad()
        before = a._selections
        if on_select is not None and a.collecting and step % S == A:
            on_select(a, step, opt, x)
        a.on_optimizer_step(step, steps, opt)
        if a._selections != before:
            selections.append(step)
    return a, selections


def test_grow_drop_schedule():
    a, selections = _grow_drop_run(steps=13)
    # phases: start at t=0 -> select at t=A=2; start when (t+1) % S == 0 (t=3, 7) -> select at t=6, 10;
    # the phase that would start at t=11 cannot end before T=13 and is skipped
    assert selections == [2, 6, 10]
    assert not a.collecting


def test_grow_drop_invariants():
    seen = {}

    def check(a, step, opt, x):
        layers = a.layers()
        old = {n: (layer.indices.long().clone(), layer.values.detach().clone()) for n, layer in layers.items()}
        cands = {n: layer.candidates.idx.clone() for n, layer in layers.items()}
        seen[step] = (old, cands)

    a, selections = _grow_drop_run(steps=7, on_select=check)
    assert selections == [2, 6]
    # replay the checks on the state captured at the last selection against the state after it
    old, cands = seen[6]
    for n, layer in a.layers().items():
        idx_old, v_old = old[n]
        idx_new = layer.indices.long()
        k = idx_old.numel()
        assert idx_new.numel() == k and idx_new.unique().numel() == k  # size constant, indices distinct
        changed = (idx_new != idx_old).nonzero().flatten()
        assert 0 < changed.numel() <= int(k * reselection_rate(6, 7, False, 0.2, "linear"))
        assert torch.isin(idx_new[changed], cands[n]).all()  # grown from the candidates
        assert not torch.isin(idx_new[changed], idx_old).any()  # genuinely new positions


def test_first_selection_adopts_the_candidates_and_only_drops_change_the_output():
    state = {}

    def capture(a, step, opt, x):
        state["x"] = x
        state["y"] = a.model(x).detach()
        state["idx"] = {n: layer.indices.long().clone() for n, layer in a.layers().items()}
        state["v"] = {n: layer.values.detach().clone() for n, layer in a.layers().items()}
        state["C"] = {n: layer.candidates.idx.clone() for n, layer in a.layers().items()}

    a, selections = _grow_drop_run(steps=2, S=4, A=2, on_select=capture)
    assert selections == [2]
    kept_slots = {}
    for n, layer in a.layers().items():
        new = layer.indices.long()
        # p = 1 at the first selection: the active set becomes exactly the candidate set
        assert torch.equal(torch.sort(new).values, torch.sort(state["C"][n]).values)
        kept = torch.isin(state["idx"][n], new)
        # kept indices keep their slot and value; changed slots restart at 0
        assert torch.equal(new[kept], state["idx"][n][kept])
        assert torch.equal(layer.values.detach()[kept], state["v"][n][kept])
        assert float(layer.values.detach()[~kept].abs().max()) == 0
        kept_slots[n] = kept
    # the reselection changes the output only by removing the dropped deltas: rebuild that reference by
    # zeroing the dropped slots' values in the old configuration
    with torch.no_grad():
        saved = {
            n: (layer.rows.clone(), layer.cols.clone(), layer.values.detach().clone())
            for n, layer in a.layers().items()
        }
        for n, layer in a.layers().items():
            in_f = layer.base_layer.weight.shape[1]
            layer.rows.copy_((state["idx"][n] // in_f).to(layer.rows.dtype))
            layer.cols.copy_((state["idx"][n] % in_f).to(layer.cols.dtype))
            layer.values.copy_(torch.where(kept_slots[n], state["v"][n], torch.zeros_like(state["v"][n])))
        y_ref = a.model(state["x"])
        for n, layer in a.layers().items():
            layer.rows.copy_(saved[n][0]), layer.cols.copy_(saved[n][1]), layer.values.copy_(saved[n][2])
        torch.testing.assert_close(a.model(state["x"]), y_ref, rtol=0, atol=1e-6)


def test_grown_slots_get_seeded_adam_moments():
    captured = {}

    def capture(a, step, opt, x):
        for n, layer in a.layers().items():
            c = layer.candidates  # this step's gradient is folded in by on_optimizer_step: include it here
            g = (c.g_sum + c.step_sum) / (c.steps + 1)
            g2 = (c.g2_sum + c.step_sum.square()) / (c.steps + 1)
            captured[n] = (c.idx.clone(), g, g2)
        captured["t"] = {n: float(opt.state[layer.values]["step"]) for n, layer in a.layers().items()}
        captured["opt"] = opt

    a, _ = _grow_drop_run(steps=2, on_select=capture)
    opt = captured["opt"]
    b1, b2 = opt.param_groups[0]["betas"]
    for n, layer in a.layers().items():
        cidx, mg, mg2 = captured[n]
        t = captured["t"][n]
        st = opt.state[layer.values]
        pos = {int(c): i for i, c in enumerate(cidx)}
        new_idx = layer.indices.long()
        # every slot now holds a candidate; its moments are the candidate's mean (squared) gradient, bias-scaled
        j = torch.tensor([pos[int(i)] for i in new_idx])
        zero = layer.values.detach() == 0  # grown slots (kept ones carry trained values and their own moments)
        torch.testing.assert_close(st["exp_avg"][zero], (mg[j] * (1 - b1**t))[zero])
        torch.testing.assert_close(st["exp_avg_sq"][zero], (mg2[j] * (1 - b2**t))[zero])


def test_saved_input_dtype_halves_what_a_bert_layer_keeps_and_changes_gradients_by_bf16_precision():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))

    def run(dtype):
        torch.manual_seed(0)
        model = BertModel(cfg).eval()
        a = build_adapter("sparse", r=2, seed=0, target_modules=["query", "value"], saved_input_dtype=dtype)
        a.attach(model)
        perturb(a)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids).last_hidden_state
        out.square().sum().backward()
        grads = {n: layer.values.grad.clone() for n, layer in a.layers().items()}
        return out.detach(), grads, sum(storages.values())

    y32, g32, bytes32 = run(None)
    y16, g16, bytes16 = run("bfloat16")
    assert torch.equal(y16, y32)
    # per layer, query and value read one input (4·8 tokens × 32 features): kept once, now in 2 bytes, not 4
    assert bytes32 - bytes16 == cfg.num_hidden_layers * 4 * 8 * 32 * 2
    for n in g32:
        assert not torch.equal(g16[n], g32[n])
        torch.testing.assert_close(g16[n], g32[n], rtol=0.05, atol=0.05 * float(g32[n].abs().max()))
    with pytest.raises(UserError, match="saved_input_dtype"):
        build_adapter("sparse", saved_input_dtype="int8")
