"""The BLISS bilevel core (pure PyTorch): losses, sample weights, the implicit hypergradient, the bilevel loop."""
