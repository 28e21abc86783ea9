"""The merging tour notebook runs top to bottom (on its trimmed `tiny` setting: the `quick` one is the
`peft-lab bench merge --quick` benchmark, minutes long)."""

import os

import pytest

from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_merging_tour_executes():
    nb = nbformat.read(REPO / "notebooks" / "merging_tour.ipynb", as_version=4)
    env_before = dict(os.environ)
    os.environ["PEFT_LAB_TOUR_SIZE"] = "tiny"
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        client = nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # accuracies, sign conflicts, coefficients, losses
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "task-wise λ" in text and "conflicting signs" in text
