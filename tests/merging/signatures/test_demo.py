"""The digits demo (benchmarks/rws_demo.py) runs end to end on its quick setting."""

import importlib.util

from tests.conftest import REPO


def test_rws_demo_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("rws_demo", REPO / "benchmarks" / "rws_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    ((rows, curve, sizes, depth),) = demo.run(tmp_path, quick=True)
    for f in ("rws_table.md", "rws_table.csv", "rws_scale.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    md = (tmp_path / "rws_table.md").read_text()
    for row in (
        "clean model",
        "robust model (contrast)",
        "clean + σ_blur x1.5",
        "clean + all three σ x1/3",
        "clean + σ_noise int4",
        "clean + σ_contrast without BN stats",
        "B scratch: + σ_noise (A)",
    ):
        assert f"| {row} |" in md, row
    assert sizes["noise_int8"] < sizes["noise"] / 2 and sizes["noise_int4"] < sizes["noise_int8"]
    # a signature over every weight layer, patched at scale 1, is the robust model: same predictions
    for c in demo.CORRUPTIONS:
        assert depth[(5, c)][c] == rows[f"robust model ({c})"][c], c
        assert depth[(5, c)]["clean"] == rows[f"robust model ({c})"]["clean"], c
    assert curve[("noise", 0.0)] == rows["clean model"]
