"""The merge executor end to end on tiny HF models built from configs: CLI forms, outputs loadable by
transformers, recipes and hashes, dtypes, adapter inputs of every kind, chunked streaming."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merging import METHODS, read_recipe, run_merge
from merging.cli import main as merge_main
from peft_lab.tree import LDU, Sparse, Tree, save_tree
from peft_lab.tree.load import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from peft_lab.tree.safetensors import TREE_KIND_KEY
from tests.helpers.merge import file_digests, tiny_llama_dirs


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """bfloat16 base (sharded) + two fine-tunes."""
    return tiny_llama_dirs(tmp_path_factory.mktemp("llama"), n_models=2, shard="5KB")


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """float32 base + two fine-tunes (for exact comparisons)."""
    return tiny_llama_dirs(tmp_path_factory.mktemp("llama32"), n_models=2, dtype=torch.float32)


def weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def recipe(method, base, models, params=None, per_model=None, **kw):
    r = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": (per_model or {})} for m in models],
        "parameters": params or {},
        **kw,
    }
    if base is not None:
        r["base_model"] = str(base)
    return r


# ---------------------------------------------------------------------------------------------------------
# end to end through the CLI
# ---------------------------------------------------------------------------------------------------------
def test_cli_merge_is_an_hf_model_dir_with_its_recipe(llama, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    base, fts = llama
    before = file_digests(base, *fts)
    rec = tmp_path / "ta.yaml"
    rec.write_text(yaml.safe_dump(recipe("task_arithmetic", base, fts, {"lambda": 0.5}, {"weight": 0.8})))
    out = tmp_path / "out"
    r = cli("merge", "--config", rec, "--out", out, "--max-shard-size", "6KB")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and r.stderr == ""

    # an HF dir: config + tokenizer files from the base, shards + index, recipe
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "model.safetensors.index.json",
        "merge_recipe.yaml",
    } <= names
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert not list(tmp_path.glob(".out.tmp-*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

    # the values: base + λ Σ w τ in float32, cast once to the base's bfloat16
    got, b = weights(out), weights(base)
    fw = [weights(f) for f in fts]
    for k, v in b.items():
        want = (v.float() + 0.5 * sum(0.8 * (f[k].float() - v.float()) for f in fw)).to(torch.bfloat16)
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want), k

    # the recipe, with input hashes, in merge_recipe.yaml and in every shard's header
    on_disk = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert on_disk == read_recipe(out) == json.loads(index["metadata"]["peft_lab.merge_recipe"])
    assert on_disk["merge_method"] == "task_arithmetic" and on_disk["parameters"] == {"lambda": 0.5, "normalize": False}
    assert on_disk["tool"].startswith("peft-lab ") and on_disk["hash"] == "sha256"
    files = {f: h for i in on_disk["inputs"] for f, h in i["files"].items() if i["model"] == str(base)}
    assert files and all(h == "sha256:" + hashlib.sha256((base / f).read_bytes()).hexdigest() for f, h in files.items())
    for shard in out.glob("model-*.safetensors"):
        assert read_recipe(shard) == on_disk
    assert file_digests(base, *fts) == before  # inputs untouched


def test_rerunning_the_written_recipe_reproduces_the_bytes(llama32, tmp_path):
    base, fts = llama32
    a = run_merge(recipe("ties", base, fts, {"trim_scope": "global"}, {"density": 0.3}), tmp_path / "a")
    b = run_merge(a / "merge_recipe.yaml", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_yaml_and_hydra_forms_give_identical_bytes(llama, tmp_path, monkeypatch):
    base, fts = llama
    monkeypatch.chdir(base.parent)
    rec = tmp_path / "r.yaml"
    rec.write_text(
        yaml.safe_dump(
            {
                "merge_method": "dare_ties",
                "base_model": "base",
                "dtype": "float16",
                "models": [
                    {"model": "ft0", "parameters": {"weight": 1.0}},
                    {"model": "ft1", "parameters": {"weight": 0.5}},
                ],
                "parameters": {"density": 0.4, "rescale": "keep_rate", "seed": 3, "lambda": 1.0, "normalize": False},
            }
        )
    )
    assert merge_main(["--config", str(rec), "--out", str(tmp_path / "yaml")]) == 0
    assert (
        merge_main(
            [
                "method=dare_ties",
                "base=base",
                "models=[ft0,{model: ft1, parameters: {weight: 0.5}}]",
                f"out={tmp_path / 'hydra'}",
                "method.density=0.4",
                "method.seed=3",
                "dtype=float16",
            ]
        )
        == 0
    )
    files = sorted(p.name for p in (tmp_path / "yaml").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "hydra").iterdir())
    for f in files:
        assert (tmp_path / "yaml" / f).read_bytes() == (tmp_path / "hydra" / f).read_bytes(), f
    assert json.loads((tmp_path / "yaml" / "config.json").read_text())["dtype"] == "float16"


def test_hydra_sweep_writes_one_dir_per_job(llama32, tmp_path, monkeypatch):
    base, fts = llama32
    monkeypatch.chdir(base.parent)
    assert (
        merge_main(
            [
                "-m",
                "method=ties,dare_ties",
                "base=base",
                "models=[ft0,ft1]",
                f"out={tmp_path / 'sw'}",
                "method.density=0.5",
            ]
        )
        == 0
    )
    dirs = sorted(p.name for p in (tmp_path / "sw").iterdir())
    assert dirs == ["method=dare_ties,method.density=0.5", "method=ties,method.density=0.5"]
    for d in dirs:
        written = yaml.safe_load((tmp_path / "sw" / d / "merge_recipe.yaml").read_text())
        assert written["merge_method"] == d.split(",")[0][7:]


# ---------------------------------------------------------------------------------------------------------
# dtypes, non-float tensors, single-file inputs
# ---------------------------------------------------------------------------------------------------------
def test_dtypes_and_int_buffers(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(6, 5, generator=g).to(torch.bfloat16),
        "norm": torch.randn(5, generator=g),
        "ids": torch.arange(7),
        "mask": torch.tensor([1, 0, 1], dtype=torch.uint8),
    }
    models = []
    for i in range(2):
        m = {
            k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v * (i + 2)
            for k, v in base.items()
        }
        save_file(m, tmp_path / f"m{i}.safetensors")
        models.append(tmp_path / f"m{i}.safetensors")
    save_file(base, tmp_path / "base.safetensors")
    out = run_merge(recipe("task_arithmetic", tmp_path / "base.safetensors", models), tmp_path / "o1")
    got = load_file(out / "model.safetensors")
    assert got["w"].dtype == torch.bfloat16 and got["norm"].dtype == torch.float32  # each tensor keeps the base's
    assert torch.equal(got["ids"], base["ids"]) and torch.equal(got["mask"], base["mask"])  # copied, not merged
    out = run_merge(recipe("task_arithmetic", tmp_path / "base.safetensors", models, dtype="float16"), tmp_path / "o2")
    got = load_file(out / "model.safetensors")
    assert got["w"].dtype == got["norm"].dtype == torch.float16 and got["ids"].dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------
# adapters as task vectors: LoRA + LoKr (PEFT dirs) + sparse/LDU (a peft-lab dir) in one merge
# ---------------------------------------------------------------------------------------------------------
def test_adapters_of_every_kind_merge_as_task_vectors(llama32, tmp_path):
    from peft import LoKrConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, _ = llama32
    deltas = {}
    for kind, cfg in {
        "lora": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "lokr": LoKrConfig(r=2, alpha=2, target_modules=["o_proj"], init_weights=False),
    }.items():
        torch.manual_seed(1)
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
        pm.save_pretrained(tmp_path / kind)
        merged = pm.merge_and_unload().state_dict()
        ref = AutoModelForCausalLM.from_pretrained(base).state_dict()
        deltas[kind] = {k: merged[k] - ref[k] for k in ref if not torch.equal(merged[k], ref[k])}
        assert deltas[kind]
    # a peft-lab adapter dir holding structured deltas (sparse and LDU leaves)
    b = weights(base)
    up, down = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"
    g = torch.Generator().manual_seed(2)
    idx = torch.randperm(b[up].numel(), generator=g)[:50].sort().values.int()
    o, i = b[down].shape
    r = 3
    leaves = {
        up: Sparse(idx, torch.randn(50, generator=g) * 0.1, b[up].shape),
        down: LDU(
            torch.randperm(o, generator=g),
            torch.randn(o, r, generator=g),
            torch.randn(r, generator=g) * 0.1,
            torch.randn(r, i, generator=g),
            0.5,
        ),
    }
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / ADAPTER_CONFIG).write_text('{"adapter": "sparse+ldu"}\n')
    save_tree(Tree(leaves), tmp_path / "sp" / ADAPTER_WEIGHTS, metadata={TREE_KIND_KEY: "delta"})
    deltas["sp"] = {k: v.dense() for k, v in leaves.items()}

    w = {"lora": 1.0, "lokr": 0.5, "sp": -1.0}
    rec = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "parameters": {"lambda": 0.7},
        "models": [{"model": str(tmp_path / k), "parameters": {"weight": w[k]}} for k in w],
    }
    out = run_merge(rec, tmp_path / "out", chunk_size=64)
    got = weights(out)
    rr = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert [i.get("kind") for i in rr["inputs"]] == [None, "delta", "delta", "delta"]
    for k, v in b.items():
        want = v + 0.7 * sum(w[a] * deltas[a].get(k, torch.zeros_like(v)) for a in w)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)

    # methods that take whole models see base + delta
    out = run_merge(
        {"merge_method": "linear", "base_model": str(base), "models": [{"model": str(tmp_path / "lora")}]},
        tmp_path / "lin",
    )
    got = weights(out)
    for k, v in b.items():  # average of (base + Δ_lora) and the base itself (linear adds base_model as an input)
        torch.testing.assert_close(got[k], v + 0.5 * deltas["lora"].get(k, torch.zeros_like(v)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# streaming: chunking, tensor order, global TIES, progress
# ---------------------------------------------------------------------------------------------------------
PARAMS = {
    "linear": ({}, {"weight": 0.7}),
    "task_arithmetic": ({"lambda": 0.6}, {"weight": 0.9}),
    "ties": ({"trim_scope": "tensor"}, {"density": 0.3}),
    "dare_linear": ({"rescale": "keep_rate"}, {"density": 0.4}),
    "dare_ties": ({"rescale": "l1"}, {"density": 0.4}),
    "slerp": ({"t": 0.3}, {}),
    "soup": ({"check_masks": False}, {}),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_chunked_executor_gives_the_same_tensors(llama32, tmp_path, name):
    base, fts = llama32
    shared, per = PARAMS[name]
    models = fts[:1] if name == "slerp" else fts
    whole = weights(run_merge(recipe(name, base, models, shared, per), tmp_path / "whole", hash="none"))
    small = weights(
        run_merge(recipe(name, base, models, shared, per), tmp_path / "chunked", hash="none", chunk_size=64)
    )
    for k in whole:
        if name in ("slerp", "dare_ties"):  # norms accumulated chunk by chunk (float32 rounding)
            torch.testing.assert_close(small[k], whole[k], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(small[k], whole[k]), k


def test_every_registered_method_is_covered_here():
    assert set(PARAMS) <= set(METHODS.names())


def test_global_ties_and_dare_do_not_depend_on_tensor_order(llama32, tmp_path):
    """Global TIES equals a flatten-the-model reference (the official threshold: kthvalue(|τ|, N − int(N·d)));
    DARE masks follow tensor names, not file order."""
    base, fts = llama32
    b, f = weights(base), [weights(p) for p in fts]
    r = recipe("ties", base, fts, {"trim_scope": "global"}, {"density": 0.25})
    out = weights(run_merge(r, tmp_path / "g", chunk_size=64))
    keys = sorted(b)
    thr = []
    for fw in f:
        flat = torch.cat([(fw[k] - b[k]).reshape(-1) for k in keys]).abs()
        thr.append(flat.kthvalue(flat.numel() - int(0.25 * flat.numel())).values)
    for k in keys:
        taus = [(fw[k] - b[k]) * ((fw[k] - b[k]).abs() >= t) for fw, t in zip(f, thr, strict=True)]
        s = sum(taus)
        gamma = torch.where(s >= 0, 1.0, -1.0)
        agree = [(t * gamma > 0).float() for t in taus]
        want = b[k] + sum(t * a for t, a in zip(taus, agree, strict=True)) / sum(agree).clamp(min=1)
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-7)

    # the same models written with their tensors in reverse order
    rev = []
    for i, fw in enumerate(f):
        d = tmp_path / f"rev{i}"
        d.mkdir()
        save_tree(Tree({k: fw[k] for k in reversed(keys)}), d / "model.safetensors")
        (d / "config.json").write_text((base / "config.json").read_text())
        rev.append(d)
    r = recipe("dare_ties", base, fts, {"seed": 5}, {"density": 0.5})
    a = weights(run_merge(r, tmp_path / "a"))
    reversed_models = [{"model": str(p), "parameters": {"density": 0.5}} for p in rev]
    c = weights(run_merge({**r, "models": reversed_models}, tmp_path / "c"))
    assert all(torch.equal(a[k], c[k]) for k in keys)


def test_progress_bar_only_when_asked(llama32, tmp_path, capfd):
    base, fts = llama32
    run_merge(recipe("linear", None, fts), tmp_path / "quiet")
    assert capfd.readouterr().err == ""  # stderr is not a terminal here
    run_merge(recipe("linear", None, fts), tmp_path / "loud", progress=True)
    err = capfd.readouterr().err
    assert "linear -> loud" in err and "100%" in err


def test_hash_kind_none_records_no_hashes(llama32, tmp_path):
    base, fts = llama32
    out = run_merge(recipe("linear", None, fts), tmp_path / "o", hash="none")
    rec = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert rec["hash"] == "none" and all("files" not in i for i in rec["inputs"])


def test_data_and_artifacts_reach_data_driven_methods(llama32, tmp_path):
    """A recipe's `data` mapping reaches `prepare` as `inputs.extra["data"]`, is recorded in the recipe, and
    a method's `artifacts()` are written beside the merged model."""
    import dataclasses

    from merging.methods.linear import Linear
    from merging.recipe import parse_recipe

    base, fts = llama32
    seen = {}

    class Probe(Linear):
        def prepare(self, inputs):
            seen.update(inputs.extra)

        def artifacts(self):
            return {"probe.json": json.dumps({"tasks": len(seen["data"]["tasks"])})}

    r = parse_recipe({**recipe("linear", None, fts), "data": {"tasks": [{"dataset": "bbc_news"}, {"path": "t2.csv"}]}})
    out = run_merge(dataclasses.replace(r, method=Probe(r.method.params)), tmp_path / "o")
    assert seen["data"]["tasks"][1] == {"path": "t2.csv"}
    assert json.loads((out / "probe.json").read_text()) == {"tasks": 2}
    assert yaml.safe_load((out / "merge_recipe.yaml").read_text())["data"] == seen["data"]


