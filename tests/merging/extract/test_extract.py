"""`peft-lab extract` on tiny models: full-rank extraction reproduces the fine-tune through PeftModel.from_pretrained
(Linear, Embedding, Conv2d, GPT-2 Conv1D, lora_bias, modules_to_save for norms and a new head), the rank rules,
adapters as inputs, the report, both CLI forms, and every bad input refused before anything is written."""

import csv
import json

import pytest
import torch

from merging.extract import run_extract
from peft_lab.errors import UserError
from peft_lab.tree import Tree, load_tree, save_tree
from tests.helpers.adapters import ConvNet
from tests.helpers.merge import file_digests

BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)


@torch.no_grad()
def _perturb(model, scale=0.02, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture
def bert_pair(tmp_path):
    """A bare BERT base and a fine-tuned classifier of it (every tensor changed, a new head)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**BERT)).save_pretrained(tmp_path / "base")
    ft = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    _perturb(ft)
    ft.save_pretrained(tmp_path / "ft")
    return tmp_path / "base", tmp_path / "ft", ft.eval()


def _peft_classifier(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(123)  # the head PEFT replaces is random: a result must not depend on it
    m = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    return PeftModel.from_pretrained(m, str(adapter)).eval()


def _report(out):
    with open(out / "adapter_report.csv") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


X = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(5))


def test_full_rank_extraction_is_the_finetune_in_peft(bert_pair, tmp_path):
    base, ft_dir, ft = bert_pair
    out = run_extract(base, ft_dir, tmp_path / "out", rank=16, bias="lora", embeddings="save")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_bias"] and cfg["r"] == cfg["lora_alpha"] == 16
    assert cfg["base_model_name_or_path"] == str(base)
    assert {"classifier", "bert.embeddings.word_embeddings", "bert.embeddings.LayerNorm"} <= set(cfg["modules_to_save"])
    with torch.no_grad():
        got = _peft_classifier(base, out)(input_ids=X).logits
        torch.testing.assert_close(got, ft(input_ids=X).logits, rtol=1e-4, atol=1e-5)
    rows = _report(out)
    q = rows["bert.encoder.layer.0.attention.self.query.weight"]
    assert (q["action"], q["rank"], q["method"]) == ("lora", "16", "exact") and float(q["error"]) < 1e-5
    assert rows["classifier.weight"]["action"] == "saved" and "not in the base" in rows["classifier.weight"]["note"]
    assert rows["bert.encoder.layer.0.attention.self.query.bias"]["action"] == "lora_bias"
    rec = json.loads((out / "extract.json").read_text())
    assert rec["summary"]["lora_matrices"] == 7 and rec["settings"]["adapter_rank"] == 16


def test_default_policies_embedding_lora_and_biases_listed(bert_pair, tmp_path, caplog):
    base, ft_dir, ft = bert_pair
    out = run_extract(base, ft_dir, tmp_path / "out", rank=4)
    from safetensors import safe_open

    keys = set(safe_open(out / "adapter_model.safetensors", "pt").keys())
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A" in keys
    rows = _report(out)
    assert rows["bert.encoder.layer.0.output.dense.bias"]["action"] == "not carried"
    assert "embedding LoRA" in rows["bert.encoder.layer.0.output.dense.bias"]["note"]
    assert "not carried by the adapter" in caplog.text
    with torch.no_grad():
        # rank 4 of 16: closer to the fine-tune than the base with the fine-tuned head alone
        adapted = _peft_classifier(base, out)(input_ids=X).logits
        head_only = _peft_classifier(base, run_extract(base, ft_dir, tmp_path / "head", rank=1, embeddings="none"))
        target = ft(input_ids=X).logits
        assert (adapted - target).norm() < (head_only(input_ids=X).logits - target).norm()


def test_rank_pattern_and_energy(bert_pair, tmp_path):
    base, ft_dir, _ = bert_pair
    out = run_extract(base, ft_dir, tmp_path / "p", rank=8, rank_pattern={"query": 2, "word_embeddings": 3})
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["rank_pattern"][r"^bert\.encoder\.layer\.0\.attention\.self\.query"] == 2
    pm = _peft_classifier(base, out)
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self
    assert layer.query.lora_A["default"].weight.shape[0] == 2 and layer.key.lora_A["default"].weight.shape[0] == 8
    assert layer.query.scaling["default"] == 1.0
    e = _report(run_extract(base, ft_dir, tmp_path / "e", energy=0.5, max_rank=5))
    lora = [r for r in e.values() if r["action"] == "lora"]
    assert lora and all(float(r["energy"]) >= 0.5 or r["rank"] == "5" for r in lora)
    assert len({r["rank"] for r in lora}) > 1


def test_conv_and_shape_guessed_kinds(tmp_path):
    torch.manual_seed(0)
    base, ft = ConvNet(), ConvNet()
    ft.load_state_dict(base.state_dict())
    _perturb(ft)
    save_tree(Tree.from_module(base), tmp_path / "base.safetensors")
    save_tree(Tree.from_module(ft), tmp_path / "ft.safetensors")
    out = run_extract(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "out", rank=6)
    from peft import PeftModel

    pm = PeftModel.from_pretrained(base, str(out)).eval()
    assert pm.base_model.model.conv.lora_A["default"].weight.shape == (6, 3, 3, 3)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ft.eval()(x), rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_is_extracted_transposed(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(tmp_path / "b")
    ft = GPT2Model.from_pretrained(tmp_path / "b")
    _perturb(ft)
    ft.save_pretrained(tmp_path / "ft")
    out = run_extract(tmp_path / "b", tmp_path / "ft", tmp_path / "out", rank=16, bias="lora", embeddings="save")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"]
    pm = PeftModel.from_pretrained(GPT2Model.from_pretrained(tmp_path / "b"), str(out)).eval()
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            pm(input_ids=ids).last_hidden_state, ft.eval()(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4
        )


def test_adapters_as_inputs(bert_pair, tmp_path):
    from peft import LoKrConfig, LoraConfig, get_peft_model
    from transformers import BertModel

    base, _, _ = bert_pair
    torch.manual_seed(3)
    get_peft_model(
        BertModel.from_pretrained(base), LoKrConfig(r=4, alpha=4, target_modules=["query"], init_weights=False)
    ).save_pretrained(tmp_path / "lokr")
    out = run_extract(base, tmp_path / "lokr", tmp_path / "from_lokr", rank=3)
    b = load_tree(base)
    src, got = load_tree(tmp_path / "lokr", base=b), load_tree(out, base=b)
    for name, leaf in src.items():
        S = torch.linalg.svdvals(leaf.dense().double())
        opt = float((S[3:] ** 2).sum().sqrt() / S.norm())
        assert float((got[name].dense() - leaf.dense()).norm() / leaf.dense().norm()) <= opt * (1 + 1e-3) + 1e-6
    get_peft_model(
        BertModel.from_pretrained(base), LoraConfig(r=5, target_modules=["value"], init_lora_weights=False)
    ).save_pretrained(tmp_path / "lo")
    rows = _report(run_extract(base, tmp_path / "lo", tmp_path / "from_lora", rank=8))
    assert rows["encoder.layer.0.attention.self.value.weight"]["method"].startswith("no SVD")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"rank": 0}, "rank=0 is out of range"),
        ({"rank": 17}, "above min\\(m, n\\) of every matrix"),
        ({"rank": 4, "rank_pattern": {"query": 20}}, "rank_pattern asks for a rank above"),
        ({"rank": 4, "energy": 0.9}, "not both"),
        ({}, "give --rank"),
        ({"energy": 1.5}, "energy=1.5 is out of range"),
        ({"rank": 4, "bias": "lora", "embeddings": "lora"}, "cannot go together"),
    ],
)
def test_bad_settings_leave_nothing(bert_pair, tmp_path, kw, match):
    base, ft_dir, _ = bert_pair
    before = file_digests(base, ft_dir)
    with pytest.raises(UserError, match=match):
        run_extract(base, ft_dir, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists() and file_digests(base, ft_dir) == before
    assert not list(tmp_path.glob(".out*"))


def test_bad_inputs(bert_pair, tmp_path):
    base, ft_dir, _ = bert_pair
    with pytest.raises(UserError, match="no such file"):
        run_extract(base, tmp_path / "missing", tmp_path / "out", rank=2)
    with pytest.raises(UserError, match="the models are identical"):
        run_extract(base, base, tmp_path / "same", rank=2)
    assert not (tmp_path / "same").exists()
    with pytest.raises(UserError, match="is inside the input"):
        run_extract(base, ft_dir, ft_dir / "lora", rank=2)


def test_cli_forms(bert_pair, tmp_path, cli):
    base, ft_dir, _ = bert_pair
    r = cli(
        "extract",
        "--base",
        base,
        "--model",
        ft_dir,
        "--out",
        tmp_path / "a",
        "--rank",
        "4",
        "--rank-pattern",
        "query=2",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "LoRA matrices" in r.stderr and (tmp_path / "a" / "adapter_config.json").exists()
    r = cli("extract", "-m", f"base={base}", f"finetuned={ft_dir}", f"out={tmp_path / 'sweep'}", "rank=2,4")
    assert r.returncode == 0, r.stderr
    for rank in (2, 4):
        assert json.loads((tmp_path / "sweep" / f"rank={rank}" / "adapter_config.json").read_text())["r"] == rank
    r = cli("extract", "--base", base, "--model", ft_dir, "--out", tmp_path / "b", "--rank", "-3")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "rank" in r.stderr
    assert not (tmp_path / "b").exists()


def test_low_precision_factors_report_the_error_of_what_is_stored(bert_pair, tmp_path):
    base, ft_dir, _ = bert_pair
    out = run_extract(base, ft_dir, tmp_path / "bf16", rank=16, dtype="bfloat16")
    from safetensors import safe_open

    f = safe_open(out / "adapter_model.safetensors", "pt")
    assert {f.get_tensor(k).dtype for k in f.keys() if "lora_" in k} == {torch.bfloat16}
    row = _report(out)["bert.encoder.layer.0.attention.self.query.weight"]
    b, ft = load_tree(base), load_tree(ft_dir)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    delta = ft[name].dense() - b[name.removeprefix("bert.")].dense()
    got = load_tree(out, base=ft)[name].dense()
    measured = float((got - delta).norm() / delta.norm())
    assert 1e-4 < float(row["error"]) == pytest.approx(measured, rel=1e-3)  # full rank, but bfloat16-rounded
