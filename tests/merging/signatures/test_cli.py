"""`peft-lab signature extract|patch|unpatch|list|pack` end to end on tiny HF models."""

import pytest
import torch

from merging.signatures.signature import apply_signatures, extract, load_signatures, save_signatures
from peft_lab.tree import load_tree


def _bert(seed: int, hidden: int = 16):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def _perturbed(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    m = type(model)(model.config)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    clean = _bert(0)
    clean.save_pretrained(d / "clean")
    _perturbed(clean, 1).save_pretrained(d / "robust_a")
    _perturbed(clean, 2).save_pretrained(d / "robust_b")
    _bert(0, hidden=8).save_pretrained(d / "other")
    return d


def _ok(res):
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_extract_patch_unpatch_list_pack(models, tmp_path, cli):
    from transformers import AutoModelForSequenceClassification

    sigs = tmp_path / "sigs"
    out = _ok(
        cli(
            "signature",
            "extract",
            "--clean",
            models / "clean",
            "--robust",
            models / "robust_a",
            "--out",
            sigs / "a.safetensors",
            "--layers",
            "3",
            "--bits",
            "8",
        )
    )
    assert "layers (model class order): bert.embeddings.word_embeddings, bert.embeddings.position_embeddings" in out
    _ok(
        cli(
            "signature",
            "extract",
            "--clean",
            models / "clean",
            "--robust",
            models / "robust_b",
            "--out",
            sigs / "b.safetensors",
            "--layers",
            "bert.encoder.layer.0.*",
            "--bits",
            "16",
        )
    )
    (a,), (b,) = load_signatures(sigs / "a.safetensors"), load_signatures(sigs / "b.safetensors")
    assert a.record["bits"] == 8 and all(k.startswith("bert.encoder.layer.0.") for k in b.tree)

    _ok(
        cli(
            "signature",
            "patch",
            "--model",
            models / "clean",
            "--signature",
            sigs / "a.safetensors",
            "--scale",
            "0.5",
            "--signature",
            sigs / "b.safetensors",
            "--out",
            tmp_path / "patched",
        )
    )
    assert (tmp_path / "patched" / "config.json").exists()
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "patched").state_dict()
    expect = apply_signatures(load_tree(models / "clean"), [(a, 0.5), (b, 1.0)])
    for k, leaf in expect.items():
        assert torch.equal(hf[k], leaf.dense(None)), k

    # the flags in another order name the same patch step: the original bytes come back
    out = _ok(
        cli(
            "signature",
            "unpatch",
            "--model",
            tmp_path / "patched",
            "--signature",
            sigs / "b.safetensors",
            "--signature",
            sigs / "a.safetensors",
            "--scale",
            "0.5",
            "--out",
            tmp_path / "restored",
        )
    )
    assert out.startswith("restored")
    assert (tmp_path / "restored" / "model.safetensors").read_bytes() != b""
    clean, back = load_tree(models / "clean"), load_tree(tmp_path / "restored")
    assert list(back) == list(clean)
    for k in clean:
        assert torch.equal(back[k].dense(None), clean[k].dense(None)), k

    _ok(
        cli("signature", "pack", sigs / "a.safetensors", sigs / "b.safetensors", "--out", tmp_path / "bank.safetensors")
    )
    _ok(
        cli(
            "signature",
            "patch",
            "--model",
            models / "clean",
            "--signature",
            f"{tmp_path / 'bank.safetensors'}::b",
            "--out",
            tmp_path / "from_bank",
        )
    )
    listing = _ok(
        cli("signature", "list", tmp_path / "bank.safetensors", sigs, tmp_path / "patched", tmp_path / "from_bank")
    )
    assert listing.count("bank.safetensors::") == 2 and listing.count("sigs/") == 2
    assert "a x0.5" in listing and "b x1" in listing and "bitwise restorable" in listing
    for k, leaf in load_tree(tmp_path / "from_bank").items():
        assert torch.equal(leaf.dense(None), apply_signatures(clean, [(b, 1.0)])[k].dense(None)), k


def test_bad_input_is_one_paragraph_exit_2(models, tmp_path, cli):
    res = cli(
        "signature",
        "extract",
        "--clean",
        models / "clean",
        "--robust",
        models / "other",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "do not line up" in res.stderr and "bert.embeddings.word_embeddings.weight has shape (40, 8)" in res.stderr
    assert not (tmp_path / "x.safetensors").exists()

    sig = extract(load_tree(models / "clean"), load_tree(models / "robust_a"), layers="bert.embeddings.*", name="a")
    save_signatures([sig], tmp_path / "a.safetensors")
    res = cli(
        "signature",
        "patch",
        "--model",
        models / "other",
        "--signature",
        tmp_path / "a.safetensors",
        "--out",
        tmp_path / "p",
    )
    assert res.returncode == 2 and "do not fit" in res.stderr and "bert.embeddings.word_embeddings.weight" in res.stderr
    res = cli(
        "signature",
        "unpatch",
        "--model",
        models / "clean",
        "--signature",
        tmp_path / "a.safetensors",
        "--out",
        tmp_path / "u",
    )
    assert res.returncode == 2 and "--force" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
