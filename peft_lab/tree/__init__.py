"""The parameter tree: the currency between adapters, merges and I/O (see docs/design.md)."""

from peft_lab.tree.check import check_compatible, mismatches
from peft_lab.tree.core import Tree
from peft_lab.tree.io import (
    atomic_output_dir,
    copy_files,
    is_delta,
    load_model_dir,
    load_peft_dir,
    load_safetensors,
    load_tree,
    model_weight_files,
    read_header,
    save_tree,
)
from peft_lab.tree.leaves import LDU, Dense, Kronecker, Lazy, Leaf, LowRank, Sparse, Thunk
from peft_lab.tree.ops import (
    apply,
    apply_to_module,
    delta,
    exclude,
    is_float,
    matches,
    materialize,
    select,
    tree_map,
    zip_map,
)
from peft_lab.tree.quantized import Quantized, quantize

__all__ = [
    "Tree",
    "Leaf",
    "Dense",
    "Lazy",
    "Thunk",
    "LowRank",
    "Kronecker",
    "Sparse",
    "LDU",
    "Quantized",
    "quantize",
    "tree_map",
    "zip_map",
    "select",
    "exclude",
    "matches",
    "delta",
    "apply",
    "apply_to_module",
    "materialize",
    "is_float",
    "check_compatible",
    "mismatches",
    "load_tree",
    "load_safetensors",
    "load_model_dir",
    "load_peft_dir",
    "model_weight_files",
    "read_header",
    "save_tree",
    "atomic_output_dir",
    "copy_files",
    "is_delta",
]
