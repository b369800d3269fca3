"""Build the bundled multi-domain English corpus (``data/corpus/``) from Debian packages.

The corpus is the offline stand-in for C4 (the "pool" BLISS selects from) plus a held-out reference set
(one whole Jane Austen novel, *Persuasion*, standing in for LAMBADA-style narrative fiction). See
``data/README.md`` for the data card.

What it does:
  1. ``apt-get download`` the source packages into a work dir and ``dpkg -x`` them (nothing is installed);
  2. parses each format (R lazy-load DB, BRS LZW-compressed KJV, Jargon File text, WordNet data files,
     fortune files, GNU info), cleans whitespace and splits long works into paragraph-aware passages of
     ~1500-3000 characters (short items such as fortunes or glosses are grouped several per passage);
  3. writes ``pool-0000{0..7}.parquet`` (shuffled with seed 0), ``reference.parquet`` and ``manifest.json``.

The build is deterministic: the same package versions give byte-identical outputs (fixed seeds, sorted
inputs, no timestamps). Needs a Debian host (apt-get, dpkg) and pyarrow, numpy and rdata
(``pip install -e '.[corpus]'``).

Run:  .venv/bin/python data/build_corpus.py [--out data/corpus] [--work /tmp/corpus-work]
(with --work the downloaded .deb files are kept there and reused on the next run).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import random
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PACKAGES = {  # domain -> Debian packages it is parsed from
    "austen": ["r-cran-janeaustenr"],
    "bible": ["bible-kjv-text"],
    "civics": ["miscfiles"],
    "fortunes": ["fortunes", "fortunes-min"],
    "jargon": ["jargon-text"],
    "python_docs": ["python3.11-doc"],
    "wordnet": ["wordnet-base"],
}
REFERENCE_NOVEL = "Persuasion"  # held out whole: the reference set, never in the pool
REFERENCE_ID_START = 10_000_000
N_POOL_FILES = 8
SEED = 0
LO, HI = 1500, 3000  # passage target: join units until >= LO chars, never exceed HI
MIN_CHARS = 100  # shorter passages are dropped as near-empty
BUDGET = {"wordnet": 2_500_000, "python_docs": 3_000_000}  # characters kept after subsampling
AUSTEN_TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
# Not prose (ascii-art) or not English (translate-me); the offensive files live in fortunes-off, unused.
FORTUNE_SKIP = {"ascii-art", "translate-me"}


# ----------------------------------------------------------------------------- download / unpack
def fetch(packages: list[str], work: Path) -> dict[str, dict]:
    """Download each package with apt-get (reusing a .deb already in ``work``), unpack it with ``dpkg -x``.

    Returns ``{package: {"version", "deb", "sha256", "root"}}``; the version comes from the .deb control data.
    """
    debs, info = work / "debs", {}
    debs.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
        deb = found[-1]
        root = work / "root" / pkg
        if not root.exists():  # unpack next to the final folder, so an interrupted run leaves no half tree
            partial = root.with_name(root.name + ".partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg", "-x", str(deb), str(partial)], check=True)
            partial.rename(root)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True)
        sha = hashlib.sha256(deb.read_bytes()).hexdigest()
        info[pkg] = {"version": version.stdout.strip(), "deb": deb.name, "sha256": sha, "root": root}
    return info


# ----------------------------------------------------------------------------- text helpers
def _demojibake(m: re.Match) -> str:
    """Re-decode one run of characters that is UTF-8 mis-decoded as Latin-1 ("â\x80\x99" -> "’")."""
    try:
        return m.group().encode("latin-1").decode("utf-8")
    except UnicodeError:
        return m.group()


def clean(text: str) -> str:
    """Remove overstrike/control characters and trailing blanks, expand tabs, collapse runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\u00a0", " ")  # no-break spaces (Jargon File headings)
    text = re.sub(r"_\x08|\x08_", "", text)  # underlined "_\bX" (old terminal markup)
    text = re.sub(r".\x08", "", text)  # bold "X\bX"
    for _ in range(3):  # UTF-8 read as Latin-1, up to twice over (a few fortunes)
        text = re.sub(r"[\xc2-\xf4][\x80-\xbf]+", _demojibake, text)
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text)
    lines = [line.expandtabs(8).rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks of ``text`` (leading/trailing empty lines removed)."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def unwrap(par: str) -> str:
    """Join a hard-wrapped prose paragraph into one line; keep line breaks of verse, lists and code.

    A paragraph counts as wrapped prose when all its lines share one indentation and every line but the
    last is "full" (>= 50 chars), which is how fill-wrapped text looks and how code/poems do not.
    """
    lines = par.split("\n")
    indents = {len(line) - len(line.lstrip()) for line in lines}
    full = all(len(line.strip()) >= 50 for line in lines[:-1])
    if len(indents) == 1 and full and not lines[0].lstrip().startswith(">>>"):
        return re.sub(r" {2,}", " ", " ".join(line.strip() for line in lines))
    indent = min(indents)
    return "\n".join(line[indent:] for line in lines)


def is_heading(par: str) -> bool:
    """A title/heading/TOC line: one short line that does not end like a sentence ("Chapter 1", "THE END")."""
    return "\n" not in par and len(par) < 60 and not re.search(r"[.!?:;,-][\"'’”)\]]*$", par)


def split_long(text: str, hi: int = HI) -> list[str]:
    """Cut ``text`` into pieces of at most ``hi`` chars, preferably after a sentence end, never mid-word."""
    pieces = []
    while len(text) > hi:
        window = text[: hi + 1]
        ends = [m.end() for m in re.finditer(r"[.!?;][\"'’”)]*\s", window) if m.end() >= hi // 2]
        spaces = [m.end() for m in re.finditer(r"\s", window)]
        cut = ends[-1] if ends else (spaces[-1] if spaces else hi)
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return [*pieces, text] if text else pieces


def pack(units: list[str], sep: str = "\n\n", lo: int = LO, hi: int = HI) -> list[str]:
    """Greedily join consecutive units (paragraphs, verses, items) into passages of ~lo..hi characters.

    Units longer than ``hi`` are split at sentence ends. A small run that cannot take the next unit whole
    (e.g. "...read as follows:" before a long letter) is glued to its start instead of standing alone, and a
    tiny trailing passage is merged into the previous one when that stays within ``hi``.
    """
    out, cur, size, queue = [], [], 0, list(reversed(units))  # queue: pop() takes the next unit
    while queue:
        unit = queue.pop()
        if len(unit) > hi:
            first, *rest = split_long(unit, hi)
            queue += reversed(rest)
            unit = first
        if cur and size + len(sep) + len(unit) > hi:
            if size < lo // 3:
                queue.append(sep.join(cur) + sep + unit)
                cur, size = [], 0
                continue
            out.append(sep.join(cur))
            cur, size = [], 0
        size += len(unit) + (len(sep) if cur else 0)
        cur.append(unit)
        if size >= lo:
            out.append(sep.join(cur))
            cur, size = [], 0
    if cur:
        tail = sep.join(cur)
        if out and len(tail) < lo // 3 and len(out[-1]) + len(sep) + len(tail) <= hi:
            out[-1] += sep + tail
        else:
            out.append(tail)
    return out


def subsample(docs: list[tuple[str, list[str]]], budget: int, seed: int = SEED) -> list[tuple[str, list[str]]]:
    """Keep whole documents, drawn in a seeded random order, until ``budget`` characters; keep input order."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    keep, total = set(), 0
    for i in order:
        size = sum(len(p) for p in docs[i][1])
        if total + size <= budget:
            keep.add(i)
            total += size
    return [d for i, d in enumerate(docs) if i in keep]


# ----------------------------------------------------------------------------- per-domain parsers
# Each returns a list of (source, passages) documents, in a deterministic order.
def parse_austen(root: Path) -> list[tuple[str, list[str]]]:
    """The six novels from the R lazy-load DB; one document per chapter, chapter headings dropped."""
    import warnings

    import rdata  # only needed here; keeps the module importable without it

    def unserialize(raw: bytes):
        """An R serialization (no RDS header, hence the silenced warning) as Python objects."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    base = next(root.rglob("janeaustenr/data/Rdata.rdx")).with_suffix("")
    index = unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes()))["variables"]
    rdb = base.with_suffix(".rdb").read_bytes()
    docs = []
    for name in sorted(index):
        offset, length = (int(v) for v in index[name])
        # Each record: 4-byte big-endian length, then zlib data holding a character vector (one line per item).
        text = "\n".join(str(x) for x in unserialize(zlib.decompress(rdb[offset + 4 : offset + length])))
        text = text.split("A NOTE ON THE TEXT")[0]  # modern editorial note appended to Northanger Abbey
        chapters = re.split(r"(?im)^\s*(?:chapter|volume)\s+(?:[ivxlc]+|\d+)\.?\s*$", clean(text))
        for chapter in chapters:
            pars = [unwrap(p) for p in paragraphs(chapter)]
            pars = [p for p in pars if not is_heading(p)]  # title lines, "By Jane Austen", "(1818)", "Finis"
            if pars:
                docs.append((AUSTEN_TITLES[str(name)], pack(pars)))
    return docs


