"""`run_merge(recipe, out_dir)`: open -> check -> prepare -> stream tensor by tensor into a temporary dir -> rename.

1. Open: validate the recipe (`merging.recipe`), open every input lazily (headers only).
2. Check: the inputs line up (same tensor names and shapes, every mismatch reported at once; adapters only
   touch base tensors) and the output dir is not one of them.
3. Inside `atomic_output_dir` (everything is written into a temporary dir beside OUT_DIR and renamed into place
   only when complete; an exception, Ctrl-C, SIGTERM or a full disk removes it), with input hashing started in
   a background thread (`merging.provenance`):
4. Prepare: `method.prepare(inputs)` (whole-model statistics; `inputs.scan` streams the model for it).
5. Stream: each output tensor, in the base model's order, is computed chunk by chunk (`merging.sources`: read
   float32 chunks, run the method's passes through `merging.stream.drive`, check finiteness, cast) and appended
   to the current shard. Non-float tensors (int buffers) are copied from the base unchanged.
6. Finish: the method's `artifacts()`, config/tokenizer files from the base, the recorded recipe with the input
   hashes in the safetensors headers (patched in place) and in `merge_recipe.yaml`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from merging.architecture import layer_positions
from merging.provenance import (
    RECIPE_FILE,
    RECIPE_KEY,
    Hasher,
    input_files,
    patch_metadata,
    read_recipe,
    record,
    write_recipe_file,
)
from merging.recipe import DTYPE_NAMES, Recipe, load_recipe
from merging.sources import Input, MergeStreams
from merging.stream import intra_op_threads, tuned_malloc
from peft_lab.errors import UserError
from peft_lab.tree import Thunk, Tree, atomic_output_dir, copy_files, is_delta, load_tree, mismatches, save_tree
from peft_lab.tree.fs import guard_output

__all__ = ["run_merge", "read_recipe", "RECIPE_KEY", "RECIPE_FILE", "COPIED_FILES"]

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def run_merge(
    recipe: str | os.PathLike | Mapping[str, Any] | Recipe, out_dir: str | os.PathLike, **options: Any
) -> Path:
    """Merge as a recipe says and write an HF-loadable model dir to `out_dir` (what `peft-lab merge` does).

    Args:
        recipe: a mergekit-style dict, a path to a YAML file holding one, or a parsed `Recipe`.
        out_dir: the output dir; must not exist or be empty unless `overwrite=True`.
        **options: run options (`merging.recipe.Options`): overwrite, allow_pickle, allow_nonfinite, progress,
            max_shard_size, hash, chunk_size.
    Returns:
        The output dir.
    """
    return _Merge(load_recipe(recipe, **options)).run(Path(out_dir))


class _MergedLeaf(Thunk):
    """One output tensor, computed chunk by chunk when the writer asks for it."""

    def __init__(self, streams: MergeStreams, name: str, shape, dtype: torch.dtype):
        super().__init__(lambda: None, [], shape, dtype, name=name)
        self._streams = streams

    def chunks(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        return self._streams.tensor_chunks(self.name, dtype)

    def dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        out = torch.cat(list(self.chunks(self.dtype))).reshape(self.shape)
        return out if dtype is None else out.to(dtype)


class _Merge:
    def __init__(self, recipe: Recipe):
        self.r = recipe
        self.method = recipe.method
        self.opts = recipe.options
        self.threads = None if recipe.options.threads == "auto" else recipe.options.threads

    def open(self) -> MergeStreams:
        r, allow = self.r, self.opts.allow_pickle
        paths = ([r.base] if r.base else []) + [m.path for m in r.models]
        missing = list(dict.fromkeys(p for p in paths if not Path(p).exists()))
        if missing:
            raise UserError(f"No such file or directory: {', '.join(missing)}. Check the paths in the recipe.")
        base = load_tree(r.base, allow_pickle=allow) if r.base else None
        if base is not None and is_delta(base):
            raise UserError(f"base_model {r.base} is an adapter (a set of changes); base_model must be a full model.")
        inputs = []
        for m in r.models:
            tree = load_tree(m.path, base=base, allow_pickle=allow)
            if is_delta(tree) and base is None:
                raise UserError(
                    f"{m.path} is an adapter (changes to a base model); give base_model, the model it was trained on."
                )
            inputs.append(Input(m.path, tree, is_delta(tree), m.params))
        resolver = r.resolver()
        positions = None
        if not resolver.constant:  # per-layer gradients: where each tensor sits in the model
            ref = base if base is not None else next(i.tree for i in inputs if not i.is_delta)
            positions = layer_positions(ref, config=self._config_dir([i.path for i in inputs if not i.is_delta]))
        return MergeStreams(
            self.method,
            base,
            inputs,
            base_label=r.base,
            chunk_size=self.opts.chunk_size,
            allow_nonfinite=self.opts.allow_nonfinite,
            bar=self.bar,
            threads=self.threads,
            resolver=resolver,
            positions=positions,
        )

    def check(self, streams: MergeStreams, out: Path) -> None:
        lines: list[str] = []
        for inp in streams.inputs:
            if inp.tree is not streams.ref:
                lines += mismatches(streams.ref, {inp.path: inp.tree}, allow_subset=inp.is_delta)
        if lines:
            shown = lines[:50] + ([f"... and {len(lines) - 50} more"] if len(lines) > 50 else [])
            raise UserError(
                f"The models do not line up with {streams.ref.source} ({len(lines)} problem(s)); they must share the "
                "architecture (tensor names and shapes):\n  " + "\n  ".join(shown)
            )
        guard_output(
            out, [self.r.base, *streams.labels], kind="merge", overwrite=self.opts.overwrite, what="The output dir"
        )

    def bar(self, total: int, desc: str, unit: str = "B"):
        from tqdm.auto import tqdm

        show = self.opts.progress if self.opts.progress is not None else sys.stderr.isatty()
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit == "B",
            unit_divisor=1024,
            disable=not show,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def record(self, streams: MergeStreams, digests: dict[Path, str] | None) -> dict[str, Any]:
        roles = [("base", self.r.base, None)] if self.r.base else []
        roles += [("model", i.path, i.is_delta) for i in streams.inputs]
        return record(self.r.to_dict(), roles, self.opts.hash, digests, allow_nonfinite=self.opts.allow_nonfinite)

    def run(self, out: Path) -> Path:
        streams = self.open()
        try:
            self.check(streams, out)
            return self._write(streams, out)
        finally:
            streams.close()

    def _write(self, streams: MergeStreams, out: Path) -> Path:
        ref, m = streams.ref, self.method
        out_dtype = {
            n: (self.r.dtype or leaf.dtype) if leaf.dtype.is_floating_point else leaf.dtype for n, leaf in ref.items()
        }
        merged = Tree(
            {
                n: _MergedLeaf(streams, n, leaf.shape, out_dtype[n]) if leaf.dtype.is_floating_point else leaf
                for n, leaf in ref.items()
            },
            source="merge",
        )
        total = sum(leaf.numel * out_dtype[n].itemsize for n, leaf in ref.items())
        paths = ([self.r.base] if self.r.base else []) + streams.labels
        hasher = None
        if self.opts.hash != "none":
            hasher = Hasher(list(dict.fromkeys(f for p in paths for f in input_files(p))), self.opts.hash)
        placeholder = json.dumps(self.record(streams, None), separators=(",", ":"))
        config_src = self.config_source(streams)
        t0 = time.perf_counter()
        try:
            with tuned_malloc(), atomic_output_dir(out, kind="merge", overwrite=self.opts.overwrite) as tmp:
                if hasher is not None:
                    hasher.start()
                m.prepare(streams.merge_inputs({} if self.r.data is None else {"data": self.r.data}))
                with intra_op_threads(self.threads), self.bar(total, f"{m.name} -> {out.name}") as bar:
                    written = save_tree(
                        merged,
                        tmp,
                        metadata={RECIPE_KEY: placeholder},
                        max_shard_size=self.opts.max_shard_size,
                        stem=self.weight_stem(config_src),
                        on_tensor=lambda _k, nbytes: bar.update(nbytes),
                    )
                for fname, text in m.artifacts().items():  # files a method writes beside the model
                    (tmp / fname).write_text(text)
                if config_src is not None:
                    copied = copy_files(config_src, tmp, COPIED_FILES)
                    if "config.json" in copied and self.r.dtype is not None:
                        self.set_config_dtype(tmp / "config.json", DTYPE_NAMES[self.r.dtype])
                digests = hasher.result() if hasher is not None else None
                final = self.record(streams, digests)
                if (text := json.dumps(final, separators=(",", ":"))) != placeholder:
                    patch_metadata(written, tmp, placeholder, text)
                write_recipe_file(tmp, final)
        finally:
            if hasher is not None and hasher.is_alive():  # a failed merge stops reading its inputs
                hasher.stop()
                hasher.join()
        self.seconds = time.perf_counter() - t0
        return out

    def config_source(self, streams: MergeStreams) -> Path | None:
        """The dir config/tokenizer files come from: the base model's, else the first full model's."""
        return self._config_dir([i.path for i in streams.inputs if not i.is_delta])

    def _config_dir(self, full_models: list[str]) -> Path | None:
        for p in ([self.r.base] if self.r.base else []) + full_models:
            if Path(p).is_dir():
                return Path(p)
        return None

    @staticmethod
    def weight_stem(src: Path | None) -> str:
        if src is not None and any(src.glob("diffusion_pytorch_model*.safetensors")):
            return "diffusion_pytorch_model"
        return "model"

    @staticmethod
    def set_config_dtype(path: Path, name: str) -> None:
        cfg = json.loads(path.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg]
        if keys:
            for k in keys:
                cfg[k] = name
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
