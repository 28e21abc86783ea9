"""`peft-lab signature extract | patch | unpatch | list | pack`.

    peft-lab signature extract --clean CLEAN --robust ROBUST --out SIG.safetensors [--layers N|PATTERN|rel:R|all]
                               [--bits 32|16|8|4] [--pretrained PRE] [--name NAME] [--no-stats]
    peft-lab signature patch   --model MODEL --signature SIG [--scale S] [--signature SIG2 [--scale S2]] --out OUT
    peft-lab signature unpatch --model PATCHED --signature SIG [--scale S] ... --out OUT [--force]
    peft-lab signature list    PATH...      (signature files, banks, folders, or patched models)
    peft-lab signature pack    SIG... --out BANK.safetensors

A `--scale` belongs to the `--signature` just before it (default 1.0). `SIG` is a file, a folder, or
`BANK::NAME` for one signature of a bank.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merging.signatures.signature import (
    SIGNATURE_OUTPUT,
    LayerSelection,
    Signature,
    extract,
    load_signatures,
    resolve_signature,
    save_signatures,
)
from peft_lab.errors import UserError
from peft_lab.tree import guard_output, load_tree, model_weight_files

__all__ = ["main"]


class _Pair(argparse.Action):
    """Collects `--signature` / `--scale` in order: a scale attaches to the signature given just before it."""

    def __call__(self, parser, ns, value, option_string=None):
        pairs = getattr(ns, "pairs", None) or []
        if option_string == "--signature":
            pairs.append([value, None])
        else:
            if not pairs:
                raise UserError(f"--scale {value}: give it after the --signature it belongs to.")
            if pairs[-1][1] is not None:
                raise UserError(
                    f"--scale {value}: {pairs[-1][0]} already has --scale {pairs[-1][1]:g}; "
                    "repeat --signature to patch it twice."
                )
            pairs[-1][1] = value
        ns.pairs = pairs


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="peft-lab signature", description="Robust Weight Signatures (arXiv 2302.12480).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    ex = sub.add_parser("extract", help="cut robust − clean on the kept layers into a signature file")
    ex.add_argument("--clean", required=True, help="the clean model (HF dir or .safetensors)")
    ex.add_argument("--robust", required=True, help="the robust model, or an adapter trained from the clean one")
    ex.add_argument("--out", required=True, help="the signature file (.safetensors)")
    ex.add_argument(
        "--layers",
        default=None,
        help="N (first N weight layers), PATTERN[,PATTERN], rel:R, or all (default: the shallow half)",
    )
    ex.add_argument(
        "--bits", type=int, default=32, choices=[32, 16, 8, 4], help="storage: float32, float16, int8, int4"
    )
    ex.add_argument(
        "--pretrained", default=None, help="θ_pre: use the projection form (clean and robust fine-tuned from it)"
    )
    ex.add_argument("--name", default=None, help="the signature's name (default: the file's stem)")
    ex.add_argument("--no-stats", action="store_true", help="leave normalisation running statistics out")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing file")

    for name, help in (("patch", "add scale·signature to a model"), ("unpatch", "take signatures off a patched model")):
        p = sub.add_parser(name, help=help)
        p.add_argument("--model", required=True, help="an HF model dir or a .safetensors file")
        p.add_argument("--signature", action=_Pair, required=True, help="SIG file, folder, or BANK::NAME (repeatable)")
        p.add_argument("--scale", action=_Pair, type=float, help="scale of the --signature before it (default 1.0)")
        p.add_argument("--out", required=True, help="the output model dir (a .safetensors file for a file model)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        if name == "unpatch":
            p.add_argument("--force", action="store_true", help="subtract even if the model's record does not list it")

    ls = sub.add_parser("list", help="list signatures in files, banks and folders, or those patched into a model")
    ls.add_argument("paths", nargs="+")

    pk = sub.add_parser("pack", help="put several signatures into one bank file")
    pk.add_argument("signatures", nargs="+", help="SIG files, folders or BANK::NAME")
    pk.add_argument("--out", required=True)
    pk.add_argument("--overwrite", action="store_true", help="replace an existing file")
    return ap


def _pairs(ns) -> list[tuple[Signature, float]]:
    return [(resolve_signature(spec), 1.0 if scale is None else scale) for spec, scale in ns.pairs]


def _row(sig: Signature, where: str) -> dict[str, str]:
    r = sig.record
    layers = r.get("layers", [])
    return {
        "name": sig.name,
        "file": where,
        "mode": r.get("mode", "?"),
        "bits": str(r.get("bits", "?")),
        "layers": f"{len(layers)}: {', '.join(layers[:3])}{' ...' if len(layers) > 3 else ''}",
        "tensors": str(len(sig.tree)),
        "bytes": str(sig.nbytes),
        "hash": sig.hash[:12],
        "clean": r.get("sources", {}).get("clean", {}).get("hash", "?")[:12],
        "robust": r.get("sources", {}).get("robust", {}).get("hash", "?")[:12],
    }


def _table(rows: list[dict[str, str]]) -> str:
    cols = list(rows[0])
    w = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(w[c]) for c in cols)]
    lines += ["  ".join(r[c].ljust(w[c]) for c in cols) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _list(paths: list[str]) -> None:
    from merging.signatures.patch import read_record
    from merging.signatures.signature import SIGNATURES_KEY

    rows = []
    for p in paths:
        if Path(p).is_dir() and not _is_model_dir(Path(p)):
            rows += [_row(s, str(s.tree.source)) for s in load_signatures(p)]
            continue
        tree = load_tree(p)
        if SIGNATURES_KEY in tree.meta:
            rows += [_row(s, str(s.tree.source)) for s in load_signatures(p)]
            continue
        steps = read_record(tree)["steps"]
        print(f"{p}: a model with {len(steps)} patch step(s)" + (":" if steps else " (no peft-lab patch record)."))
        for st in steps:
            sigs = ", ".join(f"{e['name']} x{e['scale']:g} (hash {e['hash'][:12]})" for e in st["signatures"])
            print(
                f"  step {st['id']}: {sigs}; {len(st['keys'])} tensors; "
                f"{'bitwise restorable' if st['restore'] else 'subtract-only'}"
            )
    if rows:
        print(_table(rows))


def _is_model_dir(p: Path) -> bool:
    try:
        model_weight_files(p)
        return True
    except UserError:
        return False


def main(argv: list[str]) -> int:
    ns = _parser().parse_args(argv)
    if ns.cmd == "extract":
        inputs = [ns.clean, ns.robust, ns.pretrained]
        guard_output(ns.out, inputs, kind=SIGNATURE_OUTPUT, overwrite=ns.overwrite)  # before the work, not after
        clean = load_tree(ns.clean)
        robust = load_tree(ns.robust, base=clean)
        pre = load_tree(ns.pretrained) if ns.pretrained else None
        name = ns.name or Path(ns.out).name.removesuffix(".safetensors")
        sig = extract(
            clean,
            robust,
            layers=LayerSelection.parse(ns.layers),
            bits=ns.bits,
            pretrained=pre,
            name=name,
            stats=not ns.no_stats,
        )
        path = save_signatures([sig], ns.out, overwrite=ns.overwrite, inputs=inputs)
        r = sig.record
        full = sum(clean[k].nbytes for k in sig.tree)
        print(
            f"signature {name!r} ({r['mode']}, layers {r['selection']}): {len(r['layers'])} layers, {len(sig.tree)} "
            f"tensors, {r['scheme'].split(';')[0]}: {sig.nbytes} bytes (those tensors take {full} bytes in the "
            f"model); max |error| of storage {r['max_abs_error']:.3g}"
        )
        print(f"  layers ({r['order']} order): {', '.join(r['layers'])}")
        if r["order"] == "natural":
            print(
                f"  note: {ns.clean} does not record its layer order (no config.json naming its class); layers were "
                "counted in natural name order. Check the list above, or select them by pattern.",
                file=sys.stderr,
            )
        print(f"  wrote {path} (hash {sig.hash[:12]})")
        return 0
    if ns.cmd in ("patch", "unpatch"):
        from merging.signatures.patch import patch, unpatch

        pairs = _pairs(ns)
        if ns.cmd == "patch":
            res = patch(ns.model, pairs, ns.out, overwrite=ns.overwrite)
        else:
            res = unpatch(ns.model, pairs, ns.out, force=ns.force, overwrite=ns.overwrite)
        what = ", ".join(f"{s.name} x{a:g}" for s, a in pairs)
        print(f"{res.how} {what}: {len(res.touched)} tensors; wrote {res.out}")
        for n in res.notes:
            print(f"  note: {n}", file=sys.stderr)
        return 0
    if ns.cmd == "list":
        _list(ns.paths)
        return 0
    if ns.cmd == "pack":
        sigs = [
            s for spec in ns.signatures for s in ([resolve_signature(spec)] if "::" in spec else load_signatures(spec))
        ]
        path = save_signatures(
            sigs, ns.out, overwrite=ns.overwrite, inputs=[spec.partition("::")[0] for spec in ns.signatures]
        )
        print(f"packed {len(sigs)} signatures ({', '.join(s.name for s in sigs)}) into {path}")
        return 0
    return 2