def lzw_decompress(buf: bytes, maxbits: int = 16) -> bytes:
    """Decode one Unix ``compress`` (LZW, block mode) stream, as ncompress does, codes packed LSB first.

    Code widths grow from 9 bits; on a width change or CLEAR (code 256) the reader skips to the end of the
    current group of ``n_bits`` bytes, as the encoder writes codes in groups of eight.
    """
    value, total = int.from_bytes(buf, "little"), len(buf) * 8
    prefix, suffix = [0] * (1 << maxbits), bytearray(range(256)) + bytearray((1 << maxbits) - 256)
    nbits, free, old, fin, pos, origin, out = 9, 257, -1, 0, 0, 0, bytearray()
    maxcode = (1 << nbits) - 1

    def align(pos: int, origin: int, nbits: int) -> int:
        group = nbits * 8
        return origin + -(-(pos - origin) // group) * group

    while True:
        if free > maxcode and nbits < maxbits:
            pos = origin = align(pos, origin, nbits)
            nbits += 1
            maxcode = (1 << nbits) - 1 if nbits < maxbits else 1 << maxbits
        if pos + nbits > total:
            return bytes(out)
        code = (value >> pos) & ((1 << nbits) - 1)
        pos += nbits
        if old == -1:  # first code of the stream is a literal
            old = fin = code
            out.append(code)
            continue
        if code == 256:  # CLEAR: restart the table at 9 bits
            pos = origin = align(pos, origin, nbits)
            nbits, free, maxcode = 9, 256, (1 << 9) - 1
            continue
        incode, stack = code, bytearray()
        if code >= free:  # the KwKwK case
            stack.append(fin)
            code = old
        while code >= 256:
            stack.append(suffix[code])
            code = prefix[code]
        fin = suffix[code]
        stack.append(fin)
        out += stack[::-1]
        if free < (1 << maxbits):
            prefix[free], suffix[free] = old, fin
            free += 1
        old = incode


def parse_bible(root: Path) -> list[tuple[str, list[str]]]:
    """KJV from the Bible Retrieval System's ``bible.data``: consecutive verses of one chapter per passage.

    Layout (big-endian): "EC02" magic and a text label, at 0x54 the window size and window count, then
    count+1 file offsets; each window is an independent ``compress`` stream of 64 KiB of text whose lines
    look like ``Ge1:1 In the beginning ...``.
    """
    data = (root / "usr/lib/bible.data").read_bytes()
    assert data[:4] == b"EC02", "unexpected bible.data format"
    _, count = struct.unpack(">II", data[0x54:0x5C])
    offsets = struct.unpack(f">{count + 1}I", data[0x5C : 0x5C + 4 * (count + 1)])
    text = b"".join(lzw_decompress(data[a:b]) for a, b in itertools.pairwise(offsets)).decode("ascii")
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in text.split("\n"):
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):\d+ (.+)$", line)
        if m:  # the first line is a file title, not a verse
            chapters.setdefault((m.group(1), m.group(2)), []).append(m.group(3).strip())
    return [(f"{book} {chap}", pack(verses, sep=" ")) for (book, chap), verses in chapters.items()]


