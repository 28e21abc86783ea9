"""Opening inputs as trees and saving trees: HF model dirs (sharded), PEFT and peft-lab adapter dirs, pickles,
streamed writes."""

import json

import pytest
import torch

from peft_lab.errors import UserError
from peft_lab.tree import Lazy, Sparse, Tree, load_tree, read_header, save_tree


@pytest.fixture
def tiny_bert_dir(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig

    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, num_labels=3
    )
    model = AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base", model


def test_sharded_dir_loads_in_transformers(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    model = BertModel(cfg)
    cfg.save_pretrained(tmp_path / "m")
    tree = Tree.from_module(model)
    files = save_tree(tree, tmp_path / "m", max_shard_size="8KB", metadata={"k": "v"})
    assert len(files) > 1
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = AutoModel.from_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # and our own lazy reader sees the same tensors in the same order
    lazy = load_tree(tmp_path / "m")
    assert list(lazy) == list(tree)
    assert all(isinstance(leaf, Lazy) for leaf in lazy.values())


def test_dtype_cast_on_save_keeps_int_buffers(tmp_path):
    tree = Tree({"w": torch.randn(3, 3), "ids": torch.arange(5)})
    save_tree(tree, tmp_path / "x.safetensors", dtype=torch.bfloat16)
    header, meta = read_header(tmp_path / "x.safetensors")
    assert header["w"]["dtype"] == "BF16" and header["ids"]["dtype"] == "I64"
    assert meta["format"] == "pt"


@pytest.mark.parametrize("kind", ["lora", "lora_rs", "lokr"])
def test_peft_dirs_open_as_deltas_matching_peft_merge(tiny_bert_dir, tmp_path, kind):
    from peft import LoKrConfig, LoraConfig, get_peft_model

    base_dir, model = tiny_bert_dir
    if kind == "lokr":
        cfg = LoKrConfig(r=2, alpha=4, target_modules=["query", "intermediate.dense"], init_weights=False)
    else:
        cfg = LoraConfig(
            r=2,
            lora_alpha=6,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            init_lora_weights=False,
            use_rslora=kind == "lora_rs",
            rank_pattern={"value": 3},
        )
    pm = get_peft_model(model, cfg)
    if kind != "lokr":
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    pm.save_pretrained(tmp_path / "ad")
    base = load_tree(base_dir)
    d = load_tree(tmp_path / "ad", base=base)
    merged = pm.merge_and_unload().state_dict()
    assert d, "no deltas"
    for name, leaf in d.items():
        torch.testing.assert_close(leaf.dense(), merged[name] - base[name].dense(), rtol=1e-5, atol=1e-6, msg=name)
    if kind != "lokr":
        assert "classifier.weight" in d


def test_peft_dir_needs_matching_base(tiny_bert_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir, model = tiny_bert_dir
    get_peft_model(model, LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "ad")
    other = Tree({"encoder.x.weight": torch.zeros(2, 2)}, source="other")
    with pytest.raises(UserError, match="does not have"):
        load_tree(tmp_path / "ad", base=other)


def test_pickle_refused_unless_allowed(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle") as e:
        load_tree(tmp_path)
    assert "safetensors" in str(e.value) and "allow_pickle" in str(e.value)
    with pytest.raises(UserError, match="pickle"):
        load_tree(tmp_path / "pytorch_model.bin")
    t = load_tree(tmp_path, allow_pickle=True)
    assert torch.equal(t["w"].dense(), torch.ones(2))


def test_a_damaged_pickle_is_a_user_error_but_memory_errors_propagate(tmp_path, monkeypatch):
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match=r"pytorch_model\.bin: cannot load even with allow_pickle"):
        load_tree(bad, allow_pickle=True)
    torch.save({"w": torch.ones(2)}, bad)

    def out_of_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(MemoryError):
        load_tree(bad, allow_pickle=True)


def test_own_adapter_dir_opens_as_delta_tree(tmp_path):
    from peft_lab.tree import is_delta
    from peft_lab.tree.load import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from peft_lab.tree.safetensors import TREE_KIND_KEY

    d = tmp_path / "ad"
    d.mkdir()
    (d / ADAPTER_CONFIG).write_text('{"adapter": "sparse"}')
    delta_tree = Tree({"encoder.w": Sparse(torch.tensor([1, 2]), torch.tensor([0.5, -1.0]), (2, 2))})
    save_tree(delta_tree, d / ADAPTER_WEIGHTS, metadata={TREE_KIND_KEY: "delta"})
    base = Tree({"bert.encoder.w": torch.zeros(2, 2)})
    t = load_tree(d, base=base)
    assert is_delta(t) and list(t) == ["bert.encoder.w"]
    assert torch.equal(t["bert.encoder.w"].dense(), torch.tensor([[0.0, 0.5], [-1.0, 0.0]]))
    assert not is_delta(base)
    with pytest.raises(UserError, match="do not fit"):
        load_tree(d, base=Tree({"encoder.w": torch.zeros(3, 2)}))


def test_save_tree_streams_chunked_leaves(tmp_path):
    """A leaf exposing `chunks(dtype)` is written slice by slice and reads back as the whole tensor."""
    from peft_lab.tree import Thunk

    full = torch.randn(5, 7)

    class Chunked(Thunk):
        def chunks(self, dtype):
            flat = full.reshape(-1).to(dtype)
            return (flat[i : i + 4] for i in range(0, flat.numel(), 4))

    leaf = Chunked(lambda: full, [], full.shape, torch.float32, name="w")
    save_tree(Tree({"w": leaf, "b": torch.ones(3)}), tmp_path / "m.safetensors", dtype=torch.bfloat16)
    back = load_tree(tmp_path / "m.safetensors")
    assert torch.equal(back["w"].dense(None), full.to(torch.bfloat16))

    class Short(Thunk):
        def chunks(self, dtype):
            return iter([full.reshape(-1)[:10].to(dtype)])

    with pytest.raises(RuntimeError, match="declared"):
        save_tree(Tree({"w": Short(lambda: full, [], full.shape, torch.float32)}), tmp_path / "bad.safetensors")
