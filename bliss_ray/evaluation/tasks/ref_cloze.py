"""`bliss_ref_cloze`: a LAMBADA-style last-word cloze built from the bundled corpus's held-out reference passages.

For each passage of `data/corpus/reference.parquet` (columns `id`, `text`, `domain`; dir overridable with
`$BLISS_CORPUS_DIR`) we cut windows of whole sentences that end at a sentence end; the context is the window up
to its last word and the target is " " + that word without its punctuation (as lm-eval's `lambada_openai`:
context = all words but the last, target = " " + last word). Passages are visited in `id` order and windows are
taken round-robin across passages, so the item set is deterministic and spread over domains; at most 500 items.
When `$BLISS_REF_CLOZE_SKIP_IDS` names an `.npy` of passage ids (the evaluate stage sets it to the reference set's
selection part, see `bliss_ray.data.reference_split`), those passages are skipped, so the cloze is held out from
selection; unset, every passage is used.

Used by lm-eval through `custom_dataset: !function ref_cloze.load_ref_cloze` in `bliss_ref_cloze.yaml`;
`python bliss_ray/evaluation/tasks/ref_cloze.py [PARQUET]` prints a few items.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

MAX_ITEMS = 500
MIN_WORDS = 24  # enough context for the last word to be predictable at all
MAX_WORDS = 160  # keeps CPU eval cheap and far below the 2048-token window
MAX_PER_PASSAGE = 8
SKIP_IDS_ENV = "BLISS_REF_CLOZE_SKIP_IDS"
# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace or the end.
_SENT_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)")
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")  # letters, with inner apostrophes/hyphens
# A period after these is not a sentence end ("said Mr. Elliot"): never cut a window there.
_ABBREV = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "messrs", "capt", "col", "gen", "lt", "rev", "sir", "vs", "etc"}
    | {"viz", "cf", "ie", "eg", "no", "vol", "ch"}
)


def corpus_dir() -> Path:
    env = os.environ.get("BLISS_CORPUS_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[3] / "data" / "corpus"


def reference_path() -> Path:
    return corpus_dir() / "reference.parquet"


def _item(words: list[str]) -> tuple[str, str] | None:
    last = words[-1]
    m = _WORD.match(last)
    # The target must be the whole leading word of the last token, followed only by punctuation (no digits,
    # no "e.g."), so that context + target is a prefix of the real text.
    if m is None or len(m.group()) < 2 or not all(not c.isalnum() for c in last[m.end() :]):
        return None
    return " ".join(words[:-1]), " " + m.group()


def passage_windows(text: str, *, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> list[dict]:
    """Non-overlapping whole-sentence windows of one passage, each ending at a sentence end."""
    text = " ".join(text.split())  # one space between words, so split(" ") round-trips like lambada
    out: list[dict] = []
    start = 0
    for m in _SENT_END.finditer(text):
        last = text[: m.start()].rsplit(" ", 1)[-1].lower().replace(".", "")
        if text[m.start()] == "." and (last in _ABBREV or len(last) == 1):
            continue  # "Mr." or an initial ("J."), not a sentence end
        words = text[start : m.end()].split(" ")
        if len(words) < min_words:
            continue  # grow the window by the next sentence
        if len(words) <= max_words and (item := _item(words)) is not None:
            out.append({"context": item[0], "target": item[1]})
            if len(out) >= MAX_PER_PASSAGE:
                break
        start = m.end() + 1  # the next window starts at the next sentence
    return out


def build_items(rows: list[dict], *, max_items: int = MAX_ITEMS) -> list[dict]:
    """Round-robin over passages (sorted by id) so every passage contributes before any gives a second window."""
    per_passage = []
    for row in sorted(rows, key=lambda r: r["id"]):
        windows = passage_windows(row["text"] or "")
        for w in windows:
            w.update(passage_id=int(row["id"]), domain=str(row.get("domain") or ""))
        if windows:
            per_passage.append(windows)
    items: list[dict] = []
    for depth in range(MAX_PER_PASSAGE):
        for windows in per_passage:
            if depth < len(windows) and len(items) < max_items:
                items.append(windows[depth])
    return items


def read_reference(path: Path | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    path = path or reference_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"reference passages not found at {path}: bliss_ref_cloze needs the bundled corpus "
            "(data/corpus/reference.parquet) or BLISS_CORPUS_DIR pointing at a dir that has it"
        )
    table = pq.read_table(path)
    cols = [c for c in ("id", "text", "domain") if c in table.column_names]
    return table.select(cols).to_pylist()


def held_out(rows: list[dict]) -> list[dict]:
    """The rows whose `id` is not in `$BLISS_REF_CLOZE_SKIP_IDS`'s list (all rows when it is unset)."""
    path = os.environ.get(SKIP_IDS_ENV)
    if not path:
        return rows
    import numpy as np

    skip = set(np.load(path).tolist())
    return [r for r in rows if int(r["id"]) not in skip]


def load_ref_cloze(**_kwargs):
    """lm-eval `custom_dataset` hook (task metadata arrives as kwargs and is ignored)."""
    import datasets

    items = build_items(held_out(read_reference()))
    if not items:
        skipping = f" after skipping the passages in ${SKIP_IDS_ENV}" if os.environ.get(SKIP_IDS_ENV) else ""
        raise ValueError(f"no cloze items could be cut from {reference_path()}{skipping}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


if __name__ == "__main__":
    found = build_items(held_out(read_reference(Path(sys.argv[1]) if len(sys.argv) > 1 else None)))
    print(f"{len(found)} items")
    for it in found[:5]:
        print(repr(it["context"][-80:]), "->", repr(it["target"]), it["domain"])
