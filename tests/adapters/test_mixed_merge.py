"""Saved dirs of every adapter kind open as delta trees on one base and combine in one task-arithmetic merge.

(The streaming merge executor, `peft-lab merge`, is another area's; this checks what it is handed: mixed
structured leaves keyed by the same base names, each equal to its adapter's own delta.)
"""

from __future__ import annotations

import torch

from peft_lab.adapters import ADAPTERS
from peft_lab.tree import LDU, Kronecker, LowRank, Sparse, apply, check_compatible, load_tree
from tests.helpers.adapters import make, perturb

KINDS = {"lora": LowRank, "pissa": LowRank, "kronecker": Kronecker, "loldu": LDU, "sparse": Sparse}


def test_mixed_adapter_dirs_merge_as_task_vectors(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification  # lazily: see test_adapters_peft.py

    cfg = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, num_labels=3
    )
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    base_tree = load_tree(tmp_path / "base")
    deltas, dirs = {}, {}
    for name in ADAPTERS.names():
        model = BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
        adapter = make(name)
        adapter.attach(model)
        perturb(adapter, 0.05)
        deltas[name] = adapter.delta_tree()
        dirs[name] = tmp_path / name
        adapter.save(dirs[name])
    trees = {name: load_tree(d, base=base_tree) for name, d in dirs.items()}
    check_compatible(base_tree, trees, allow_subset=True)  # every kind names base weights with their shapes
    q = "bert.encoder.layer.0.attention.self.query.weight"
    for name, tree in trees.items():
        if name in KINDS:  # structured leaves stay structured on disk
            assert isinstance(tree[q], KINDS[name]), f"{name}: {tree[q]!r}"
        assert set(tree) == set(deltas[name])
        for k in tree:
            torch.testing.assert_close(
                tree[k].dense(), deltas[name][k].dense(), rtol=1e-6, atol=1e-7, msg=f"{name} {k}"
            )
    # task arithmetic over the mixed kinds: base + λ Σ_i Δ_i, tree by tree
    lam = 0.5
    merged = base_tree
    for tree in trees.values():
        merged = apply(merged, tree, lam)
    merged_sd = merged.to_state_dict()
    base_sd = base_tree.to_state_dict()
    for k, w in merged_sd.items():
        expect = base_sd[k].float() + lam * sum(d[k].dense() for d in deltas.values() if k in d)
        torch.testing.assert_close(w.float(), expect, rtol=1e-5, atol=1e-6, msg=k)
    touched = {k for d in deltas.values() for k in d}
    assert touched >= {"classifier.weight", "bert.encoder.layer.1.attention.self.value.weight"}
    # and the merged weights run as a plain model
    plain = BertForSequenceClassification(cfg).eval()
    plain.load_state_dict(merged_sd)
    assert torch.isfinite(plain(input_ids=torch.randint(0, 60, (2, 5))).logits).all()
