"""The MATES baseline (arXiv 2406.06046; docs/method.md, "MATES"), pure PyTorch: no Ray, no config layer.

* ``probe`` — oracle probing: restore the target's full training state, take one AdamW step on a candidate x,
  record the reference-set loss L(D_ref | A(M, x)) (``Prober``).
* ``influence`` — the data influence model: a BERT-family regressor (mean-pooled, 512-token chunks) fitted to the
  z-scored probe losses, kept at its best held-out Spearman (``InfluenceModel``, ``train_influence_model``); its
  presets are ``bliss_ray.models.arch.influence_arch``.

The Ray stages that drive them are in ``bliss_ray.stages.mates``; scoring reuses
``bliss_ray.selection.scoring.Scorer`` (``kind="mates"``) and selection
``bliss_ray.selection.rules.select(..., "mates")``.

FLOPs (``bliss_ray.costs.flops.ledger``, ``bliss-ray flops experiments/paper/pythia410m_mates.yaml``): target
pretraining 6.35e19 + oracle probing + influence-model training + inference. MATES's reported total at 410M,
8.11e19 (docs/method.md, "FLOPs"), leaves 1.76e19 for selection. The ledger's parts that do not depend on the reference
length already exceed that (probe steps 0.08 + bert-base training 0.09 + inference 1.98 over 4 × 25.6 M rows ×
1024 tokens = 2.15e19), and each token of mean reference-item length adds 0.026e19 (4 × 80k probes × 1024 items
× F_410M). So the paper's figure cannot be the protocol as specified: it implies a smaller scored pool and nearly
free reference evaluations (fitting the 410M and 1B totals together gives ≈ 11 tokens per reference item and
≈ 16.7 M scored rows per round). The ledger counts what this platform computes instead.
"""
