"""The adapter contract, run over every registered adapter (a new adapter is covered by registering it).

Odd shapes (17x33, 33x17), float32 and bfloat16, a conv net and a tiny diffusers UNet.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from peft_lab.adapters import ADAPTERS, build_adapter, load_adapter
from peft_lab.errors import UserError
from peft_lab.tree import Tree, apply, load_tree
from tests.conftest import REPO
from tests.helpers.adapters import MLP, ConvNet, assert_close, make, perturb, small_params, snapshot, tiny_unet

NAMES = ADAPTERS.names()
DTYPES = [torch.float32, torch.bfloat16]


def _mlp(dtype):
    torch.manual_seed(0)
    model = MLP().to(dtype).eval()
    return model, snapshot(model), torch.randn(4, 33).to(dtype)


def _attach(name, model, **extra):
    adapter = make(name, modules_to_save=["head"], **extra)
    return adapter, adapter.attach(model)


def test_registry_has_the_five_adapters():
    assert {"lora", "pissa", "kronecker", "loldu", "sparse"} <= set(NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_function_preserving_at_init(name, dtype):
    model, _, x = _mlp(dtype)
    y0 = model(x)
    _, adapted = _attach(name, model)
    assert_close(adapted(x), y0, dtype, f"{name} at init")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_delta_tree_agrees_with_model(name, dtype):
    model, sd0, x = _mlp(dtype)
    adapter, adapted = _attach(name, model)
    perturb(adapter)
    y = adapted(x)
    tree = adapter.delta_tree()
    assert set(tree) == {"fc1.weight", "fc2.weight", "head.weight", "head.bias"}
    for k, leaf in tree.items():
        assert tuple(leaf.shape) == tuple(sd0[k].shape), k
        assert float(leaf.dense().abs().max()) > 0, f"{k}: zero delta after perturbing"
    plain = MLP().to(dtype).eval()
    plain.load_state_dict(apply(Tree(sd0), tree).to_state_dict())
    assert_close(plain(x), y, dtype, f"{name}: base + delta tree vs adapted model")
    # the tree is a snapshot: training on does not change it
    before = {k: leaf.dense().clone() for k, leaf in tree.items()}
    perturb(adapter)
    assert all(torch.equal(before[k], leaf.dense()) for k, leaf in tree.items())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_merge_then_unmerge_restores_weights(name, dtype):
    model, _, x = _mlp(dtype)
    adapter, adapted = _attach(name, model)
    perturb(adapter)
    y = adapted(x)
    live = snapshot(adapted)
    adapter.merge()
    adapter.merge()  # a second merge is a no-op
    assert adapter.merged
    assert_close(adapted(x), y, dtype, f"{name}: merged model")
    changed = [k for k, v in snapshot(adapted).items() if not torch.equal(v, live[k])]
    assert changed, "merge changed no weight"
    adapter.unmerge()
    for k, v in snapshot(adapted).items():
        w = live[k].float()
        atol = (1e-6 if dtype == torch.float32 else 2**-7) * (float(w.abs().max()) + 1e-12)
        assert float((v.float() - w).abs().max()) <= atol, f"{name}: {k} not restored by unmerge"
    assert_close(adapted(x), y, dtype, f"{name}: unmerged model")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_exactly_the_trainable_parameters(name, dtype):
    model, _, x = _mlp(dtype)
    adapter, adapted = _attach(name, model)
    perturb(adapter)  # LoRA-style inits have B = 0, which zeroes A's gradient
    trainable = adapter.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable.values())
    adapted.train()
    adapted(x).float().pow(2).sum().backward()
    got = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert got == set(trainable)
    for n, p in trainable.items():
        assert float(p.grad.abs().max()) > 0, f"{name}: zero gradient for {n}"
    assert adapter.num_trainable() == sum(p.numel() for p in trainable.values())
    assert adapter.num_trainable() == sum(p.numel() for p in adapted.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, dtype, tmp_path):
    model, sd0, x = _mlp(dtype)
    adapter, adapted = _attach(name, model)
    perturb(adapter)
    y = adapted(x)
    adapter.save(tmp_path / "ad")
    fresh = MLP().to(dtype).eval()
    fresh.load_state_dict(sd0)
    with torch.no_grad():  # a new head is initialised at random: the saved adapter must not depend on it
        fresh.head.weight.normal_()
    fresh_copy = MLP().to(dtype)
    fresh_copy.load_state_dict(fresh.state_dict())
    loaded = load_adapter(fresh, tmp_path / "ad")
    assert type(loaded) is type(adapter)
    assert loaded.config == adapter.config
    assert loaded.num_trainable() == adapter.num_trainable()
    assert_close(loaded.model(x), y, dtype, f"{name}: reloaded adapter")
    # after a reload the delta tree is relative to the model it was loaded onto (here: another head init)
    plain = MLP().to(dtype).eval()
    plain.load_state_dict(apply(Tree(snapshot(fresh_copy)), loaded.delta_tree()).to_state_dict())
    assert_close(plain(x), y, dtype, f"{name}: fresh base + reloaded delta tree")
    # the saved dir is a delta tree for `peft-lab merge`, equal to the adapter's own
    disk = load_tree(tmp_path / "ad", base=Tree(sd0))
    mem = adapter.delta_tree()
    assert set(disk) == set(mem)
    for k in mem:
        assert_close(disk[k].dense(), mem[k].dense(), dtype, f"{name}: {k} on disk")


@pytest.mark.parametrize("name", NAMES)
def test_save_refuses_a_non_empty_dir_and_leaves_it(name, tmp_path):
    model, _, _ = _mlp(torch.float32)
    adapter, _ = _attach(name, model)
    out = tmp_path / "ad"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        adapter.save(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("name", NAMES)
def test_unet_attention_and_conv_layers(name):
    """Default targets on a diffusers UNet are its attention projections; conv layers where the adapter allows."""
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    sd0 = snapshot(unet)
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([3, 50]), torch.randn(2, 5, 16))

    def run(m):
        return m(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample

    y0 = run(unet)
    probe = make(name)
    conv_ok = torch.nn.Conv2d in probe.supported
    targets = ["to_q", "to_k", "to_v", "to_out.0"] + (["conv1", "conv2"] if conv_ok else [])
    adapter = make(name, target_modules=targets)
    adapted = adapter.attach(unet)
    assert_close(run(adapted), y0, torch.float32, f"{name} on a UNet at init")
    perturb(adapter, 0.02)
    y = run(adapted)
    tree = adapter.delta_tree()
    assert any(k.endswith("attn1.to_q.weight") for k in tree)
    assert any(k.endswith("resnets.0.conv1.weight") for k in tree) == conv_ok
    plain = tiny_unet().eval()
    plain.load_state_dict(apply(Tree(sd0), tree).to_state_dict())
    assert_close(run(plain), y, torch.float32, f"{name}: UNet base + delta tree")
    if not conv_ok:
        with pytest.raises(UserError, match="Conv2d"):
            make(name, target_modules=["conv1"]).attach(tiny_unet())


@pytest.mark.parametrize("name", NAMES)
def test_targets_matching_nothing_list_what_exists(name):
    with pytest.raises(UserError) as e:
        make(name, target_modules=["nonexistent_proj"]).attach(MLP())
    msg = str(e.value)
    assert "nonexistent_proj" in msg and "fc1" in msg and "head" in msg


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_layer_type_is_a_clear_error(name):
    model = ConvNet()
    before = snapshot(model)
    with pytest.raises(UserError, match="LayerNorm") as e:
        make(name, target_modules=["proj", "norm"]).attach(model)
    assert "norm" in str(e.value)
    # nothing was changed on the way to the error
    assert type(model.proj) is torch.nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_a_user_error(name):
    with pytest.raises(UserError, match="no parameter"):
        build_adapter(name, rank_typo=3)


@pytest.mark.parametrize("name", NAMES)
def test_conf_yaml_matches_the_config_dataclass(name):
    path = REPO / "conf" / "adapter" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("# peft-lab train adapter=" + name), "a config opens with the command that runs it"
    node = yaml.safe_load(text)
    assert node.pop("name") == name
    cls = ADAPTERS.get(name)
    assert set(node) == set(cls.Config.__dataclass_fields__), "YAML keys must be exactly the config's fields"
    adapter = build_adapter(name, **node)
    assert adapter.config == cls.Config(), "the YAML holds the dataclass defaults"
    for r in (4, 8):  # the sweep `adapter.r=4,8` works for every adapter
        assert build_adapter(name, **{**node, "r": r}).config.r == r


@pytest.mark.parametrize("name", NAMES)
def test_hydra_node_builds_adapter(name):
    """What the training app hands over: an OmegaConf node with `name` and list-valued fields."""
    from omegaconf import OmegaConf

    node = OmegaConf.create({"name": name, **small_params(name), "target_modules": ["fc1", "fc2"]})
    adapter = build_adapter(**node)
    assert adapter.config.target_modules == ["fc1", "fc2"]
    assert isinstance(adapter.config.target_modules, list)


def test_config_values_are_typed_before_the_adapter_is_built():
    """Values from a YAML file or an override are checked against the config's annotations: numeric strings
    are numbers, a single pattern is a one-element list, and wrong types name the key and what it takes."""
    assert build_adapter("lora", dropout="1e-3").config.dropout == 1e-3
    assert build_adapter("lora", target_modules="fc1").config.target_modules == ["fc1"]
    for params, match in [
        ({"use_rslora": "yes"}, r"adapter\.use_rslora='yes' must be true or false"),
        ({"alpha": "x"}, r"adapter\.alpha='x' must be a finite number or null"),
        ({"r": "abc"}, r"adapter\.r='abc' must be an integer"),
        ({"r": 2.5}, r"adapter\.r=2\.5 must be an integer"),
        ({"dropout": 1.0}, r"adapter\.dropout=1\.0 is out of range: must be in \[0, 1\)"),
        ({"target_modules": ["fc1", 1]}, r"adapter\.target_modules=\['fc1', 1\] must be a list of strings"),
    ]:
        with pytest.raises(UserError, match=match) as e:
            build_adapter("lora", **params)
        assert str(e.value).startswith("adapter=lora: ")
    with pytest.raises(UserError, match=r"adapter\.density='half' must be a finite number or null"):
        build_adapter("sparse", density="half")
    with pytest.raises(UserError, match=r"adapter\.factor='x' must be an integer"):
        build_adapter("kronecker", factor="x")
