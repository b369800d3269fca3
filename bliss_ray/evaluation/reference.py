"""The held-out reference loss: how well a checkpoint predicts the reference set's evaluation part.

The mean over sequences of each sequence's mean next-token CE (continuation tokens only for cloze items), the
same per-sequence average the bilevel upper level's f takes, so that evaluation and selection speak of one loss.
MATES's oracle (``mates.probe.token_mean_loss``) averages over all target tokens instead, as the released prober
does; on passages of equal length the two agree.

    reference_loss("runs/demo/r1.pretrain-…/decay", "runs/demo/tokenize-…/reference/eval_array")
"""

from __future__ import annotations

import numpy as np
import torch

from bliss_ray.bilevel.losses import per_sample_ce
from bliss_ray.data.tokens import TokenArray
from bliss_ray.models.lm import load_lm


def reference_loss(model_dir: str, reference_dir: str, batch_seqs: int = 16, dtype: str = "float32") -> float:
    """Mean over the reference rows of each row's mean CE, with the weights in ``dtype`` as lm-eval loads them;
    the CE itself in fp32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_lm(model_dir).to(device, getattr(torch, dtype)).eval()
    ref = TokenArray.open(reference_dir)
    losses = []
    with torch.inference_mode():
        for s in range(0, len(ref), batch_seqs):
            ids = torch.from_numpy(np.asarray(ref.tokens[s : s + batch_seqs], dtype=np.int64)).to(device)  # (b, L)
            mask = None if ref.loss_mask is None else torch.from_numpy(np.asarray(ref.loss_mask[s : s + batch_seqs]))
            mask = None if mask is None else mask.to(device)
            losses.append(per_sample_ce(model(input_ids=ids).logits.float(), ids, mask).cpu())  # (b,)
    return float(torch.cat(losses).mean())
