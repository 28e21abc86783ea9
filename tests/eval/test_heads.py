"""Zero-shot label-embedding heads: logits are scale x the cosine similarity of mean-pooled features (padding
excluded) to the label prompts' features, computed here independently of peft_lab.eval.heads."""

import pytest
import torch
import torch.nn.functional as F

from peft_lab.eval import heads
from tests.helpers.eval import tiny_model


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return heads.load_encoder(str(tiny_model(tmp_path_factory.mktemp("enc") / "enc", "encoder")))


def _cosine_logits(enc, tok, texts, prompts, scale):
    """20 x cos(mean over real tokens of h(text), mean over real tokens of h(prompt)), one text at a time (no
    padding at all)."""

    def feat(t):
        ids = tok(t, return_tensors="pt")
        h = enc(**ids).last_hidden_state[0]  # (L, d)
        return h.mean(0)

    with torch.no_grad():
        X = torch.stack([feat(t) for t in texts])
        P = torch.stack([feat(p) for p in prompts])
    return scale * F.cosine_similarity(X[:, None, :], P[None, :, :], dim=-1)  # (N, C)


def test_logits_are_scaled_cosine_similarities(encoder):
    enc, tok = encoder
    labels = ["sport", "business", "politics"]
    texts = ["the match ended two nil", "shares fell sharply on the market today after the report", "vote"]
    W = heads.label_head(enc, tok, labels)  # (3, d)
    assert W.shape == (3, enc.config.hidden_size)
    torch.testing.assert_close(W.norm(dim=-1), torch.full((3,), heads.SCALE))  # rows: scale x unit vectors
    clf = heads.ZeroShotClassifier(enc, W)
    batch = tok(texts, padding=True, return_tensors="pt")  # padded: the pooling must ignore the padding
    with torch.no_grad():
        logits = clf(batch["input_ids"], batch["attention_mask"])
    prompts = [heads.TEMPLATE.format(label=lab) for lab in labels]
    torch.testing.assert_close(logits, _cosine_logits(enc, tok, texts, prompts, heads.SCALE), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in clf.parameters()) and "head" in dict(clf.named_buffers())


def test_template_and_scale(encoder):
    enc, tok = encoder
    W = heads.label_head(enc, tok, ["a", "b"], template="News about {label}!", scale=5.0)
    ref = _cosine_logits(enc, tok, ["News about a!"], ["News about a!", "News about b!"], 5.0)
    feats = heads.encode_texts(enc, tok, ["News about a!"])
    torch.testing.assert_close(feats @ W.T, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((feats @ W.T)[0, 0], torch.tensor(5.0), atol=1e-5, rtol=1e-5)  # cos(x, x) = 1


def test_cached_head_is_embedded_once(tmp_path, monkeypatch):
    path = str(tiny_model(tmp_path / "enc", "encoder", seed=3))
    calls = []
    real = heads.load_encoder
    monkeypatch.setattr(heads, "load_encoder", lambda p, device="cpu": calls.append(p) or real(p, device))
    a = heads.cached_label_head(path, ["x", "y"])
    b = heads.cached_label_head(path, ["x", "y"])
    enc, tok = real(path)
    torch.testing.assert_close(a, heads.label_head(enc, tok, ["x", "y"]))
    assert torch.equal(a, b) and calls == [path]
    heads.cached_label_head(path, ["x", "z"])  # other labels: embedded again
    assert calls == [path, path]
