"""`make demo`'s script on a tiny model: train -> `peft-lab merge` -> the merged model scores what the adapter did."""

import os
import subprocess
import sys

from tests.conftest import REPO


def test_demo_pipeline_on_a_tiny_model(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "peft_lab.demo",
            "--out",
            str(out),
            "model=tiny_bert",
            "trainer=tiny",
            "data.max_train_samples=32",
            "data.max_eval_samples=64",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the merged model scores the same as the adapter" in r.stdout
    assert (out / "merged" / "model.safetensors").exists() and (out / "merged" / "merge_recipe.yaml").exists()
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "base_model" / "config.json").exists()
