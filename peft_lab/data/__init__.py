"""Dataset builders: registry key = module name = `conf/data/<name>.yaml`'s `name`.

>>> from peft_lab.data import build_dataset
>>> dd = build_dataset("bbc_news", seed=0)   # DatasetDict: train 1488 / validation 213 / test 426
>>> dd = build_dataset("digits", classes=[5, 6, 7, 8, 9], transform="rot90+invert")
"""

from peft_lab.data.base import DATASETS, SPLITS, DataConfig, build_dataset, stratified_split

__all__ = ["DATASETS", "SPLITS", "DataConfig", "build_dataset", "stratified_split"]
