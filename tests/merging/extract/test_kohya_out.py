"""Kohya-format LoRA outputs: written by us, loaded by diffusers' `load_lora_weights` on a tiny Stable Diffusion
pipeline (UNet and text encoder), they equal our in-memory deltas; merges of Kohya inputs write Kohya outputs."""

import pytest
import torch
from safetensors.torch import save_file

from merging import run_merge
from merging.extract import run_extract
from peft_lab.errors import UserError
from peft_lab.tree import LowRank, Tree, load_tree, save_tree
from peft_lab.tree.safetensors import TREE_KIND_KEY
from tests.helpers.adapters import tiny_unet
from tests.helpers.diffusion import fused_deltas, tiny_pipeline, tiny_text_encoder


def _lora_tree(model, r=3, seed=0) -> Tree:
    """Random LoRA deltas on every Linear and Conv2d of `model` (keyed by its weight names)."""
    g = torch.Generator().manual_seed(seed)
    leaves = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            w = mod.weight
            B = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=g)
            A = torch.randn(r, *w.shape[1:], generator=g) * 0.1
            leaves[f"{name}.weight"] = LowRank(B, A, 0.5, w.shape)
    return Tree(leaves, meta={TREE_KIND_KEY: "delta"})


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_kohya_output_loads_in_diffusers_and_equals_our_delta(tmp_path, component):
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    model = unet if component == "unet" else te
    model.save_pretrained(tmp_path / "base")
    delta = _lora_tree(model)
    save_tree(delta, tmp_path / "delta.safetensors", metadata={TREE_KIND_KEY: "delta"})
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base"),
        "models": [str(tmp_path / "delta.safetensors")],
        "out_format": "adapter",
        "adapter_format": "kohya",
    }
    out = run_merge(recipe, tmp_path / "kohya", progress=False)
    from safetensors import safe_open

    keys = list(safe_open(out / "pytorch_lora_weights.safetensors", "pt").keys())
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    assert keys and all(k.startswith(prefix) for k in keys)
    fused = fused_deltas(tiny_pipeline(unet=unet, text_encoder=te), out)[component]
    assert sorted(fused) == sorted(delta)
    for name, leaf in delta.items():
        torch.testing.assert_close(fused[name], leaf.dense(), rtol=1e-5, atol=1e-6, msg=name)


def test_extracting_a_unet_finetune_to_kohya(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "ft")
    out = run_extract(tmp_path / "base", tmp_path / "ft", tmp_path / "out", rank=4, format="kohya")
    fresh = tiny_unet()
    fresh.load_state_dict(load_tree(tmp_path / "base").to_state_dict())
    fused = fused_deltas(tiny_pipeline(unet=fresh), out)["unet"]
    ours = load_tree(out / "pytorch_lora_weights.safetensors", base=load_tree(tmp_path / "base"))
    assert len(ours) == len(fused) > 50
    for name, leaf in ours.items():
        torch.testing.assert_close(fused[name], leaf.dense(), rtol=1e-5, atol=1e-6, msg=name)
    report = (out / "adapter_report.csv").read_text()
    assert "a Kohya LoRA has no biases" in report and "carries no whole modules" in report


def test_merging_kohya_inputs_into_a_kohya_output(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "base")
    files = []
    for i in range(2):
        sd = {}
        for name, leaf in _lora_tree(unet, r=2 + i, seed=i).items():
            k = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = leaf.A, leaf.B
            sd[f"{k}.alpha"] = torch.tensor(float(leaf.rank) / 2)  # alpha / r = 0.5
        save_file(sd, tmp_path / f"k{i}.safetensors")
        files.append(str(tmp_path / f"k{i}.safetensors"))
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": f, "parameters": {"weight": w}} for f, w in zip(files, (0.6, 0.3), strict=True)],
    }
    run_merge(recipe, tmp_path / "model", progress=False)
    out = run_merge({**recipe, "out_format": "adapter", "adapter_format": "kohya"}, tmp_path / "k", progress=False)
    fused = fused_deltas(tiny_pipeline(unet=unet), out)["unet"]
    b, m = load_tree(tmp_path / "base"), load_tree(tmp_path / "model")
    for name, got in fused.items():
        torch.testing.assert_close(got, m[name].dense() - b[name].dense(), rtol=1e-4, atol=1e-5, msg=name)


def test_kohya_needs_a_known_component(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    save_tree(Tree.from_module(model), tmp_path / "base.safetensors")
    with torch.no_grad():
        model[0].weight.add_(1.0)
    save_tree(Tree.from_module(model), tmp_path / "ft.safetensors")
    with pytest.raises(UserError, match="cannot tell .* UNet or a text encoder"):
        run_extract(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "o", rank=2, format="kohya")
    assert not (tmp_path / "o").exists()
    out = run_extract(
        tmp_path / "base.safetensors",
        tmp_path / "ft.safetensors",
        tmp_path / "o",
        rank=2,
        format="kohya",
        component="te2",
    )
    assert "lora_te2_0.lora_down.weight" in open(out / "pytorch_lora_weights.safetensors", "rb").read(4096).decode(
        errors="ignore"
    )
