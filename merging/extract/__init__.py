"""LoRA extraction and adapter outputs: `peft-lab extract` (a fine-tune and its base -> a LoRA) and the writer behind
merges with `out_format: adapter`. The SVD itself is tree math: `peft_lab.tree.lowrank`."""

from merging.extract.run import run_extract
from merging.extract.settings import AdapterSettings

__all__ = ["run_extract", "AdapterSettings"]
