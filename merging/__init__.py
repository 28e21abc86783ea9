"""Model merging over parameter trees: operators in `merging.methods`, the streaming executor in `merging.run`.

`run_merge(recipe, out_dir)` is what `peft-lab merge` does, for a mergekit-style recipe given as a dict or a
path to a YAML file.
"""

from merging.base import METHODS, MergeInputs, MergeMethod, ModelParams, TensorJob
from merging.provenance import read_recipe
from merging.recipe import Recipe, load_recipe, parse_recipe
from merging.run import run_merge

__all__ = [
    "run_merge",
    "read_recipe",
    "METHODS",
    "MergeMethod",
    "MergeInputs",
    "ModelParams",
    "TensorJob",
    "Recipe",
    "load_recipe",
    "parse_recipe",
]