def test_diffusers_model_dirs_merge_into_a_loadable_dir(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    unet.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1)
    unet.save_pretrained(tmp_path / "b")
    out = run_merge(recipe("linear", None, [tmp_path / "a", tmp_path / "b"]), tmp_path / "o")
    assert (out / "diffusion_pytorch_model.safetensors").exists() and (out / "config.json").exists()
    merged = UNet2DModel.from_pretrained(out)
    a = UNet2DModel.from_pretrained(tmp_path / "a")
    for (k, v), (_, w) in zip(merged.state_dict().items(), a.state_dict().items(), strict=True):
        torch.testing.assert_close(v, w + 0.05, rtol=1e-5, atol=1e-6, msg=k)


def test_threads_option_sets_torch_threads_while_streaming_and_restores_them(llama32, tmp_path, monkeypatch):
    from merging.methods.task_arithmetic import TaskArithmetic
    from peft_lab.errors import UserError

    base, fts = llama32
    seen = []
    real = TaskArithmetic.merge_chunk

    def spy(self, job, start, b, tensors):
        seen.append(torch.get_num_threads())
        return real(self, job, start, b, tensors)

    monkeypatch.setattr(TaskArithmetic, "merge_chunk", spy)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_merge(recipe("task_arithmetic", base, fts), tmp_path / "one")  # default: 1 thread while streaming
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        run_merge(recipe("task_arithmetic", base, fts), tmp_path / "keep", threads="auto")  # torch's setting
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(UserError, match=r"threads=0 is out of range: must be >= 1 \(a positive integer, or auto"):
        run_merge(recipe("task_arithmetic", base, fts), tmp_path / "bad", threads=0)
