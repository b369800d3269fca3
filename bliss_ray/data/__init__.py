"""Data: corpus readers and validation, tokenizers, document packing, and step-indexed training batches."""
