"""Corpus scoring with a trained score model (pure PyTorch; Ray Data runs ``Scorer`` as an actor pool).

``Scorer`` is a callable class on dict-of-NumPy batches, so the same object scores a batch directly (tests,
``bench/score_throughput.py``) and inside ``Dataset.map_batches`` (the stage). It returns, per row,
``row_id``, the raw ``logit`` in fp32 (what selection ranks by: no fp16 ties at the cut-off), ``score``
(σ(logit) or the logit itself without sigmoid), and ``ok``/``reason`` (rows that cannot be scored — wrong
length, token ids outside the vocabulary — are flagged, never dropped).

Packed rows all have the same length, so batches of ``batch_seqs`` rows are dense (no padding, no bucketing).

    scorer = Scorer("runs/demo/r1.bilevel-…/score_model", batch_seqs=64)
    out = scorer({"row_id": ids, "input_ids": tokens})
"""

from __future__ import annotations

import os

import numpy as np
import torch

from bliss_ray.mates.influence import InfluenceModel
from bliss_ray.models.score import ScoreModel
from bliss_ray.train.host_memory import retain_freed_memory


def as_matrix(col) -> np.ndarray:
    """A batch column of token rows as a 2-D int array (Arrow fixed-size lists arrive as (N, L) or objects)."""
    arr = np.asarray(col)
    if arr.dtype == object:
        lengths = {len(r) for r in arr}
        if len(lengths) != 1:
            raise ValueError("rows of different lengths")
        arr = np.stack([np.asarray(r) for r in arr])
    return arr


class Scorer:
    def __init__(
        self,
        model_dir: str,
        batch_seqs: int = 64,
        dtype: str = "float32",
        device: str = "auto",
        threads: int | None = None,
        kind: str = "bliss",
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
        )
        retain_freed_memory(self.device)
        self.kind = kind
        if kind == "bliss":
            self.model = ScoreModel.load(model_dir)
        else:
            self.model = InfluenceModel.load(model_dir)
        self.model.to(self.device).eval()
        self.vocab = self.model.vocab_size() if kind != "bliss" else self.model.trunk.config.vocab_size
        self.batch_seqs = batch_seqs
        half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)  # autocast; weights stay fp32
        self.autocast = torch.autocast(self.device.type, dtype=half) if half is not None else None
        self.pid = os.getpid()

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.autocast is not None:
            with self.autocast:
                return self.model(ids)[0].float()
        return self.model(ids)[0].float()

    def __call__(self, batch: dict) -> dict:
        row_ids = np.asarray(batch["row_id"], dtype=np.int64)
        n = len(row_ids)
        logits = np.full(n, np.nan, dtype=np.float32)
        reasons = np.array([""] * n, dtype=object)
        try:
            tokens = as_matrix(batch["input_ids"]).astype(np.int64)
        except ValueError as e:
            reasons[:] = f"unscorable input_ids: {e}"
            tokens = None
        if tokens is not None:
            bad = (tokens < 0).any(1) | (tokens >= self.vocab).any(1)
            reasons[bad] = "token id outside the vocabulary"
            good = np.flatnonzero(~bad)
            with torch.inference_mode():
                for s in range(0, len(good), self.batch_seqs):
                    idx = good[s : s + self.batch_seqs]
                    ids = torch.from_numpy(tokens[idx]).to(self.device, non_blocking=True)  # (b, L)
                    logits[idx] = self._forward(ids).cpu().numpy()
        ok = reasons == ""
        use_sigmoid = getattr(self.model, "use_sigmoid", False)
        scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64))) if use_sigmoid else logits.astype(np.float64)
        return {
            "row_id": row_ids,
            "logit": logits,
            "score": scores.astype(np.float32),
            "ok": ok,
            "reason": reasons.astype(str),
        }
