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
7. Score (a recipe with `eval`, `merging.scoring`): the merged model in the temporary dir is evaluated into
   `eval.json` before the rename (checked before step 4, so a recipe that cannot be scored fails first).
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

from merging import scoring
from merging.architecture import read_config, stacks_of
from merging.outconfig import rewrite_config
from merging.plan import open_models, plan_merge, warn_unmatched_filters
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
from merging.sources import FileTable, MergeStreams
from merging.stream import intra_op_threads, tuned_malloc
from merging.vocab import Vocab, build_vocab, resolve_chat_template, write_tokenizer
from merging.vocab_rows import check_vocab_sizes, vocab_size, with_vocab
from peft_lab.errors import UserError
from peft_lab.tree import Thunk, Tree, atomic_output_dir, copy_files, mismatches, save_tree
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
NOT_TOKENIZER_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")


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
    """One output tensor, computed chunk by chunk when the writer asks for it (after `prepare`, when the merge
    prepares group by group)."""

    def __init__(self, streams: MergeStreams, name: str, shape, dtype: torch.dtype, prepare=None):
        super().__init__(lambda: None, [], shape, dtype, name=name)
        self._streams, self._prepare = streams, prepare

    def chunks(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        if self._prepare is not None:
            self._prepare()
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
        self.vocab: Vocab | None = None
        self._prepared: set[int] = set()

    def open(self) -> list[MergeStreams]:
        """Every model opened, the merge planned (`merging.plan`), one `MergeStreams` per group of tensors."""
        models = open_models(self.r)
        self.plan = plan_merge(self.r, models)
        warn_unmatched_filters(self.r, self.plan)
        self.configs = {k: read_config(o.dir) for k, o in models.items()}
        self.vocab = self.build_vocab()
        files = FileTable()
        out = []
        if self.vocab is not None:  # each model's embedding / LM-head rows reordered to the output vocabulary
            self.plan.groups = [with_vocab(g, self.vocab, self.configs) for g in self.plan.groups]
        for g in self.plan.groups:
            streams = MergeStreams(
                self.method,
                g.base,
                g.inputs,
                base_label=str(g.base_ref or self.r.base or ""),
                chunk_size=self.opts.chunk_size,
                allow_nonfinite=self.opts.allow_nonfinite,
                bar=self.bar,
                threads=self.threads,
                resolver=g.resolver,
                positions=g.positions,
                source_names=g.source_names,
                files=files,
            )
            out.append(streams)
        return out

    def build_vocab(self) -> Vocab | None:
        """The output tokenizer when the recipe asks for one; else the inputs' vocabularies must agree."""
        full = [o for o in self.plan.models.values() if not o.is_delta]
        sizes = {o.ref.key: vocab_size(self.configs.get(o.ref.key)) for o in full}
        if self.r.tokenizer is None:
            check_vocab_sizes([(str(o.ref), sizes[o.ref.key]) for o in full])
            return None
        if any(o.is_delta for o in self.plan.models.values()):
            raise UserError(
                "A tokenizer setting rebuilds the embedding rows of full models; adapter inputs cannot take part. "
                "Give `MODEL+LORA_DIR` to apply a LoRA to its model instead."
            )
        refs = [o.ref for o in full]
        base = self.r.base_ref or refs[0]
        missing = [str(o.ref) for o in full if o.dir is None]
        if missing:
            raise UserError(f"tokenizer settings need each model's dir (its tokenizer files): {', '.join(missing)}.")
        return build_vocab(self.r.tokenizer, base, refs, {o.ref.key: o.dir for o in full}, sizes)

    def check(self, streams: list[MergeStreams], out: Path) -> None:
        lines: list[str] = []
        for s, g in zip(streams, self.plan.groups, strict=True):
            where = "" if g.label == "models" else f"{g.label}: "
            for inp in s.inputs:
                if inp.tree is not s.ref:
                    lines += [where + x for x in mismatches(s.ref, {inp.path: inp.tree}, allow_subset=inp.is_delta)]
        if lines:
            shown = lines[:50] + ([f"... and {len(lines) - 50} more"] if len(lines) > 50 else [])
            ref = streams[0].ref.source
            raise UserError(
                f"The models do not line up with {ref} ({len(lines)} problem(s)); they must share the "
                "architecture (tensor names and shapes):\n  " + "\n  ".join(shown)
            )
        paths = [p for o in self.plan.models.values() for p in (o.ref.path, o.ref.lora) if p is not None]
        guard_output(out, paths, kind="merge", overwrite=self.opts.overwrite, what="The output dir")

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

    def roles(self) -> list[tuple[str, str, bool | None]]:
        """(role, path, is_delta) of every input: the base, the models, the LoRA dirs applied to them."""
        out = []
        for o in sorted(self.plan.models.values(), key=lambda o: o.role != "base"):
            out.append((o.role, o.ref.path, None if o.role == "base" else o.is_delta))
            if o.ref.lora is not None and not any(r[1] == o.ref.lora for r in out):
                out.append(("lora", o.ref.lora, None))
        return out

    def record(self, digests: dict[Path, str] | None) -> dict[str, Any]:
        rec = record(self.r.to_dict(), self.roles(), self.opts.hash, digests, allow_nonfinite=self.opts.allow_nonfinite)
        rec["arithmetic"] = "float32"
        return rec

    def run(self, out: Path) -> Path:
        streams = self.open()
        try:
            self.check(streams, out)
            return self._write(streams, out)
        finally:
            for s in streams:
                s.close()

    def _prepare(self, streams: list[MergeStreams], i: int) -> None:
        """`method.prepare` for group i, once (several groups: just before the group's first tensor)."""
        if i not in self._prepared:
            self._prepared.add(i)
            self.method.prepare(streams[i].merge_inputs({} if self.r.data is None else {"data": self.r.data}))

    def _tree(self, streams: list[MergeStreams]) -> Tree:
        leaves = {}
        for i, (s, g) in enumerate(zip(streams, self.plan.groups, strict=True)):
            for n in g.names:
                leaf = s.ref[n]
                if not leaf.dtype.is_floating_point:
                    leaves[n] = leaf
                    continue
                prep = None if len(streams) == 1 else (lambda _i=i: self._prepare(streams, _i))
                leaves[n] = _MergedLeaf(s, n, leaf.shape, self.r.dtype or leaf.dtype, prep)
        return Tree(leaves, source="merge")

    def _write(self, streams: list[MergeStreams], out: Path) -> Path:
        if self.r.adapter is not None:  # out_format: adapter: the merged deltas become LoRA factors
            from merging.extract.merge_out import write_adapter_merge

            return write_adapter_merge(self, streams, out)
        m = self.method
        merged = self._tree(streams)
        total = sum(leaf.nbytes for leaf in merged.values())
        paths = [p for role, p, _ in self.roles()]
        hasher = None
        if self.opts.hash != "none":
            hasher = Hasher(list(dict.fromkeys(f for p in paths for f in input_files(p))), self.opts.hash)
        placeholder = json.dumps(self.record(None), separators=(",", ":"))
        config_src = self.config_source()
        score = scoring.prepare(self.r, config_src)  # an `eval` recipe: checked now, scored before the rename
        t0 = time.perf_counter()
        try:
            with tuned_malloc(), atomic_output_dir(out, kind="merge", overwrite=self.opts.overwrite) as tmp:
                if hasher is not None:
                    hasher.start()
                if len(streams) == 1:
                    self._prepare(streams, 0)
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
                self.finish_files(config_src, tmp, streams)
                digests = hasher.result() if hasher is not None else None
                final = self.record(digests)
                if (text := json.dumps(final, separators=(",", ":"))) != placeholder:
                    patch_metadata(written, tmp, placeholder, text)
                write_recipe_file(tmp, final)
                if score is not None:
                    score(tmp, out)
        finally:
            if hasher is not None and hasher.is_alive():  # a failed merge stops reading its inputs
                hasher.stop()
                hasher.join()
        self.seconds = time.perf_counter() - t0
        return out

    def finish_files(self, src: Path | None, tmp: Path, streams: list[MergeStreams]) -> None:
        """config.json (rewritten for the output), generation config, tokenizer files and chat template."""
        if src is None:
            return
        names = COPIED_FILES if self.vocab is None else [f for f in COPIED_FILES if f in NOT_TOKENIZER_FILES]
        copied = copy_files(src, tmp, names)
        if "config.json" in copied:
            self.finish_config(tmp / "config.json", streams)
        dirs = [o.dir for o in self.plan.models.values() if o.dir is not None]
        write_tokenizer(tmp, self.vocab, resolve_chat_template(self.r.chat_template, dirs))

    def finish_config(self, path: Path, streams: list[MergeStreams]) -> None:
        dtype = DTYPE_NAMES[self.r.dtype] if self.r.dtype is not None else None
        if dtype is None and not self.plan.layers and self.vocab is None:
            return  # the donor's config as it is
        counts = {k: stacks_of(o.tree) for k, o in self.plan.models.items()}
        donor = self.donor()
        rewrite_config(
            path,
            dtype=dtype,
            layers=self.plan.layers,
            in_counts=counts[donor.ref.key] if donor is not None else {},
            configs=self.configs,
            model_counts=counts,
            vocab_rows=self.vocab.rows if self.vocab is not None else None,
        )

    def donor(self):
        """The model whose config and tokenizer files the output takes: the base, else the first full model."""
        full = [o for o in self.plan.models.values() if not o.is_delta and o.dir is not None]
        base = next((o for o in full if o.ref.same(self.r.base_ref)), None)
        return base or (full[0] if full else None)

    def config_source(self) -> Path | None:
        """The dir config/tokenizer files come from: the base model's, else the first full model's."""
        d = self.donor()
        return d.dir if d is not None else None

    @staticmethod
    def weight_stem(src: Path | None) -> str:
        if src is not None and any(src.glob("diffusion_pytorch_model*.safetensors")):
            return "diffusion_pytorch_model"
        return "model"
