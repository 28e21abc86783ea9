"""Kohya / LyCORIS single-file adapters as delta trees: LoRA read as diffusers' load_lora_weights applies it, LoHa
and LoKr as PEFT's LyCORIS ports compute them, SDXL's SGM/LDM names through diffusers' key conversion, and every
bad file refused with the keys at fault."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from peft_lab.errors import UserError
from peft_lab.tree import Tree, load_tree
from tests.helpers.adapters import tiny_unet
from tests.helpers.diffusion import fused_deltas, tiny_pipeline

UNET_MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",  # a 3x3 convolution
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
]


@pytest.fixture
def unet_dir(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    return tmp_path / "unet", unet


def _kohya(module: str, prefix: str = "lora_unet_") -> str:
    return prefix + module.replace(".", "_")


def _random_lora(unet, modules, r=3, alpha=5.0):
    g = torch.Generator().manual_seed(1)
    sd = {}
    for m in modules:
        w = unet.get_submodule(m).weight
        k = _kohya(m)
        sd[f"{k}.lora_down.weight"] = torch.randn(r, *w.shape[1:], generator=g)
        sd[f"{k}.lora_up.weight"] = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=g)
        sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


def test_kohya_lora_reads_as_diffusers_applies_it(unet_dir, tmp_path):
    d, unet = unet_dir
    (tmp_path / "lora").mkdir()
    save_file(_random_lora(unet, UNET_MODULES), tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    ours = load_tree(tmp_path / "lora" / "pytorch_lora_weights.safetensors", base=load_tree(d))
    theirs = fused_deltas(tiny_pipeline(unet=unet), tmp_path / "lora")["unet"]
    assert sorted(ours) == sorted(f"{m}.weight" for m in UNET_MODULES) == sorted(theirs)
    for name, leaf in ours.items():
        torch.testing.assert_close(leaf.dense(), theirs[name], rtol=1e-5, atol=1e-5, msg=name)


def _peft_factors(unet, kind):
    """A PEFT LoHa / LoKr adapter on the UNet with random factors: ({kohya key: tensor}, {weight: PEFT's delta})."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    targets = ["to_q", "proj_in", "conv1"]
    if kind == "loha":
        cfg = LoHaConfig(r=2, alpha=3, target_modules=targets, init_weights=False)
    else:  # r=1: both factors rank-decomposed, where LyCORIS and PEFT scale alike (alpha/r)
        cfg = LoKrConfig(r=1, alpha=3, target_modules=targets, init_weights=False, decompose_both=True)
    pm = get_peft_model(unet, cfg)
    sd, deltas = {}, {}
    for name, layer in pm.base_model.model.named_modules():
        if not hasattr(layer, "get_delta_weight") or not hasattr(layer, "scaling") or "default" not in layer.scaling:
            continue
        k = _kohya(name)
        for pname, p in layer.named_parameters():
            part = pname.split(".")[0]
            if part.startswith(("hada_", "lokr_")):
                sd[f"{k}.{part}"] = p.detach().clone()
        sd[f"{k}.alpha"] = torch.tensor(3.0)
        deltas[f"{name}.weight"] = layer.get_delta_weight("default").detach()
    return sd, deltas


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_loha_and_lokr_read_as_peft_computes_them(unet_dir, tmp_path, kind):
    d, unet = unet_dir
    sd, deltas = _peft_factors(unet, kind)
    assert any("conv1" in n for n in deltas) and len(deltas) >= 5
    save_file(sd, tmp_path / f"{kind}.safetensors")
    ours = load_tree(tmp_path / f"{kind}.safetensors", base=load_tree(d))
    assert sorted(ours) == sorted(deltas)
    for name, want in deltas.items():
        torch.testing.assert_close(ours[name].dense(), want, rtol=1e-5, atol=1e-6, msg=name)


def test_lokr_with_two_full_factors_is_not_scaled(unet_dir, tmp_path):
    """LyCORIS (and diffusers) apply no alpha scaling when neither Kronecker factor is rank-decomposed."""
    d, _ = unet_dir
    w1, w2 = torch.randn(4, 2), torch.randn(4, 8)  # to_q is 16x16
    k = _kohya(UNET_MODULES[0])
    save_file({f"{k}.lokr_w1": w1, f"{k}.lokr_w2": w2, f"{k}.alpha": torch.tensor(7.0)}, tmp_path / "k.safetensors")
    leaf = load_tree(tmp_path / "k.safetensors", base=load_tree(d))[f"{UNET_MODULES[0]}.weight"]
    torch.testing.assert_close(leaf.dense(), torch.kron(w1, w2))


def test_sgm_layout_names_map_through_diffusers(unet_dir, tmp_path):
    """SDXL-style files name UNet modules in the original layout (input_blocks, in_layers, ...)."""
    d, unet = unet_dir
    same = _random_lora(unet, ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1", "conv_in"])
    renames = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": "lora_unet_input_blocks_1_1_proj_in",
        "lora_unet_down_blocks_0_resnets_0_conv1": "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_conv_in": "lora_unet_input_blocks_0_0",
    }
    sgm = {renames[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in same.items()}
    save_file(same, tmp_path / "same.safetensors")
    save_file(sgm, tmp_path / "sgm.safetensors")
    base = load_tree(d)
    a, b = load_tree(tmp_path / "same.safetensors", base=base), load_tree(tmp_path / "sgm.safetensors", base=base)
    assert sorted(a) == sorted(b) and len(a) == 3
    for n in a:
        torch.testing.assert_close(a[n].dense(), b[n].dense(), msg=n)


def test_other_components_are_left_out_with_a_warning(unet_dir, tmp_path, caplog):
    d, unet = unet_dir
    sd = _random_lora(unet, UNET_MODULES[:1])
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(2, 16)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(16, 2)
    save_file(sd, tmp_path / "both.safetensors")
    with caplog.at_level(logging.WARNING, logger="peft_lab.tree"):
        t = load_tree(tmp_path / "both.safetensors", base=load_tree(d))
    assert list(t) == [f"{UNET_MODULES[0]}.weight"]
    assert "lora_te_" in caplog.text and "left out" in caplog.text


def test_unmapped_keys_are_named(unet_dir, tmp_path):
    d, unet = unet_dir
    sd = _random_lora(unet, UNET_MODULES[:1])
    sd["lora_unet_down_blocks_0_nonexistent_layer.lora_down.weight"] = torch.randn(2, 16)
    sd["lora_unet_down_blocks_0_nonexistent_layer.lora_up.weight"] = torch.randn(16, 2)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="lora_unet_down_blocks_0_nonexistent_layer"):
        load_tree(tmp_path / "bad.safetensors", base=load_tree(d))
    # a file for another model entirely: nothing maps
    save_file({"lora_unet_foo_bar.lora_down.weight": torch.randn(2, 3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(UserError, match="cannot map these Kohya keys.*lora_unet_foo_bar"):
        load_tree(tmp_path / "foreign.safetensors", base=load_tree(d))


@pytest.mark.parametrize("factor,what", [("hada_t1", "Tucker"), ("dora_scale", "DoRA"), ("lora_weird", "unknown")])
def test_unsupported_factors_are_refused(unet_dir, tmp_path, factor, what):
    d, unet = unet_dir
    sd = _random_lora(unet, UNET_MODULES[:1])
    sd[f"{_kohya(UNET_MODULES[0])}.{factor}"] = torch.randn(2)
    save_file(sd, tmp_path / "x.safetensors")
    with pytest.raises(UserError, match=what):
        load_tree(tmp_path / "x.safetensors", base=load_tree(d))


def test_needs_a_base_and_complete_factors(tmp_path):
    A, B = torch.randn(2, 3), torch.randn(4, 2)
    save_file({"lora_unet_a.lora_down.weight": A, "lora_unet_a.lora_up.weight": B}, tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="give the base model"):
        load_tree(tmp_path / "x.safetensors")
    t = load_tree(tmp_path / "x.safetensors", base=Tree({"a.weight": torch.zeros(4, 3)}))
    torch.testing.assert_close(t["a.weight"].dense(), B @ A)  # no alpha: scale 1
    save_file({"lora_unet_a.lora_down.weight": A}, tmp_path / "y.safetensors")
    with pytest.raises(UserError, match="incomplete adapter factors"):
        load_tree(tmp_path / "y.safetensors", base=Tree({"a.weight": torch.zeros(4, 3)}))
