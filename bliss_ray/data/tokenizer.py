"""Tokenizers: the Pythia (GPT-NeoX-20B) tokenizer for real runs, or a byte-level BPE trained on the pool offline.

Both end up as a ``PreTrainedTokenizerFast`` directory saved with the run, so checkpoints carry their tokenizer
and ``lm_eval --model hf`` can load them. The trained BPE is cached by the hash of its inputs (pool fingerprint,
vocabulary size, sample size): reruns reuse it.

    tok = train_bpe(iter_texts(files, "parquet_text", cfg, 20_000_000), vocab_size=8192)
    tok = load_tokenizer("EleutherAI/gpt-neox-20b")     # on a cluster with hub access or a local mirror
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS = "<|endoftext|>"  # GPT-NeoX's document separator, also used as bos/unk
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2/NeoX style pre-tokenisation), deterministic for the same texts."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],  # ids 0 and 1, as in GPT-NeoX where <|endoftext|> is 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD, model_max_length=1 << 20
    )


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """A hub name (clusters; honours HF_HUB_OFFLINE) or a local tokenizer directory. Adds a pad token if absent."""
    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-NeoX ships none; padding is masked out everywhere we pad
    return tok
