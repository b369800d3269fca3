"""Models: ``lm`` (Pythia / LLaMA-style causal LMs for target and proxy) and ``score`` (the BLISS score model)."""