def parse_jargon(root: Path) -> list[tuple[str, list[str]]]:
    """The Jargon File: introduction and appendices as paragraphs, lexicon entries grouped several per passage.

    The per-letter term indexes (single-line paragraphs repeating entry names) and the table of contents are
    dropped; ``{cross refs}`` lose their braces and ``:term:`` headers become ``term:``.
    """
    text = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8")
    text = clean(text)
    text = text[re.search(r"(?m)^Chapter 1\. ", text).start() :]  # skip title page, TOC, glyph table
    text = re.sub(r"\{(\S[^{};]{0,60}?)\}", r"\1", text)  # "{cross ref}", possibly wrapped; not C code blocks
    pars = paragraphs(text)
    terms = {m.group(1) for p in pars if (m := re.match(r"^\s*:(.+?):", p))}
    front, lexicon, back, section = [], [], [], "front"
    for par in pars:
        line = par.strip()
        if line == "Glossary":
            section = "lexicon"
        elif line.startswith("Appendix A."):
            section = "back"
        if ("\n" not in line and (line in terms or len(line) <= 2)) or re.search("[\u2500-\u257f]", line):
            continue  # index entry, letter heading or box-drawn table
        if section == "lexicon":
            if re.match(r"^:(.+?):", line):
                lexicon.append(re.sub(r"^:(.+?):\s*", r"\1: ", unwrap(par)).rstrip())
            elif lexicon and not is_heading(line):
                lexicon[-1] += "\n\n" + unwrap(par)
        elif not is_heading(line):
            (front if section == "front" else back).append(unwrap(par))
    return [("introduction", pack(front)), ("lexicon", pack(lexicon)), ("appendices", pack(back))]


