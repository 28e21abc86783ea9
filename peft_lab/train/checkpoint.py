"""Checkpoints that make a killed run resumable to the same result.

A checkpoint is a dir `DIR/checkpoints/step_<k>/` holding everything the next step depends on:
- `trainable.safetensors`: the trained parameters and the module's buffers (frozen weights are rebuilt from the
  same base and seed, so an adapter checkpoint stays adapter-sized);
- `optimizer.pt`, `scheduler.pt`: their state dicts (plain tensors and numbers: loaded with `weights_only=True`);
- `rng_<rank>.pt`: Python, NumPy and torch (CPU and CUDA) RNG states of each process;
- `adapter_state.pt`: an adapter's training state outside its parameters, if it has any (its optional
  `training_state()` / `load_training_state(state)`; e.g. the sparse adapter's open grow/drop phase);
- `state.json`: step, running loss, timings, evaluation history, logger state, the run's fingerprint.
The order of examples needs no state: it is a function of (seed, step) (see `sampler.py`).

Writes go to `.tmp-step_<k>` and are renamed into place when complete, so a kill mid-write leaves the previous
checkpoint intact; `state.json` is written last and marks a complete checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peft_lab.errors import UserError

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "STATE_FILE"]

STATE_FILE = "state.json"
_RX = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain numbers (no pickled objects)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (version, torch.tensor(mt, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _RX.match(p.name)) and (p / STATE_FILE).exists()]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (DIR/checkpoints), or None."""
    found = _checkpoints(Path(root))
    return found[-1][1] if found else None


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    tensors: dict[str, torch.Tensor],
    optimizer,
    scheduler,
    state: dict[str, Any],
    adapter_state: dict[str, Any] | None = None,
    rank: int = 0,
    is_main: bool = True,
    keep: int = 1,
    barrier=lambda: None,
) -> Path:
    """Write checkpoint `step` under `root` atomically and prune all but the newest `keep`.

    Every process calls this (each saves its RNG state); only `is_main` writes the shared files. `barrier`
    synchronises processes before the rename.
    """
    root = Path(root)
    final, tmp = root / f"step_{step:07d}", root / f".tmp-step_{step:07d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    if is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if adapter_state is not None:
            torch.save(adapter_state, tmp / "adapter_state.pt")
    barrier()
    if is_main:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in _checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: str | Path,
    *,
    module: torch.nn.Module,
    extra: dict[str, torch.Tensor],
    optimizer,
    scheduler,
    adapter=None,
    rank: int = 0,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint into `module` (trained parameters + buffers, by state_dict name), `extra` (trained tensors
    that are not module parameters), the optimizer, the scheduler, the adapter's training state and this
    process's RNGs; returns state.json."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise UserError(
            f"{path.parent.parent}: holds a checkpoint of a different run (its model/data/adapter/trainer settings "
            "differ from this one's). Use another output_dir, or trainer.resume=false to start over (its checkpoints "
            "are replaced)."
        )
    saved = load_file(str(path / "trainable.safetensors"))
    sd = module.state_dict(keep_vars=True)
    unknown = [k for k in saved if k not in sd and k not in extra]
    if unknown:
        raise UserError(f"{path}: the checkpoint has tensors this model does not: {', '.join(unknown[:5])}.")
    with torch.no_grad():
        for k, v in saved.items():
            target = sd[k] if k in sd else extra[k]
            if tuple(target.shape) != tuple(v.shape):  # e.g. a sparse adapter whose index set was re-chosen
                target.data = v.to(target.device, target.dtype)
            else:
                target.copy_(v)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if adapter is not None and (path / "adapter_state.pt").exists() and hasattr(adapter, "load_training_state"):
        device = next(module.parameters()).device
        adapter.load_training_state(torch.load(path / "adapter_state.pt", weights_only=True, map_location=device))
    rng = path / f"rng_{rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))
    return state
