"""The reference set's held-out evaluation part, split by document (pure NumPy; the tokenize stage calls it).

The reference documents (source passage ids) are split once, seeded by ``data.reference_split_seed`` and not by
``seed``, so every seed and method of a comparison is measured on the same documents:

* the selection part (``reference/array``): what the bilevel upper level and MATES's probing see;
* the evaluation part (``reference/eval_array``): nothing in selection sees it; the evaluate stage's reference
  loss and ``bliss_ref_cloze`` are measured on it.

A packed passage row that mixes documents of both parts belongs to neither (it is dropped and counted), so the
two parts share no document. A cloze item is one document, so it always falls in exactly one part. Documents taken
out as canaries (``bliss_ray.data.canaries``) are in neither part: the split is drawn from the others, and a row
holding any canary document is dropped too.

    held_out = eval_doc_ids(doc_ids, frac=0.5, seed=0)
    selection, evaluation = split_rows(source_ids, held_out)
"""

from __future__ import annotations

import numpy as np

from bliss_ray.data.tokenize import cloze_item


def eval_doc_ids(doc_ids: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Sorted ids of the evaluation documents: the first round(frac · n) of a seeded permutation of the n sorted
    unique ids, so the split depends on the set of ids only, not on file or row order."""
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"reference_eval_frac must lie in [0, 1), got {frac}")
    unique = np.unique(np.asarray(doc_ids, dtype=np.int64))
    n_eval = round(frac * len(unique))
    return np.sort(np.random.default_rng(seed).permutation(unique)[:n_eval])


def split_rows(
    source_ids: list[np.ndarray], held_out: np.ndarray, excluded: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(selection, evaluation) boolean masks over packed rows, from each row's document ids: a row is in a part
    when all of its documents are; a row mixing both parts, or holding an ``excluded`` document, is in neither."""
    counts = np.array([len(s) for s in source_ids], dtype=np.int64)  # (N,); packing gives every row ≥ 1 document
    flat = np.concatenate(source_ids) if source_ids else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    n_held = np.bincount(owner, weights=np.isin(flat, held_out), minlength=len(counts)).astype(np.int64)  # (N,)
    if excluded is None or not len(excluded):
        return n_held == 0, n_held == counts
    clean = np.bincount(owner, weights=np.isin(flat, excluded), minlength=len(counts)) == 0  # (N,)
    return (n_held == 0) & clean, (n_held == counts) & clean


def cloze_items(
    doc_ids: np.ndarray, texts: list[str], tokenizer, seq_len: int, max_items: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``cloze_item`` of each document, keeping its document's id: (doc ids (N,), input_ids (N, L), loss_mask
    (N, L)). Documents without a usable last word are skipped; at most ``max_items``
    items, the first ones in input order."""
    kept, rows, masks = [], [], []
    for doc, text in zip(doc_ids, texts, strict=True):
        if max_items is not None and len(kept) >= max_items:
            break
        item = cloze_item(text, tokenizer, seq_len)
        if item is None:
            continue
        kept.append(int(doc))
        rows.append(item[0])
        masks.append(item[1])
    if not kept:
        return np.zeros(0, np.int64), np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int8)
    return np.asarray(kept, np.int64), np.stack(rows), np.stack(masks)
