"""`peft-lab {train, merge, extract, eval, signature, bench}`: parse, call one function, print a `UserError` as
one paragraph.

Each subcommand lives with the code it drives and exposes `main(argv) -> int`; this file only dispatches,
so importing it stays cheap. User mistakes exit with code 2 and no traceback (`--debug` or
`HYDRA_FULL_ERROR=1` shows one); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap

from peft_lab.errors import UserError

__all__ = ["main", "report_user_error"]

COMMANDS = {
    "train": ("peft_lab.train.cli", "fine-tune a model with an adapter (Hydra: peft-lab train adapter=lora ...)"),
    "merge": ("merging.cli", "merge models (peft-lab merge --config RECIPE.yaml --out DIR, or Hydra overrides)"),
    "extract": ("merging.extract.cli", "a LoRA from a fine-tune: --base B --model FT --rank R --out DIR"),
    "eval": ("peft_lab.eval.cli", "score a model: peft-lab eval model=DIR eval=classification|perplexity|lm_eval ..."),
    "signature": ("merging.signatures.cli", "robust weight signatures: extract | patch | unpatch | list"),
    "bench": ("peft_lab.bench", "benchmarks: merge [--quick] | kernels"),
}

USAGE = (
    "usage: peft-lab {"
    + ",".join(COMMANDS)
    + "} [ARGS...]\n\n"
    + "\n".join(f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items())
)


def debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("PEFT_LAB_DEBUG") == "1"


def report_user_error(err: UserError) -> None:
    msg = str(err).strip() or type(err).__name__
    paragraphs = [
        textwrap.fill(p, 110, break_long_words=False, break_on_hyphens=False) if "\n" not in p else p
        for p in msg.split("\n\n")
    ]
    print("peft-lab: error: " + "\n\n".join(paragraphs), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from peft_lab import __version__

        print(f"peft-lab {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"peft-lab: error: unknown command {cmd!r}.\n{USAGE}", file=sys.stderr)
        return 2
    debug = debug_enabled(rest)
    if "--debug" in rest:
        rest = [a for a in rest if a != "--debug"]
        os.environ["PEFT_LAB_DEBUG"] = "1"
    try:
        module = importlib.import_module(COMMANDS[cmd][0])
        return int(module.main(rest) or 0)
    except UserError as e:
        if debug:
            raise
        report_user_error(e)
        return 2
    except KeyboardInterrupt:
        print("peft-lab: interrupted; nothing was left half-written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
