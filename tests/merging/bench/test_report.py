"""The benchmark's statistics: the 95 % interval over seeds, normalized accuracy, and the papers' claims as
paired comparisons (holds / fails / unresolved)."""

import math

import pytest

from merging.bench.report import claims, interval, summarize


def _rows(method, variant, accs_per_seed, tasks=("a", "b")):
    return [{"seed": s, "method": method, "variant": variant, "task": t, "split": "test", "acc": acc, "hparams": "{}"}
            for s, acc in enumerate(accs_per_seed) for t in tasks]  # fmt: skip


def test_interval_is_the_t_interval_of_the_mean():
    assert interval([1.0, 2.0, 3.0]) == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert math.isnan(interval([5.0]))


def test_summary_normalizes_by_each_seeds_fine_tuned_model():
    rows = _rows("fine-tuned (individual)", "-", [0.8, 1.0]) + _rows("linear", "paper", [0.4, 0.9])
    _, table, records = summarize(rows)
    lin = next(r for r in records if r["method"] == "linear")
    assert lin["avg"] == pytest.approx(65.0) and lin["normalized"] == pytest.approx(100 * (0.5 + 0.9) / 2)
    assert table[0][0] == "fine-tuned (individual)" and table[1][-2] == f"± {interval([40.0, 90.0]):.1f}"


def test_claims_are_paired_over_seeds():
    rows = (_rows("zero-shot", "-", [0.60, 0.61, 0.62]) + _rows("ties", "paper", [0.70, 0.72, 0.71])
            + _rows("task_arithmetic", "paper", [0.68, 0.70, 0.69])  # TIES wins by 2 points on every seed
            + _rows("linear", "paper", [0.69, 0.66, 0.70])  # task arithmetic vs linear: +-, unresolved
            + _rows("dare_linear", "paper", [0.681, 0.699, 0.69])  # within a point of task arithmetic
            + _rows("adamerging (layer-wise)", "paper", [0.60, 0.62, 0.61]))  # below TIES on every seed  # fmt: skip
    header, out = claims(rows)
    got = {r[0]: r for r in out}
    assert header[-1] == "verdict"
    assert got["TIES > task arithmetic"][1] == "+2.0" and got["TIES > task arithmetic"][-1] == "holds"
    assert got["TIES > task arithmetic"][3] == "3/3"
    assert got["task arithmetic > weight averaging"][-1] == "unresolved"
    assert got["AdaMerging layer-wise > TIES"][-1] == "fails"
    assert got["DARE (drop 90 %) loses nothing vs task arithmetic"][-1] == "holds"
    assert got["ties >= zero-shot + 3"][-1] == "holds"  # +10 points on every seed
    assert "adamerging (layer-wise) >= zero-shot + 3" not in got  # the bar is for data-free merges
    assert "Fisher > weight averaging" not in got  # rows the run lacks: no claim
