"""Inputs the CPU benchmarks share: a BPE tokenizer and a packed pool from the bundled corpus, a saved score model.

Built with the pure functions the stages use (``train_bpe``, ``tokenize_file``) and cached under
``bench/out/_cache`` (git-ignored), so ``run_all.py`` builds them once. The cache is keyed by every setting that
changes the bytes; delete the folder after changing the tokenizer or packing code.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from _common import OUT

CACHE = OUT / "_cache"


def bundled_pool_files(n: int | None = None) -> list[str]:
    from bliss_ray.data.corpus import resolve_files

    files = resolve_files(["bundled:pool"])
    return files[:n] if n else files


def tokenizer_dir(vocab: int = 8192, max_chars: int = 3_000_000) -> Path:
    """A byte-level BPE trained on the bundled pool (the demo's tokenizer kind and vocabulary)."""
    from bliss_ray.config import DataConfig
    from bliss_ray.data.corpus import iter_texts
    from bliss_ray.data.tokenizer import train_bpe

    out = CACHE / f"tokenizer-v{vocab}-c{max_chars}"
    if not (out / "tokenizer.json").exists():
        tok = train_bpe(iter_texts(bundled_pool_files(), "parquet_text", DataConfig(), max_chars), vocab)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # atomic: a concurrent benchmark never sees half a tokenizer
    return out


def load_tok(path: Path):
    from bliss_ray.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def packed_pool(seq_len: int = 128, vocab: int = 8192, n_files: int | None = None) -> list[str]:
    """The bundled pool tokenized and packed into ``seq_len`` rows (one parquet per input file)."""
    from bliss_ray.config import DataConfig
    from bliss_ray.data.tokenize import tokenize_file

    tok_dir = tokenizer_dir(vocab)
    out = CACHE / f"pool-L{seq_len}-v{vocab}"
    files = bundled_pool_files(n_files)
    tok = None
    for i, f in enumerate(files):
        if not list((out / "stats").glob(f"{i:05d}-*.json")):
            tok = tok or load_tok(tok_dir)
            tokenize_file(f, i, "parquet_text", DataConfig(seq_len=seq_len), tok, out)  # idempotent, atomic
    packed = sorted(str(p) for p in (out / "packed").glob("*.parquet"))
    return packed[: len(files)]


def token_array(files: list[str], out_dir: Path):
    from bliss_ray.data.tokens import TokenArray

    return TokenArray.build(files, out_dir)


def save_score_model(arch_name: str, vocab: int, seq_len: int, out_dir: Path, seed: int = 0) -> Path:
    """A score model whose trunk is a randomly initialised proxy of ``arch_name`` (weights do not change speed)."""
    from bliss_ray.models.arch import arch_from_preset
    from bliss_ray.models.lm import build_lm
    from bliss_ray.models.score import ScoreModel

    proxy = build_lm(arch_from_preset(arch_name, vocab), seq_len, seed=seed)
    ScoreModel.from_proxy(proxy, use_sigmoid=True).save(out_dir)
    return out_dir
