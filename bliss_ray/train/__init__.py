"""Training math shared by every stage: the LM training loop, LR schedules, checkpoints, and collectives."""
