"""Canaries: reference documents added to the pool intact and in two corrupted forms (pure NumPy; the tokenize
stage calls it, ``selection.canaries`` reads what selection did with them).

A selector that only matches the reference's vocabulary would prefer word salad made of the right words over real
text. To see whether it does, ``data.canaries.docs`` reference documents (a seeded sample, ``data.canaries.seed``)
are taken out of the reference set, so neither its selection part (the upper level, MATES's probing) nor its
held-out evaluation part ever contains them, and are added to the pool as three domains:

* ``canary_source`` — the documents as they are;
* ``canary_shuffled`` — the same words in a random order (words: whitespace-separated pieces, punctuation kept
  attached), joined by single spaces;
* ``canary_scrambled`` — every word's characters in a random order, word lengths and spacing kept, so the text has
  the document's letters and rhythm but almost no real words.

Each document's permutation is seeded by (seed, form, document id), so a canary does not depend on which other
documents are sampled or on their order. Canary documents get ids from a range the pool never uses: the top 2^32
document ids (``CANARY_ID_BASE`` and up), one block of ``FORM_STRIDE`` ids per form.

    sample = canary_doc_ids(reference_doc_ids, n=32, seed=0)
    ids, texts, domains = canary_documents(sample, sample_texts, seed=0)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from bliss_ray.data.packing import MAX_DOC_ID, OFFSET_BITS

SOURCE, SHUFFLED, SCRAMBLED = "canary_source", "canary_shuffled", "canary_scrambled"
CANARY_DOMAINS = (SOURCE, SHUFFLED, SCRAMBLED)
CORRUPTED = (SHUFFLED, SCRAMBLED)
CANARY_ID_BASE = MAX_DOC_ID - (1 << 32)
FORM_STRIDE = 1 << 28  # ids per form: far more canary documents than any reference set holds
MAX_DOCS = 100_000


@dataclass(frozen=True)
class CanarySettings:
    """The ``data.canaries`` section: how many reference documents become canaries (0: off), and their seed."""

    __pydantic_config__: ClassVar[dict] = {"extra": "forbid"}  # read by pydantic where the config validates into this

    docs: int = 0
    """Reference documents taken out of the reference set and added to the pool intact, words shuffled and
    characters scrambled (three domains); 0 turns canaries off."""
    seed: int = 0
    """Seed of the sample and of the corruptions; apart from ``seed``, so every seed and method of a comparison
    sees the same canaries."""

    def __post_init__(self) -> None:
        if not 0 <= self.docs <= MAX_DOCS:
            raise ValueError(f"docs: must be in [0, {MAX_DOCS}] (got {self.docs!r})")
        if self.seed < 0:
            raise ValueError(f"seed: must be ≥ 0 (got {self.seed!r})")

    @property
    def on(self) -> bool:
        return self.docs > 0


def canary_doc_ids(doc_ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted ids of the n canary documents: the first n of a seeded permutation of the sorted unique ids, so the
    sample depends on the set of ids only. At least one document must stay in the reference set."""
    unique = np.unique(np.asarray(doc_ids, dtype=np.int64))
    if n and n >= len(unique):
        raise ValueError(
            f"data.canaries.docs={n} would take every one of the reference set's {len(unique)} documents; use fewer"
        )
    return np.sort(np.random.default_rng([seed, 1]).permutation(unique)[:n])


def shuffle_words(text: str, rng: np.random.Generator) -> str:
    """The text's words (whitespace-separated) in a random order, joined by single spaces."""
    words = text.split()
    return " ".join(words[i] for i in rng.permutation(len(words)))


_WORD = re.compile(r"\S+")


def scramble_chars(text: str, rng: np.random.Generator) -> str:
    """Every word's characters in a random order; whitespace and word lengths stay where they are."""
    return _WORD.sub(lambda m: "".join(m.group(0)[i] for i in rng.permutation(len(m.group(0)))), text)


_CORRUPT = {SOURCE: lambda text, rng: text, SHUFFLED: shuffle_words, SCRAMBLED: scramble_chars}


def canary_documents(doc_ids: np.ndarray, texts: list[str], seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """(ids, texts, domains) of every canary document: each source document in each form of ``CANARY_DOMAINS``,
    form by form. The j-th document of form f gets id ``CANARY_ID_BASE + f · FORM_STRIDE + j``."""
    ids, out, domains = [], [], []
    for form, name in enumerate(CANARY_DOMAINS):
        for j, (doc, text) in enumerate(zip(doc_ids, texts, strict=True)):
            rng = np.random.default_rng([seed, form, int(doc)])
            ids.append(CANARY_ID_BASE + form * FORM_STRIDE + j)
            out.append(_CORRUPT[name](text, rng))
            domains.append(name)
    return np.asarray(ids, np.int64), out, domains


def collides(pool_row_ids: np.ndarray) -> bool:
    """Whether a pool row starts in a document whose id lies in the canaries' range (a pool with ids that large
    would make a canary row id ambiguous)."""
    row_ids = np.asarray(pool_row_ids, np.int64)
    return bool(len(row_ids)) and bool((row_ids >> OFFSET_BITS).max() >= CANARY_ID_BASE)
