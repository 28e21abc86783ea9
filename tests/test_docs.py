"""The documentation stays inside the repository and its links resolve.

- every relative link in README.md, CHANGELOG.md, benchmarks/README.md and docs/*.md points at a file or folder of
  the repository, and a `#anchor` at a heading of its target (GitHub's heading slugs);
- no document, docstring or config points at files that are not in the repository (the team's internal notes);
- README.md stays short: the reference lives in docs/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [
    REPO / "README.md",
    REPO / "CHANGELOG.md",
    REPO / "benchmarks" / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
]
README_MAX_LINES = 320

# names of documents that live outside the repository; written split so that this file does not match itself
OUTSIDE = [
    re.compile(p)
    for p in (
        r"\.\./" + "shared",
        r"\bALGORITHMS(-2)?\." + "md",
        r"\bMEASURED\." + "md",
        r"\b(DESIGN|STYLE|INTERFACE)\." + "md",
    )
]
SCANNED_SUFFIXES = {".py", ".md", ".ipynb", ".yaml", ".yml", ".toml", ".cfg", ".txt"}
SKIPPED_DIRS = {"runs", "outputs", "multirun", "wandb", "build", "dist", "__pycache__", "node_modules"}

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, _CODE_SPAN.sub("``", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link syntax and markup dropped, lower case, punctuation other than `-` and
    `_` removed, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get GitHub's -1, -2, ... suffixes)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def link_problems(doc: Path, repo: Path = REPO) -> list[str]:
    """What is wrong with the relative links of one Markdown file: targets that do not exist or lie outside
    `repo`, and anchors that name no heading of their target."""
    problems = []
    for lineno, line in prose_lines(doc.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            where = f"{doc.relative_to(repo)}:{lineno}: {target}"
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path_part, _, frag = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc.resolve()
            try:
                dest.relative_to(repo.resolve())
            except ValueError:
                problems.append(f"{where} points outside the repository")
                continue
            if not dest.exists():
                problems.append(f"{where} does not exist")
                continue
            if frag and dest.suffix == ".md" and frag not in anchors(dest):
                problems.append(f"{where}: no heading #{frag} in {dest.relative_to(repo.resolve())}")
    return problems


def outside_mentions(path: Path, repo: Path = REPO) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [
        f"{path.relative_to(repo)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for rx in OUTSIDE
        for m in rx.finditer(text)
    ]


def repo_text_files(repo: Path = REPO) -> list[Path]:
    files = []
    for p in repo.rglob("*"):
        rel = p.relative_to(repo).parts
        if any(part.startswith(".") or part in SKIPPED_DIRS or part.endswith(".egg-info") for part in rel[:-1]):
            continue
        if p.is_file() and p.suffix in SCANNED_SUFFIXES and p != Path(__file__).resolve():
            files.append(p)
    return files


# ---------------------------------------------------------------------------------------------------------
# the repository's documents
# ---------------------------------------------------------------------------------------------------------
def test_the_documents_exist():
    for doc in DOCS:
        assert doc.is_file(), doc
    names = {p.name for p in DOCS}
    assert {
        "training.md",
        "merging.md",
        "methods.md",
        "adapters.md",
        "signatures.md",
        "kernels.md",
        "design.md",
        "extending.md",
    } <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_inside_the_repository(doc):
    problems = link_problems(doc)
    assert not problems, "\n".join(problems)


def test_nothing_points_at_documents_outside_the_repository():
    problems = [line for f in repo_text_files() for line in outside_mentions(f)]
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move reference material to docs/"


# ---------------------------------------------------------------------------------------------------------
# the checks themselves catch what they are for
# ---------------------------------------------------------------------------------------------------------
def test_slugs_follow_github():
    assert slug("`make test` on a fresh clone") == "make-test-on-a-fresh-clone"
    assert slug("dare_linear and dare_ties") == "dare_linear-and-dare_ties"
    assert slug("Merging: `peft-lab merge`") == "merging-peft-lab-merge"
    assert slug("Robust Weight Signatures: `peft-lab signature`") == "robust-weight-signatures-peft-lab-signature"


def test_broken_links_and_outside_mentions_are_reported(tmp_path):
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "a.md").write_text("# Title\n\n## Some section\n\ntext\n")
    (tmp_path / "outside.md").write_text("# elsewhere\n")  # exists, but beside the repository
    doc = repo / "README.md"
    doc.write_text(
        "# Readme\n\n"
        "[fine](docs/a.md#some-section) [fine too](#readme) [web](https://example.org/x.md)\n"
        "[missing file](docs/b.md) [missing anchor](docs/a.md#no-such-section)\n"
        "[outside](../outside.md) [self anchor](#nowhere)\n"
        "```\n[in a code block](docs/nothing.md)\n```\n"
        "`[in a code span](docs/nothing.md)` and see ../" + "shared/NOTES.md\n"
    )
    problems = link_problems(doc, repo)
    assert len(problems) == 4, problems
    assert any("docs/b.md does not exist" in p for p in problems)
    assert any("no heading #no-such-section" in p for p in problems)
    assert any("outside the repository" in p for p in problems)
    assert any("no heading #nowhere" in p for p in problems)
    assert outside_mentions(doc, repo), "a mention of a folder beside the repository is reported"
