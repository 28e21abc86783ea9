"""Writing outputs safely: atomic output dirs and files, the guard that keeps inputs and foreign data out of
harm's way, and copying the small files (config, tokenizer) that go with a model.

Every command that writes a dir or file calls `guard_output` before any work and writes through
`atomic_output_dir` / `atomic_file`: the output appears complete or not at all, it never replaces or sits inside
one of the command's inputs, and `--overwrite` replaces only a previous output of the same kind.

File modes: temporary dirs and files are created with mode 0o777 / 0o666 by `mkdir` / `open`, so the kernel
applies the process umask (and any default ACL of the parent dir) exactly as for any new file, and the output
gets the usual permissions. Nothing reads or sets the umask: `os.umask` is process-wide and the only way to read
it is to set it, which races with other threads creating files at that moment.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from peft_lab.errors import UserError
from peft_lab.tree.safetensors import read_header

__all__ = ["guard_output", "output_kind", "atomic_output_dir", "atomic_file", "copy_files", "MARKER", "OUTPUT_KEY"]

# The output marker. A dir output holds MARKER, a JSON file {"kind": KIND} written last, just before the dir is
# renamed into place; a file output (safetensors) carries OUTPUT_KEY = KIND in its header metadata. KIND names the
# command family that wrote it ("merge", "signature patch", "signature file", "adapter", "train"). A marker is
# never copied from an input: commands that copy an input's files write their own marker after them.
MARKER = ".peft-lab-output.json"
OUTPUT_KEY = "peft_lab.output"
OVERWRITE = "--overwrite (overwrite=true)"

PathLike = str | os.PathLike


def output_kind(path: PathLike) -> str | None:
    """The kind of peft-lab output `path` is (its marker), or None when it carries none."""
    p = Path(path)
    try:
        if p.is_dir():
            return str(json.loads((p / MARKER).read_text())["kind"])
        _, meta = read_header(p)
        return meta.get(OUTPUT_KEY)
    except (OSError, UserError, ValueError, KeyError, TypeError):
        return None


def guard_output(
    out: PathLike,
    inputs: Iterable[PathLike | None],
    *,
    kind: str,
    overwrite: bool = False,
    side_files: Sequence[PathLike] = (),
    replaces: bool = True,
    what: str = "--out",
) -> Path:
    """Refuse an output that would harm an input or replace what is not a previous output of this kind.

    Refused, with paths `resolve()`d (symlinks followed, including links directly inside an input dir, e.g. a
    Hugging Face cache snapshot): `out` equal to an input, inside an input, or containing one (replacing `out`
    would delete it); a side file the command writes beside `out` (e.g. `X.rws_restore.safetensors`) equal to or
    inside an input. Then, when `replaces` (the command replaces `out` as a whole): an existing non-empty `out` (or
    side file) needs `overwrite`, and even then is replaced only when its marker (`MARKER` in a dir, `OUTPUT_KEY`
    in a file's metadata) names `kind`, i.e. a previous output of the same command family. Anything else might
    be the user's data: it is refused, never deleted.

    Args:
        out: the output dir or file.
        inputs: every path the command reads (None entries are skipped).
        kind: the command family, recorded in the marker (see `MARKER`).
        replaces: False for a dir the command writes into without replacing it (only the input checks apply).
        what: how the output is named in messages (the option that gives it).
    Returns:
        `out`, resolved.
    """
    target = Path(out).expanduser().resolve()
    sides = [Path(s).expanduser().resolve() for s in side_files]
    for label, inp in _inputs(inputs):
        where = f"the input {label}" + (f" (that is, {inp})" if str(inp) != str(label) else "")
        if target == inp:
            raise UserError(
                f"{what} {out} is {where}; writing it would replace that input. Inputs are never "
                "modified: choose another output path."
            )
        if inp in target.parents:
            raise UserError(
                f"{what} {out} is inside {where}; writing it would change that input. Inputs are never "
                "modified: choose an output path outside every input."
            )
        if replaces and target in inp.parents:
            raise UserError(
                f"{what} {out} contains {where}; writing the output there replaces {out} as a whole and "
                "would delete that input. Choose an output path that holds none of the inputs."
            )
        for s in sides:
            if s == inp or inp in s.parents:
                raise UserError(
                    f"{what} {out} would also write {s}, which is {where}. Inputs are never modified: "
                    "choose another output path."
                )
    if replaces:
        for p in [target, *sides]:
            check_replaceable(p, kind=kind, overwrite=overwrite, what=what)
    return target


def _inputs(inputs: Iterable[PathLike | None]) -> Iterator[tuple[str, Path]]:
    for i in inputs:
        if i is None:
            continue
        p = Path(i).expanduser()
        yield str(i), p.resolve()
        if p.is_dir():  # links inside an input dir (HF cache snapshots link to blobs elsewhere)
            with contextlib.suppress(OSError):
                for e in p.iterdir():
                    if e.is_symlink():
                        yield str(e), e.resolve()


def check_replaceable(path: Path, *, kind: str, overwrite: bool, what: str = "") -> None:
    """Refuse to replace an existing non-empty `path` unless `overwrite` and it is a marked output of `kind`."""
    if path.is_dir():
        with contextlib.suppress(OSError):
            if not any(path.iterdir()):
                return
        if not overwrite:
            raise UserError(
                f"{path} already exists and is not empty. Choose another output path, or pass {OVERWRITE} "
                "to replace it."
            )
    elif path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(f"{path} already exists. Choose another path, or pass {OVERWRITE} to replace it.")
    else:
        return
    found = output_kind(path)
    if found != kind:
        had = f"it is marked as a {found!r} output" if found else f"it has no peft-lab output marker, {MARKER}"
        raise UserError(
            f"{what + ' ' if what else ''}{path} exists but was not written by peft-lab as a {kind!r} output ({had}), "
            "so it will not be replaced: that would delete what is there, which may be your data. Choose a new or "
            f"empty output path, or remove {path} yourself if nothing in it is needed."
        )


# ---------------------------------------------------------------------------------------------------------
# Atomic outputs
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(out: PathLike, *, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary dir beside `out`; on success it gets the `kind` marker and is renamed to `out`, on any
    failure (exception, Ctrl-C, SIGTERM, disk full) it is deleted and `out` is left as it was.

    A non-empty existing `out` is refused unless `overwrite` and it is a previous output of `kind`
    (`check_replaceable`); it is replaced only after the new one is complete, and put back if that fails.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory.")
    check_replaceable(out, kind=kind, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(out.parent, f".{out.name}.tmp-")
    prev_term = None
    if threading.current_thread() is threading.main_thread():

        def _on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        prev_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _install(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(
                f"Disk full while writing {out} ({e.filename or tmp}); nothing was written. Free space and run again."
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)


def _install(tmp: Path, out: Path) -> None:
    """Rename the complete `tmp` to `out`; a previous `out` is moved aside first and put back if that fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, trash)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash, out)
        raise
    if trash.is_symlink():  # `out` was a link: the link is replaced, never what it points to
        trash.unlink()
    else:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: PathLike, suffix: str = ".safetensors") -> Iterator[Path]:
    """A temporary path beside `path` (ending in `suffix`), renamed onto it on success and removed on any failure
    (exception, Ctrl-C), so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path.parent, f".{path.name.removesuffix(suffix)}.tmp-", suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"Disk full while writing {path}; nothing was written. Free space and run again.") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new empty dir `parent/prefix<random>` with the usual permissions (see the module docstring)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent / prefix))


def _new_file(parent: Path, prefix: str, suffix: str) -> Path:
    """A new empty file `parent/prefix<random>suffix` with the usual permissions (see the module docstring)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent / prefix))


def copy_files(src_dir: PathLike, dst_dir: PathLike, names: Iterable[str]) -> list[str]:
    """Copy the listed files that exist in `src_dir` (config, tokenizer, ...) into `dst_dir`."""
    copied = []
    for n in names:
        s = Path(src_dir) / n
        if s.is_file():
            shutil.copy2(s, Path(dst_dir) / n)
            copied.append(n)
    return copied
