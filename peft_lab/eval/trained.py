"""`peft-lab train … eval=NAME`: the model a run just trained, scored by the same evaluator as `peft-lab eval` and
scored merges, so a fine-tune and a merge of fine-tunes are measured by one definition.

    peft-lab train model=minilm data=bbc_news eval=classification               # tasks default to the run's data
    peft-lab train model=tiny_llama data=hf ... eval=perplexity eval.file=val.txt

The trained model is scored in memory (with its adapter attached), after the run's own final evaluation; the
record goes to `DIR/eval.json`, its score to `metrics.json` (`eval_score`, `eval_metric`) and the logger
(`eval/...`). A classification evaluator without tasks scores the run's data (its `test` split, else
`validation`). Zero-shot heads embed their labels with the run's pretrained model (`model.path`, or MiniLM).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from peft_lab.errors import UserError
from peft_lab.eval.base import Evaluator, ModelInfo

__all__ = ["for_run", "score_trained"]

# the model.task each evaluator kind scores
_TASK_OF_KIND = {"sequence_classification": "sequence_classification", "encoder": "sequence_classification"}


def for_run(run) -> Evaluator | None:
    """The run's evaluator, completed (a classification without tasks gets the run's data) and checked against the
    run's task before training starts; None without `eval=`."""
    ev = getattr(run, "eval", None)
    if ev is None:
        return None
    task = run.model.task
    want = _TASK_OF_KIND.get(ev.model_kind(), "causal_lm")
    if task != want:
        raise UserError(
            f"eval={ev.name} scores {want.replace('_', ' ')} models, but this run trains model.task={task}; choose an "
            f"evaluator for {task.replace('_', ' ')} (classification for sequence_classification, perplexity or "
            "lm_eval for causal_lm)."
        )
    if ev.name == "classification" and not ev.tasks:
        params = {k: v for k, v in dataclasses.asdict(run.data).items() if not k.startswith("max_train")}
        ev = dataclasses.replace(ev, tasks=[{"name": run.data_name, "data": run.data_name, "data_args": params}])
    ev.prepare()
    return ev


def _hf_model(module):
    """The transformers model inside a PEFT wrapper (adapter layers attached) or the module itself."""
    get = getattr(module, "get_base_model", None)
    return get() if callable(get) else module


def _info(model, run) -> ModelInfo:
    cfg = model.config
    archs = tuple(cfg.architectures or (type(model).__name__,))
    id2label = {int(k): str(v) for k, v in (getattr(cfg, "id2label", None) or {}).items()}
    is_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    return ModelInfo(
        path=f"the trained model ({run.model_name})",
        architectures=archs,
        model_type=str(getattr(cfg, "model_type", "")),
        num_labels=getattr(cfg, "num_labels", None) if is_cls else None,
        id2label=id2label if is_cls else {},
        max_positions=getattr(cfg, "max_position_embeddings", None),
    )


def score_trained(ev: Evaluator, run, module, tokenizer, out: Path, device) -> dict[str, Any]:
    """Score the trained `module` in memory; writes `out/eval.json` and returns its record."""
    from peft_lab.eval.load import LoadedModel, ModelRef
    from peft_lab.eval.run import evaluate_loaded, write_record

    hf = _hf_model(module)
    info = _info(hf, run)
    ev.check_model(info, f"eval of {info.path}")
    model = hf.base_model if ev.model_kind() == "encoder" else module
    base = getattr(run.model, "path", None) or _default_encoder(run)
    ref = ModelRef(str(out), base, str(out / ("model" if run.adapter_name == "none" else "adapter")))
    loaded = LoadedModel(model, tokenizer, info, ref, base, device)
    record = evaluate_loaded(ev, loaded)
    write_record(out, record)
    return record


def _default_encoder(run) -> str | None:
    if run.model_name == "minilm":
        from peft_lab.train.models.text import minilm_path

        return minilm_path()
    return None
