"""Scored merges: a recipe's `eval:` block (or `eval=NAME` in the Hydra form) scores the merged model before its
output dir is renamed into place, so `OUT_DIR/eval.json` is part of the output: a merge that is interrupted while
it is being scored leaves nothing behind, like one interrupted while it streams.

    merge_method: ties
    base_model: base
    models: [{model: ft0}, {model: ft1}]
    parameters: {density: 0.5}
    eval:                               # any evaluator of peft_lab.eval (conf/eval/<name>.yaml), with its settings
      name: classification
      tasks: [{file: tasks/news.jsonl, split: val}]
      head: zero_shot

The evaluators are peft_lab's (`peft_lab.eval`), the same code that scores `peft-lab eval` and
`peft-lab train … eval=`. Before any tensor is merged, `prepare` checks what can be checked without the merged
weights: the evaluator's data, and the model type and head size from the config.json the merge copies (from the
base model, else the first full model), so a recipe that cannot be scored fails in a second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft_lab.errors import UserError

__all__ = ["parse_eval", "prepare"]


def parse_eval(node: Any, where: str) -> Any:
    """The evaluator of a recipe's `eval:` block (None when absent), its settings checked."""
    if node is None:
        return None
    from peft_lab.eval import build_evaluator

    return build_evaluator(node, where=f"{where}: eval")


def prepare(recipe: Any, config_dir: Path | None) -> Callable[[Path, Path], dict[str, Any]] | None:
    """Check that the merge of `recipe` can be scored (before merging) and return `score(tmp_dir, out_dir)`, which
    scores the merged model written in `tmp_dir` and writes `tmp_dir/eval.json`; None when the recipe asks for no
    evaluation."""
    ev = getattr(recipe, "eval", None)
    if ev is None:
        return None
    from peft_lab.eval import ModelRef, check_scorable, evaluate

    if config_dir is None or not (config_dir / "config.json").is_file():
        raise UserError(
            f"eval={ev.name}: the merged model will have no config.json (the inputs are bare .safetensors files), so "
            "it cannot be loaded to be scored; merge Hugging Face model dirs, or drop the eval setting."
        )
    base = recipe.base if recipe.base and Path(recipe.base).is_dir() else None
    check_scorable(ev, ModelRef(str(config_dir), base, "the merged model"), "the merge")

    def score(tmp: Path, out: Path) -> dict[str, Any]:
        return evaluate(ev, ModelRef(str(tmp), base, str(out)), out=tmp, what="the merged model")

    return score
