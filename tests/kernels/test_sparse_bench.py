"""The sparse-kernel benchmark runs end to end on tiny shapes and reports what it promises (no timings asserted)."""

from __future__ import annotations

import re

from peft_lab.kernels.sparse import bench


def test_bench_prints_every_path_and_the_memory_it_saves(capsys):
    argv = ["--out-features", "200", "--in-features", "120", "--batch", "2", "--seq", "4"]
    argv += ["--densities", "0.02,0.1", "--repeat", "1", "--device", "cpu"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\d+)\s+(\w+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+([\d.]+)$", line)
        if m:
            rows[(m[1], m[3])] = (int(m[2]), float(m[7]))
    # SHiRA's budget r·(out + in): r = 2 -> 640 entries (2.667%), r = 8 -> 2560 (10.667%)
    assert {(k[0], n) for k, (n, _) in rows.items()} == {("2.667", 640), ("10.667", 2560)}
    for density in ("2.667", "10.667"):
        for path in ("reference", "naive", "shira"):
            assert (density, path) in rows, (density, path, out)
        assert rows[(density, "reference")][1] == 0.0  # saves nothing beyond its inputs
        dense_mb = 200 * 120 * 2 / 2**20  # bfloat16
        assert rows[(density, "naive")][1] >= dense_mb - 1e-3  # a dense W + S kept for the backward
        assert rows[(density, "shira")][1] >= dense_mb - 1e-3
    assert "value gradient alone" in out and "forward / plain dense forward" in out


def test_bench_refuses_bad_arguments(cli):
    r = cli("bench", "kernels", "--densities", "2")
    assert r.returncode == 2 and "--densities must lie in (0, 1]" in r.stderr and "Traceback" not in r.stderr
