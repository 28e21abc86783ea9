"""The evaluators on tiny models: what they compute (checked against direct computations), how task labels meet a
model's head, strided perplexity's token count, lm-evaluation-harness through its Python API, and one clear
UserError for each bad input (unknown evaluator, a task the head cannot score, an empty text file, a model type an
evaluator does not support)."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from peft_lab.errors import UserError
from peft_lab.eval import build_evaluator, evaluate
from peft_lab.eval.evaluators.perplexity import windows
from tests.helpers.eval import task_file, tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "cls": tiny_model(root / "cls", id2label={0: "sport", 1: "business"}),
        "enc": tiny_model(root / "enc", "encoder"),
        "lm": tiny_model(root / "lm", "causal_lm"),
        "root": root,
    }


def _biased(path, favour: int, id2label):
    """A classifier that always predicts head output `favour` (zero weights, a large bias)."""
    from safetensors.torch import load_file, save_file

    tiny_model(path, id2label=id2label)
    sd = load_file(path / "model.safetensors")
    sd["classifier.weight"] = torch.zeros_like(sd["classifier.weight"])
    sd["classifier.bias"] = torch.tensor([10.0 if i == favour else 0.0 for i in range(len(id2label))])
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_classification_matches_a_direct_computation(models, tmp_path):
    import transformers

    f1 = task_file(tmp_path / "a.jsonl", n=10)
    f2 = task_file(tmp_path / "b.jsonl", labels=("business", "sport"), n=7)
    rec = evaluate({"name": "classification", "tasks": [str(f1), str(f2)], "batch_size": 3}, models["cls"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(models["cls"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(models["cls"])
    for f, name in ((f1, "a"), (f2, "b")):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        y = torch.tensor([{"sport": 0, "business": 1}[r["label"]] for r in rows])
        with torch.no_grad():
            logits = torch.cat([model(**tok(r["text"], return_tensors="pt")).logits for r in rows])
        got = rec["tasks"][name]
        assert got["examples"] == len(rows)
        assert got["accuracy"] == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
        assert got["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    avg = rec["average"]
    assert avg["accuracy"] == pytest.approx((rec["tasks"]["a"]["accuracy"] + rec["tasks"]["b"]["accuracy"]) / 2)
    assert avg["examples"] == 17 and rec["score"] == avg["accuracy"] and rec["metric"] == "accuracy"
    assert rec["higher_is_better"] is True and rec["config"]["name"] == "classification"


def test_task_labels_meet_the_head_by_name_or_index(tmp_path):
    m = _biased(tmp_path / "m", 1, {0: "business", 1: "sport"})  # always says "sport"
    sport = tmp_path / "sport.jsonl"
    sport.write_text('{"text": "a goal", "label": "sport"}\n{"text": "a match", "label": "sport"}\n')
    business = tmp_path / "business.jsonl"
    business.write_text('{"text": "shares", "label": "business"}\n')
    ints = tmp_path / "ints.jsonl"
    ints.write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    rec = evaluate({"name": "classification", "tasks": [str(sport), str(business), str(ints)]}, m)
    assert rec["tasks"]["sport"]["accuracy"] == 1.0 and rec["tasks"]["business"]["accuracy"] == 0.0
    assert rec["tasks"]["ints"]["accuracy"] == 0.5
    # the file's own split field: only the test lines are scored unless asked otherwise
    split = task_file(tmp_path / "split.jsonl", n=9, splits=True)
    rec = evaluate({"name": "classification", "tasks": [{"file": str(split), "split": "val"}]}, m)
    assert rec["tasks"]["split"]["examples"] == 3


def test_a_task_the_head_cannot_score(models, tmp_path):
    three = task_file(tmp_path / "three.jsonl", labels=("sport", "business", "politics"), n=6)
    with pytest.raises(UserError, match=r"has 3 classes .* but the model's classification head has 2 outputs") as e:
        evaluate({"name": "classification", "tasks": [str(three)]}, models["cls"])
    assert "eval.head=zero_shot" in str(e.value) and str(three) in str(e.value)
    other = task_file(tmp_path / "other.jsonl", labels=("cats", "dogs"), n=4)
    with pytest.raises(UserError, match=r"task 'other' \(cats, dogs\) are not the names of .* \(sport, business\)"):
        evaluate({"name": "classification", "tasks": [str(other)]}, models["cls"])
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "x", "label": 5}\n')
    with pytest.raises(UserError, match=r"integer label\(s\) 5 outside the model's head, which has 2 outputs"):
        evaluate({"name": "classification", "tasks": [str(big)]}, models["cls"])


def test_zero_shot_heads_use_the_base_encoder(models, tmp_path):
    from peft_lab.eval import heads

    f = task_file(tmp_path / "t.jsonl", n=8)
    other = tiny_model(tmp_path / "other", "encoder", seed=5)
    spec = {"name": "classification", "tasks": [str(f)], "head": "zero_shot"}
    rec = evaluate(spec, other, base=models["enc"])  # label prompts embedded by the base, texts by `other`
    enc, tok = heads.load_encoder(str(other))
    base_enc, base_tok = heads.load_encoder(str(models["enc"]))
    W = heads.label_head(base_enc, base_tok, ["business", "sport"])  # sorted labels
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    logits = heads.encode_texts(enc, tok, [r["text"] for r in rows]) @ W.T
    y = torch.tensor([{"business": 0, "sport": 1}[r["label"]] for r in rows])
    assert rec["tasks"]["t"]["accuracy"] == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    assert rec["tasks"]["t"]["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    # a labels file gives descriptions (what is embedded) and the class order
    labels = tmp_path / "t.labels.yaml"
    labels.write_text("sport: a sports report\nbusiness: business news\n")
    rec2 = evaluate({**spec, "tasks": [{"file": str(f), "labels": str(labels)}]}, other, base=models["enc"])
    W2 = heads.label_head(base_enc, base_tok, ["a sports report", "business news"])
    y2 = 1 - y
    logits2 = heads.encode_texts(enc, tok, [r["text"] for r in rows]) @ W2.T
    assert rec2["tasks"]["t"]["loss"] == pytest.approx(float(F.cross_entropy(logits2, y2)), rel=1e-5)


def test_unsupported_model_types(models, tmp_path):
    f = task_file(tmp_path / "t.jsonl")
    text = tmp_path / "t.txt"
    text.write_text("some text to score " * 5)
    cases = [
        ({"name": "classification", "tasks": [str(f)]}, "lm", r"needs a sequence classifier .*LlamaForCausalLM"),
        ({"name": "classification", "tasks": [str(f)]}, "enc", r"needs a sequence classifier .*BertModel.*zero_shot"),
        ({"name": "classification", "tasks": [str(f)], "head": "zero_shot"}, "lm", r"scores sentence encoders"),
        ({"name": "perplexity", "file": str(text)}, "cls", r"perplexity scores causal language models.*Bert"),
    ]
    for spec, model, message in cases:
        with pytest.raises(UserError, match=message):
            evaluate(spec, models[model])


def test_unknown_evaluator_and_bad_settings():
    with pytest.raises(
        UserError, match=r"unknown evaluator 'accuracy'. Available: classification, lm_eval, perplexity"
    ):
        build_evaluator({"name": "accuracy"})
    with pytest.raises(UserError, match=r"eval=classification has no parameter\(s\) task; it takes: .*tasks"):
        build_evaluator({"name": "classification", "task": "x"})
    with pytest.raises(UserError, match=r"eval.head='linear' must be one of: model, zero_shot"):
        build_evaluator({"name": "classification", "head": "linear"})
    with pytest.raises(UserError, match=r"template='Topic' must contain \{label\}"):
        build_evaluator({"name": "classification", "template": "Topic"})
    with pytest.raises(UserError, match="eval.file is not set"):
        build_evaluator({"name": "perplexity"})
    with pytest.raises(UserError, match="no tasks"):
        build_evaluator({"name": "classification"}).prepare()


def test_windows_tile_the_stream_once():
    for n in (2, 3, 10, 64, 65, 100):
        for window in (2, 5, 16, 64, 200):
            for stride in sorted({1, 2, max(1, window // 2), window}):
                if stride > window:
                    continue
                ws = windows(n, window, stride)
                scored = [t for b, e, first in ws for t in range(first, e)]
                assert scored == list(range(1, n)), (n, window, stride)
                assert all(e - b <= window and first > b for b, e, first in ws)  # every token has context


def test_perplexity_counts_every_token_once(models, tmp_path):
    import transformers

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 6)
    full = evaluate({"name": "perplexity", "file": str(text), "window": 64, "stride": 64}, models["lm"])
    tok = transformers.AutoTokenizer.from_pretrained(models["lm"])
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    assert len(ids) < 64  # one window: the plain causal LM loss over the text
    model = transformers.AutoModelForCausalLM.from_pretrained(models["lm"]).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    loss = float(F.cross_entropy(logits, torch.tensor(ids[1:])))
    task = full["tasks"]["t.txt"]
    assert task["tokens"] == len(ids) - 1 and task["loss"] == pytest.approx(loss, rel=1e-5)
    assert task["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-5)
    assert full["score"] == task["perplexity"] and full["higher_is_better"] is False
    for window, stride in ((8, 4), (8, 8), (5, 1)):
        rec = evaluate({"name": "perplexity", "file": str(text), "window": window, "stride": stride}, models["lm"])
        assert rec["tasks"]["t.txt"]["tokens"] == len(ids) - 1  # short windows: the same tokens, less context
    # documents of a JSONL file are joined by the separator token: one more token per document boundary
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"text": "first document"}\n{"text": "second one"}\n\n{"text": "third"}\n')
    rec = evaluate({"name": "perplexity", "file": str(docs), "window": 16}, models["lm"])
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("first document", "second one", "third"))
    assert rec["tasks"]["d.jsonl"]["tokens"] == n + 2 - 1


def test_perplexity_bad_files(models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "   "}\n\n')
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "text"}\n')
    cases = [
        (empty, r"empty.txt: the file holds no text \(it is empty or only whitespace\)"),
        (blank, r"blank.jsonl: the file holds no text"),
        (nofield, r"line 1 has no string field 'text' \(set eval.text_field"),
        (tmp_path / "missing.txt", r"missing.txt: no such file"),
    ]
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            evaluate({"name": "perplexity", "file": str(path)}, models["lm"])
    one = tmp_path / "one.txt"
    one.write_text("a")
    with pytest.raises(UserError, match="perplexity needs at least two"):
        evaluate({"name": "perplexity", "file": str(one)}, models["lm"])
    two = tmp_path / "two.txt"
    two.write_text("a b c d")
    with pytest.raises(UserError, match=r"eval.window=100 is longer than the model's max_position_embeddings \(64\)"):
        evaluate({"name": "perplexity", "file": str(two), "window": 100}, models["lm"])


def test_adapter_dir_is_scored_on_its_base(models, tmp_path):
    """A PEFT LoRA dir (with a fully trained head) on its base scores as the merged model it stands for."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForSequenceClassification.from_pretrained(models["cls"])
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    peft_model = get_peft_model(base, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    transformers.AutoTokenizer.from_pretrained(models["cls"]).save_pretrained(tmp_path / "merged")
    f = task_file(tmp_path / "t.jsonl", n=16)
    spec = {"name": "classification", "tasks": [str(f)]}
    a = evaluate(spec, tmp_path / "adapter", base=models["cls"])
    m = evaluate(spec, tmp_path / "merged")
    assert a["tasks"]["t"]["loss"] == pytest.approx(m["tasks"]["t"]["loss"], rel=1e-5)
    assert a["base"] == str(models["cls"])
    json_cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(json_cfg.read_text())
    assert cfg["base_model_name_or_path"] == str(models["cls"])
    assert evaluate(spec, tmp_path / "adapter")["score"] == a["score"]  # the base its config names, when local
    json_cfg.write_text(json.dumps({**cfg, "base_model_name_or_path": "org/not-local"}))
    with pytest.raises(UserError, match=r"adapter dir and names no local base model; .*model.base=DIR"):
        evaluate(spec, tmp_path / "adapter")


LM_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _lm_tasks(root):
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(6)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    for name in ("parity_a", "parity_b"):
        (tasks / f"{name}.yaml").write_text(LM_TASK.format(name=name, data=data))
    return tasks


def test_lm_eval_refused_without_the_extra(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    ev = build_evaluator({"name": "lm_eval", "tasks": ["x"], "include_path": str(tmp_path)})
    with pytest.raises(UserError, match=r"eval=lm_eval needs lm-evaluation-harness.*pip install 'peft-lab\[eval\]'"):
        evaluate(ev, models["lm"])


def test_lm_eval_on_a_local_task(models, tmp_path):
    """Two tiny local multiple-choice tasks (6 documents each): the harness's own numbers, averaged."""
    import lm_eval  # the [eval] extra, part of the test extra
    import transformers
    from lm_eval.models.huggingface import HFLM

    tasks = _lm_tasks(tmp_path)
    spec = {"name": "lm_eval", "tasks": ["parity_a", "parity_b"], "include_path": str(tasks), "batch_size": 4}
    rec = evaluate(spec, models["lm"])
    assert set(rec["tasks"]) == {"parity_a", "parity_b"} and rec["metric"] == "acc"
    model = transformers.AutoModelForCausalLM.from_pretrained(models["lm"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(models["lm"])
    direct = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", prefix_token_id=tok.cls_token_id),
        tasks=["parity_a"],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks), include_defaults=False),
    )
    assert rec["tasks"]["parity_a"]["acc"] == pytest.approx(direct["results"]["parity_a"]["acc,none"])
    assert rec["score"] == pytest.approx((rec["tasks"]["parity_a"]["acc"] + rec["tasks"]["parity_b"]["acc"]) / 2)
    with pytest.raises(UserError, match=r"no task named nope in"):
        evaluate({**spec, "tasks": ["nope"]}, models["lm"])
    with pytest.raises(UserError, match=r"eval.metric='f1': task\(s\) parity_a, parity_b report no such metric"):
        evaluate({**spec, "metric": "f1"}, models["lm"])
    with pytest.raises(UserError, match=r"lm_eval scores causal language models"):
        evaluate(spec, models["cls"])
