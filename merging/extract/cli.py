"""`peft-lab extract`: a fine-tune and its base -> a LoRA (`merging.extract.run_extract`). Two forms:

    peft-lab extract --base BASE --model FINETUNED --out OUT_DIR (--rank R | --energy F [--max-rank R])
                     [--rank-pattern MODULE=R ...] [--format peft|kohya] [--bias auto|lora|none]
                     [--embeddings lora|save|none] [--svd auto|exact|randomized] [--dtype float32|bfloat16|float16]
                     [--component auto|unet|te|te1|te2] [--overwrite] [--allow-pickle] [--no-progress]
    peft-lab extract base=BASE finetuned=FINETUNED out=OUT_DIR rank=16                  (Hydra, conf/extract.yaml)
    peft-lab extract -m base=BASE finetuned=FINETUNED out=SWEEP_DIR rank=8,16,32        (a sweep: SWEEP_DIR/rank=8, ...)

OUT_DIR receives the adapter (adapter_config.json + adapter_model.safetensors, or pytorch_lora_weights.safetensors
in the Kohya format), adapter_report.csv (per tensor: action, rank, kept energy, relative error) and extract.json.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path
from typing import Any

from peft_lab.errors import UserError
from peft_lab.hydra_app import HydraApp, is_multirun, job_dirname, split_args

__all__ = ["main"]

APP = HydraApp("peft-lab extract", "extract", scratch=True, prefix="peft-lab extract: ")
_NOT_IN_DIRNAME = {"out", "base", "finetuned", "overwrite", "progress", "allow_pickle"}
_RUN_KEYS = ("overwrite", "allow_pickle", "progress")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-lab extract", description="Extract a LoRA from a fine-tune and its base.")
    p.add_argument("--base", required=True, help="the base model (HF dir or .safetensors)")
    p.add_argument("--model", required=True, help="the fine-tuned model, or an adapter dir on the base")
    p.add_argument("--out", required=True, help="output dir (must not exist or be empty, unless --overwrite)")
    p.add_argument("--rank", type=int, help="the rank of every matrix")
    p.add_argument("--energy", type=float, help="keep this fraction of each delta's energy (0 < F <= 1)")
    p.add_argument("--max-rank", type=int, help="with --energy: at most this rank")
    p.add_argument("--rank-pattern", action="append", default=[], metavar="MODULE=R", help="rank per module pattern")
    p.add_argument("--format", choices=["peft", "kohya"], help="peft (default) or kohya")
    p.add_argument("--bias", choices=["auto", "lora", "none"], help="bias deltas through PEFT's lora_bias")
    p.add_argument("--embeddings", choices=["lora", "save", "none"], help="embedding deltas: LoRA, saved whole, none")
    p.add_argument("--svd", choices=["auto", "exact", "randomized"], help="how the SVD is computed")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="the factors' dtype on disk")
    p.add_argument("--component", choices=["auto", "unet", "te", "te1", "te2"], help="Kohya key prefix")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace OUT once the new one is complete")
    p.add_argument("--allow-pickle", action="store_true", default=None, help="load .bin/.pt inputs (can run code)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="a progress bar")
    return p


def _rank_pattern(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key or not value.strip().lstrip("+").isdigit():
            raise UserError(f"--rank-pattern {item!r}: expected MODULE=RANK, e.g. q_proj=32.")
        out[key] = int(value)
    return out


def _log_to_stderr() -> None:
    log = logging.getLogger("peft_lab.extract")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _flag_form(argv: list[str]) -> int:
    from merging.extract.run import run_extract

    a = _parser().parse_args(argv)
    kw: dict[str, Any] = {k: v for k, v in vars(a).items() if k not in ("base", "model", "out", "rank_pattern")}
    if a.rank_pattern:
        kw["rank_pattern"] = _rank_pattern(a.rank_pattern)
    _log_to_stderr()
    print(run_extract(a.base, a.model, a.out, **kw))
    return 0


def _job(cfg, *, multirun: bool, outs: list[Path]) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from merging.extract.run import run_extract

    d = OmegaConf.to_container(cfg, resolve=True)
    out = Path(str(d.pop("out")))
    raw_out = OmegaConf.to_container(cfg, resolve=False).get("out")
    if multirun and "${" not in str(raw_out):
        hc = HydraConfig.get()
        out = out / (job_dirname(list(hc.overrides.task), _NOT_IN_DIRNAME, unplus=False) or f"job{hc.job.num}")
    base, model = d.pop("base"), d.pop("finetuned")
    outs.append(run_extract(base, model, out, **d))


def _hydra_form(argv: list[str]) -> int:
    flags, overrides = split_args(argv)
    outs: list[Path] = []
    _log_to_stderr()
    code = APP.run(functools.partial(_job, multirun=is_multirun(flags), outs=outs), [*flags, *overrides])
    for o in outs:
        print(o)
    return code


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__)
        return 0
    if any(a.split("=", 1)[0] in ("--base", "--model", "--out") for a in argv):
        return _flag_form(argv)
    return _hydra_form(argv)
