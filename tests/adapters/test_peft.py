"""Cross-checks with PEFT: our lora/pissa/kronecker dirs load with `PeftModel.from_pretrained` (classification head
included) and give the same outputs; PEFT-written dirs load with `load_adapter`."""

from __future__ import annotations

import json

import pytest
import torch

from peft_lab.adapters import load_adapter
from tests.helpers.adapters import make, perturb, snapshot

PEFT_BACKED = ["lora", "pissa", "kronecker"]


# transformers and safetensors are imported inside the tests: importing transformers imports Triton, which must
# happen after tests/test_kernels_* set TRITON_INTERPRET at collection time on machines without a GPU


def load_file(path):
    from safetensors.torch import load_file as _load

    return _load(path)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=3
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    return model, cfg, snapshot(model)


def _fresh(cfg, sd0):
    from transformers import BertForSequenceClassification

    m = BertForSequenceClassification(cfg).eval()
    m.load_state_dict(sd0)
    return m


X = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", PEFT_BACKED)
def test_saved_dir_loads_in_peft_with_the_head(name, tmp_path):
    from peft import PeftModel

    model, cfg, sd0 = _bert()
    adapter = make(name)
    adapted = adapter.attach(model)
    perturb(adapter, 0.05)
    y = adapted(input_ids=X).logits
    adapter.save(tmp_path / "ad")
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert any("classifier" in k for k in saved), "the classification head must be saved"
    peft_model = PeftModel.from_pretrained(_fresh(cfg, sd0), str(tmp_path / "ad"))
    torch.testing.assert_close(peft_model(input_ids=X).logits, y, rtol=1e-5, atol=1e-5)


def test_pissa_conversion_reproduces_the_trained_pissa_model(tmp_path):
    """The converted LoRA on the ORIGINAL weights == the trained PiSSA model (W_res + s·B A)."""
    from peft import PeftModel

    model, cfg, sd0 = _bert()
    adapter = make("pissa")
    adapted = adapter.attach(model)
    # the init moved the principal part out of the base weights ...
    w = adapted.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert not torch.allclose(w, sd0["bert.encoder.layer.0.attention.self.query.weight"])
    # ... and the converted delta is zero at step 0 (B = B0, A = A0)
    for leaf in adapter.delta_tree().values():
        assert float(leaf.dense().abs().max()) < 1e-6
    # one real optimisation step rather than a random perturbation
    opt = torch.optim.SGD(list(adapter.trainable_parameters().values()), lr=0.5)
    adapted.train()
    torch.nn.functional.cross_entropy(adapted(input_ids=X).logits, torch.tensor([0, 1, 2])).backward()
    opt.step()
    adapted.eval()
    y = adapted(input_ids=X).logits
    adapter.save(tmp_path / "ad")
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 8 and conf["init_lora_weights"] is True
    assert sorted(conf["modules_to_save"]) == ["classifier"]
    peft_model = PeftModel.from_pretrained(_fresh(cfg, sd0), str(tmp_path / "ad"))
    torch.testing.assert_close(peft_model(input_ids=X).logits, y, rtol=1e-5, atol=1e-5)
    # our load rebuilds the PiSSA state (rank r on W_res), not a rank-2r LoRA
    back = load_adapter(_fresh(cfg, sd0), tmp_path / "ad")
    layer = back.layers()["bert.encoder.layer.0.attention.self.query"]
    assert layer.lora_A["default"].weight.shape[0] == 4
    assert torch.equal(layer.base_layer.weight, w), "W_res must be rebuilt bit for bit"
    torch.testing.assert_close(back.model(input_ids=X).logits, y, rtol=1e-6, atol=1e-6)


def test_pissa_factors_match_peft_own_conversion(tmp_path):
    """Our converted LoRA factors equal those PEFT writes with path_initial_model_for_weight_conversion (which,
    in PEFT 0.21.2, leaves the head out; we keep it)."""
    from peft import LoraConfig, get_peft_model

    model, cfg, sd0 = _bert()
    adapter = make("pissa")
    adapter.attach(model)
    perturb(adapter, 0.05)
    adapter.save(tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))

    torch.manual_seed(0)
    pm = get_peft_model(
        _fresh(cfg, sd0), LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"], init_lora_weights="pissa")
    )
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    ref_params = dict(adapter.trainable_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(ref_params[n])
    pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    lora_keys = [k for k in ours if "lora_" in k]
    assert sorted(lora_keys) == sorted(theirs)
    for k in lora_keys:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    assert any("classifier" in k for k in ours)


@pytest.mark.parametrize("kind", ["lora", "kronecker"])
def test_peft_written_dir_loads_with_load_adapter(kind, tmp_path):
    """A dir written by PEFT itself (no peft-lab sidecar) loads and reproduces PEFT's outputs."""
    from peft import LoKrConfig, LoraConfig, get_peft_model

    model, cfg, sd0 = _bert()
    if kind == "lora":
        pc = LoraConfig(
            r=3, lora_alpha=6, target_modules=["query", "key"], modules_to_save=["classifier"], init_lora_weights=False
        )
    else:
        pc = LoKrConfig(
            r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_weights=False
        )
    pm = get_peft_model(model, pc)
    y = pm(input_ids=X).logits
    pm.save_pretrained(str(tmp_path / "ad"))
    adapter = load_adapter(_fresh(cfg, sd0), tmp_path / "ad")
    assert adapter.name == kind
    torch.testing.assert_close(adapter.model(input_ids=X).logits, y, rtol=1e-6, atol=1e-6)
    assert adapter.config.r == pc.r
    assert set(adapter.delta_tree()) >= {"classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"}


@pytest.mark.parametrize("name", PEFT_BACKED)
def test_exact_targets_even_where_peft_suffix_matching_would_take_more(name, tmp_path):
    """`re:^fc1$` adapts the top-level fc1 only, although PEFT's own matching of "fc1" would also take block.fc1."""
    from peft import PeftModel

    from tests.helpers.adapters import MLP

    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 8)
            self.block = MLP()

        def forward(self, x):
            return self.block(torch.nn.functional.pad(self.fc1(x), (0, 25)))

    torch.manual_seed(0)
    model = Nested().eval()
    sd0 = snapshot(model)
    adapter = make(name, target_modules=["re:^fc1$"])
    adapted = adapter.attach(model)
    assert list(adapter.delta_tree()) == ["fc1.weight"]
    perturb(adapter, 0.05)
    x = torch.randn(2, 8)
    y = adapted(x)
    adapter.save(tmp_path / "ad")
    fresh = Nested().eval()
    fresh.load_state_dict(sd0)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "ad"))
    torch.testing.assert_close(peft_model(x), y)
    assert type(peft_model.base_model.model.block.fc1) is torch.nn.Linear
