"""Robust Weight Signatures: extract a robustness delta from (clean, robust) model pairs, store it small, patch
it into a model and take it out again bit for bit. `signature` holds the math and the file format, `layers`
the choice of kept layers, `patch` the patch/unpatch commands over model dirs, `cli` `peft-lab signature`."""