def parse_wordnet(root: Path) -> list[tuple[str, list[str]]]:
    """WordNet 3.0 glosses as ``lemma: gloss`` lines, consecutive synsets grouped (~10-20 per passage)."""
    docs = []
    for pos in ["adj", "adv", "noun", "verb"]:
        glosses = []
        for line in (root / f"usr/share/wordnet/data.{pos}").read_text("utf-8").split("\n"):
            if not line or line.startswith("  ") or " | " not in line:
                continue  # licence header lines start with two spaces
            fields, gloss = line.split(" | ", 1)
            lemma = re.sub(r"\(.*\)$", "", fields.split()[4]).replace("_", " ")
            glosses.append(f"{lemma}: {gloss.strip()}")
        passages = pack(glosses, sep="\n", lo=1500, hi=2500)
        docs += [(f"data.{pos}", [p]) for p in passages]  # one doc per passage so subsampling mixes them
    return docs


def parse_fortunes(roots: list[Path]) -> list[tuple[str, list[str]]]:
    """Default (non-offensive) fortune files, items split on ``%`` lines, exact duplicates removed."""
    files = sorted(
        f
        for root in roots
        for f in (root / "usr/share/games/fortunes").iterdir()
        if f.is_file() and not f.is_symlink() and not f.suffix and f.name not in FORTUNE_SKIP
    )
    seen, docs = set(), []
    for f in files:
        items = []
        for item in re.split(r"(?m)^%$", clean(f.read_text("utf-8"))):
            item = "\n".join(unwrap(p) for p in paragraphs(item))
            item = re.sub(r"(?m)^ {5,}", "    ", item)  # "\t\t-- Author" attributions: cap the indentation
            if len(item) >= 20 and item not in seen:
                seen.add(item)
                items.append(item)
        docs.append((f.name, pack(items)))
    return docs


def parse_python_docs(root: Path) -> list[tuple[str, list[str]]]:
    """The Python 3.11 documentation from the GNU info file; one document per info node.

    Info markup is removed (node headers, menus, heading underlines, ``*note X: label.`` cross references,
    image placeholders); index, changelog and licence nodes are skipped.
    """
    text = gzip.decompress(next(root.rglob("python3.11.info.gz")).read_bytes()).decode("utf-8")
    skip = {"Index", "Python Module Index", "Changelog", "History and License", "Copyright"}  # and subtrees
    up, nodes = {}, []
    for chunk in text.split("\x1f")[1:]:
        head, _, body = chunk.lstrip("\n").partition("\n")
        m = re.match(r"File: [^,]+,\s+Node: (.+?),.*\bUp: (.+)$", head)
        if m:
            up[m.group(1)] = m.group(2)
            nodes.append((m.group(1), body))

    def skipped(node: str) -> bool:
        """Top (the table of contents) and every node at or below one of ``skip``."""
        if node == "Top":
            return True
        while node in up and node != "Top":
            if node in skip:
                return True
            node = up[node]
        return False

    def xrefs(par: str) -> str:
        """``*note TEXT: 1a2.`` -> TEXT; makeinfo adds the ".", kept only where a sentence seems to end."""
        par = re.sub(
            r"\*[Nn]ote\s+([^:]+?):\s*[0-9a-f]+(?:(\.)(?=\s+[A-Z]|\s*$)|\.|(,)|)",
            lambda m: re.sub(r"\s+", " ", m.group(1)) + (m.group(2) or m.group(3) or ""),
            par,
        )
        return re.sub(r"\*[Nn]ote\s+([^:]+?)::", lambda m: re.sub(r"\s+", " ", m.group(1)), par)

    docs, pending, first = [], [], None
    for name, body in nodes:
        if skipped(name):
            continue
        body = body.split("* Menu:")[0]  # menus (links to child nodes) close a node
        body = re.sub(r"\x00\x08\[image[^\x00]*\x00\x08\]", "", body)
        body = re.sub(r"(?m)^[*=\-.]{3,}$", "", body)  # heading underlines
        body = re.sub(r"(?m)^ *-+ Footnotes -+$", "Footnotes:", body)
        # Unwrap before removing cross references: their markup is part of the fill-wrapped line lengths.
        pending += [xrefs(unwrap(p)) for p in paragraphs(clean(body))]
        first = first or name
        if sum(len(p) for p in pending) >= LO:  # small sections are joined with the ones that follow
            docs.append((first, pack(pending)))
            pending, first = [], None
    if pending:
        docs.append((first, pack(pending)))
    return docs


