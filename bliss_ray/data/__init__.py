"""Data: corpus readers and validation, tokenizers, document packing, step-indexed training batches, and a
round's pool as selection sees it (``pool.py``)."""
