"""notebooks/finetune_tour.ipynb runs top to bottom (quick settings: a tiny BERT, a few steps)."""

import os

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO


def test_finetune_tour_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_LAB_TOUR_QUICK", "1")
    monkeypatch.setenv("PEFT_LAB_TOUR_OUT", str(tmp_path / "tour"))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(REPO / "notebooks" / "finetune_tour.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "tour" / "tour.png").stat().st_size > 1000
    assert (tmp_path / "tour" / "lora" / "merged" / "config.json").exists()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "merged model: test accuracy" in text and "loldu" in text