def parse_civics(root: Path) -> list[tuple[str, list[str]]]:
    """The US Constitution and Declaration of Independence (public domain texts shipped by miscfiles)."""
    docs = []
    for name in ["us-constitution", "us-declaration"]:
        text = gzip.decompress((root / f"usr/share/state/{name}.gz").read_bytes()).decode("utf-8")
        docs.append((name, pack([unwrap(p) for p in paragraphs(clean(text))])))
    return docs


# ----------------------------------------------------------------------------- assembly
def build(work: Path) -> tuple[list[dict], list[dict], dict]:
    """Download, parse and split every domain; return (pool rows, reference rows, package info)."""
    info = fetch(sorted({p for pkgs in PACKAGES.values() for p in pkgs}), work)
    root = {p: v["root"] for p, v in info.items()}
    docs = {
        "austen": parse_austen(root["r-cran-janeaustenr"]),
        "bible": parse_bible(root["bible-kjv-text"]),
        "civics": parse_civics(root["miscfiles"]),
        "fortunes": parse_fortunes([root["fortunes"], root["fortunes-min"]]),
        "jargon": parse_jargon(root["jargon-text"]),
        "python_docs": parse_python_docs(root["python3.11-doc"]),
        "wordnet": parse_wordnet(root["wordnet-base"]),
    }
    pool, reference, seen = [], [], set()
    for domain in sorted(docs):
        kept = subsample(docs[domain], BUDGET[domain]) if domain in BUDGET else docs[domain]
        for source, passages in kept:
            for text in passages:
                text = text.strip()
                if len(text) < MIN_CHARS or text in seen:
                    continue  # near-empty or exact duplicate
                seen.add(text)
                row = {"text": text, "domain": domain, "source": source}
                (reference if source == REFERENCE_NOVEL else pool).append(row)
    # Stable ids in build order (domain, document, passage), assigned before the pool is shuffled.
    for i, row in enumerate(pool):
        row["id"] = i
    for i, row in enumerate(reference):
        row["id"] = REFERENCE_ID_START + i
    return pool, reference, info


def write_parquet(rows: list[dict], path: Path) -> dict:
    """Write rows (id, text, domain, source) as zstd parquet; return row count and sha256 for the manifest."""
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("domain", pa.string()), ("source", pa.string())])
    table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
    pq.write_table(table, path, compression="zstd", compression_level=19)
    return {"rows": len(rows), "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def domain_stats(rows: list[dict]) -> dict:
    """Passages, characters and character share per domain."""
    total = sum(len(r["text"]) for r in rows)
    stats = {}
    for r in rows:
        s = stats.setdefault(r["domain"], {"passages": 0, "chars": 0})
        s["passages"] += 1
        s["chars"] += len(r["text"])
    for s in stats.values():
        s["share"] = round(s["chars"] / total, 4)
    return dict(sorted(stats.items()))


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, build the corpus and write the parquet files and manifest."""
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=here / "corpus", help="output folder (default: data/corpus)")
    ap.add_argument("--work", type=Path, default=None, help="work folder for .deb files (default: a temp dir)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pool, reference, info = build(args.work or Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(SEED).permutation(len(pool))  # every file mixes all domains
    files = {}
    for k, part in enumerate(np.array_split(order, N_POOL_FILES)):
        name = f"pool-{k:05d}.parquet"
        files[name] = write_parquet([pool[i] for i in part], args.out / name)
    files["reference.parquet"] = write_parquet(reference, args.out / "reference.parquet")
    manifest = {
        "description": "Multi-domain English pool (C4 stand-in) and held-out reference set (LAMBADA stand-in)",
        "build_command": ".venv/bin/python data/build_corpus.py --out data/corpus",
        "seed": SEED,
        "passage_chars": {"target_min": LO, "max": HI, "drop_below": MIN_CHARS},
        "subsample_budget_chars": BUDGET,
        "reference": {"source": f"austen / {REFERENCE_NOVEL}", "id_start": REFERENCE_ID_START},
        "files": files,
        "pool": {"passages": len(pool), "chars": sum(len(r["text"]) for r in pool), "domains": domain_stats(pool)},
        "reference_stats": {"passages": len(reference), "chars": sum(len(r["text"]) for r in reference)},
        "packages": {p: {k: v[k] for k in ("version", "deb", "sha256")} for p, v in sorted(info.items())},
        "domain_packages": PACKAGES,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: manifest[k] for k in ("pool", "reference_stats")}, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
