"""Dataset builders: splits (stratified, seeded, disjoint), digits transforms and subsets, the generic HF loader."""

from collections import Counter

import numpy as np
import pytest

from peft_lab.data import DATASETS, build_dataset, stratified_split
from peft_lab.data.digits import TRANSFORMS, Digits, apply_transform
from peft_lab.errors import UserError


def test_registry_names():
    assert {"bbc_news", "digits", "hf"} <= set(DATASETS.names())


def test_stratified_split_partitions_and_keeps_proportions():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    parts = stratified_split(labels, {"validation": 0.1, "test": 0.2}, seed=3)
    all_idx = np.concatenate(list(parts.values()))
    assert sorted(all_idx.tolist()) == list(range(100))  # a partition
    assert len(parts["test"]) == 20 and len(parts["validation"]) == 10
    assert Counter(labels[parts["test"]].tolist()) == {0: 10, 1: 6, 2: 4}
    again = stratified_split(labels, {"validation": 0.1, "test": 0.2}, seed=3)
    assert all((again[k] == parts[k]).all() for k in parts)
    other = stratified_split(labels, {"validation": 0.1, "test": 0.2}, seed=4)
    assert not (other["test"] == parts["test"]).all()


def test_bbc_news_splits():
    dd = build_dataset("bbc_news", seed=0)
    assert {k: len(v) for k, v in dd.items()} == {"train": 1488, "validation": 213, "test": 426}
    assert dd["train"].features["label"].names == ["tech", "business", "politics", "sport", "entertainment"]
    texts = [set(dd[k]["text"]) for k in dd]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    test_counts = Counter(dd["test"]["label"])
    assert sum(len(v) for v in build_dataset("bbc_news", deduplicate=False).values()) == 2225
    assert abs(test_counts[3] / 426 - 0.23) < 0.01 and abs(test_counts[4] / 426 - 0.17) < 0.01  # topic shares kept
    assert build_dataset("bbc_news", seed=0)["test"]["text"] == dd["test"]["text"]
    assert build_dataset("bbc_news", seed=1)["test"]["text"] != dd["test"]["text"]
    small = build_dataset("bbc_news", max_train_samples=20, max_eval_samples=10)
    assert len(small["train"]) == 20 and len(small["test"]) == 10 and len(set(small["train"]["label"])) > 2


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_digit_transforms_keep_shape_and_range(name):
    x = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    y = apply_transform(x, name, seed=1)
    assert y.shape == x.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    if name != "identity":
        assert not np.allclose(x, y)
    if name != "invert":  # every other transform moves pixels: the multiset of values is kept
        assert np.allclose(np.sort(x.reshape(5, -1), 1), np.sort(y.reshape(5, -1), 1))


def test_digit_transforms_compose():
    x = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    assert np.allclose(apply_transform(x, "rot90+rot90+rot90+rot90"), x)
    assert np.allclose(apply_transform(x, "rot90+rot270"), x)
    assert np.allclose(apply_transform(x, "invert+invert"), x)
    assert not np.allclose(apply_transform(x, "permute", seed=0), apply_transform(x, "permute", seed=1))
    with pytest.raises(UserError, match="unknown transform 'spin'.*rot90"):
        apply_transform(x, "rot90+spin")


def test_digits_subsets_and_relabel():
    dd = Digits(classes=[5, 6, 7, 8, 9]).build()
    assert set(dd["train"]["label"]) == {5, 6, 7, 8, 9}
    assert np.asarray(dd["train"][0]["image"]).shape == (8, 8)
    assert sum(len(v) for v in dd.values()) == sum(1 for y in Digits().arrays()[1] if y >= 5)
    rel = Digits(classes=[7, 3], relabel=True).build()
    assert set(rel["train"]["label"]) == {0, 1} and rel["train"].features["label"].names == ["7", "3"]
    x_rot, _ = Digits(transform="rot90").arrays()
    x, _ = Digits().arrays()
    assert np.allclose(np.rot90(x, 1, axes=(1, 2)), x_rot)
    with pytest.raises(UserError, match=r"classes=\[1, 12\] is out of range: each item must be in \[0, 9\]"):
        Digits(classes=[1, 12])
    with pytest.raises(UserError, match="distinct digits"):
        Digits(classes=[1, 1])


def test_hf_loader_local_csv(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("sentence,y\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(40)))
    with pytest.raises(UserError, match=r"no column\(s\) 'text', 'label'.*sentence, y.*text_column"):
        build_dataset("hf", path=str(p))
    dd = build_dataset("hf", path=str(p), text_column="sentence", label_column="y", validation_fraction=0.25)
    assert set(dd) == {"train", "validation"} and len(dd["validation"]) == 10
    assert dd["train"].column_names == ["text", "label"] and dd["train"].features["label"].names == ["a", "b"]
    with pytest.raises(UserError, match="does not exist"):
        build_dataset("hf", path="csv", data_files=str(tmp_path / "missing.csv"))


def test_bad_parameters():
    with pytest.raises(UserError, match="has no parameter.*it takes"):
        build_dataset("bbc_news", colour="red")
    with pytest.raises(UserError, match="leaves nothing"):
        build_dataset("bbc_news", validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError, match=r"data=digits: data\.max_train_samples=0 is out of range: must be >= 1"):
        build_dataset("digits", max_train_samples=0)
