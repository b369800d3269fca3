"""MATES oracle probing (pure PyTorch): the reference-set loss after one AdamW step on a single candidate.

For a target checkpoint M (model + AdamW state + step) and a candidate x, MATES's oracle influence is
I(x) ∝ −L(D_ref | M) + L(D_ref | A(M, x)), where A is one optimizer step on the batch {x} (docs/method.md, "MATES").
The released code stores only L(D_ref | A(M, x)): the baseline L(D_ref | M) is the same for every probe of a
checkpoint (cxcscmu/MATES#5). So do we: ``Prober.probe`` returns post-step losses, ``Prober.baseline_loss`` the
constant.

One probe, exactly as the target's own training step (``bliss_ray.train.loop.train_lm``) would take it:

    restore model params and AdamW state (exp_avg, exp_avg_sq, per-parameter step) to the checkpoint
    lr ← the probe LR;  loss = mean next-token CE of x (1, L);  backward;  clip global grad norm;  AdamW step
    record the reference loss (eval mode, no grad)

The released code reloads the whole checkpoint from disk before every probe (~2.5 s per probe on an A100). Here
the checkpoint is loaded once: the parameters and the optimizer state are snapshotted in memory and copied back
in place (``copy_``) before each probe, which is exact and costs one memcpy of model + optimizer state.

Reference loss: the mean next-token CE over every target token of the reference set (``loss_mask`` marks the
targets of LAMBADA-style items; all positions otherwise), i.e. total masked NLL ÷ total masked tokens, so the
value does not depend on the batch size. Rows are right-padded and the model is causal, so the rows are sorted by
length and each batch is cut after its longest row's last target token: the padding computed is only what rows
shorter than their batch's longest carry. ``Prober.reference_batches`` lists the (rows, tokens) of each batch,
what one reference evaluation costs; the probe stage records it and the FLOPs ledger counts it.

    prober = Prober("runs/demo/r0.pretrain-…/state", ref_ids, ref_mask, lr=1e-3)
    losses = prober.probe(candidates)            # (N,) post-step reference losses, one probe per row
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bliss_ray.train.checkpoint import load_train_state
from bliss_ray.train.loop import autocast_for, clip_grad_norm, lm_loss, make_optimizer


def _long(a) -> torch.Tensor:
    """An int64 CPU tensor copy of an array or tensor (memmaps are read-only, slices may have negative strides)."""
    return a.long().cpu() if torch.is_tensor(a) else torch.from_numpy(np.array(a, dtype=np.int64))


def _real_lengths(mask: np.ndarray | None, n: int, seq_len: int) -> np.ndarray:
    """Tokens each reference row needs: up to and including its last target token (rows are right-padded)."""
    if mask is None:
        return np.full(n, seq_len, dtype=np.int64)
    has = mask.any(1)
    last = seq_len - 1 - np.argmax(mask[:, ::-1] != 0, axis=1)  # (N,) index of the last target token
    return np.where(has, last + 1, 1).astype(np.int64)


def batch_shapes(lengths: np.ndarray, batch_seqs: int) -> list[tuple[int, int]]:
    """(rows, tokens per row) of each batch ``token_mean_loss`` computes: consecutive rows, cut after the batch's
    longest row. What one reference evaluation costs, so the FLOPs ledger counts exactly this."""
    return [
        (len(lengths[s : s + batch_seqs]), int(lengths[s : s + batch_seqs].max()))
        for s in range(0, len(lengths), batch_seqs)
    ]


@torch.no_grad()
def token_mean_loss(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    batch_seqs: int = 32,
    lengths: np.ndarray | None = None,
) -> float:
    """Mean next-token CE over all target tokens of a reference set (eval mode; the model's mode is restored): the
    released prober's loss, a token average (``evaluation.reference.reference_loss`` averages per sequence).

    ``ids`` (N, L) int64, ``mask`` (N, L) or None (every position t ≥ 1 is a target), ``lengths`` (N,) the
    tokens each row needs (default: all); rows should be sorted by length so that batches are tight."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n, seq_len = ids.shape
    lengths = np.full(n, seq_len) if lengths is None else lengths
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for s, (_, t) in zip(range(0, n, batch_seqs), batch_shapes(lengths, batch_seqs), strict=True):
        x = ids[s : s + batch_seqs, :t].to(device)  # (b, t)
        with autocast_for(device):
            logits = model(input_ids=x).logits  # (b, t, V)
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        nll = nll.view(x.shape[0], t - 1)  # (b, t-1): token t+1 is predicted at position t
        m = torch.ones_like(nll) if mask is None else mask[s : s + batch_seqs, 1:t].to(device, nll.dtype)
        nll_sum += (nll * m).sum().double()
        count += m.sum().double()
    model.train(was_training)
    return (nll_sum / count.clamp(min=1)).item()


class Prober:
    """One target checkpoint, loaded once; ``probe`` runs one independent one-step probe per candidate row.

    ``state_dir`` is a ``save_train_state`` directory (``model/`` + ``train_state.pt`` with "optimizer" and
    "step"). AdamW's betas, weight decay and epsilon come from the checkpoint's optimizer state (what the target
    trains with); only the LR is set per probe. ``grad_clip`` is the target's (MATES: 1.0)."""

    def __init__(
        self,
        state_dir: str | Path,
        reference_ids: np.ndarray | torch.Tensor,
        reference_mask: np.ndarray | torch.Tensor | None,
        lr: float,
        *,
        grad_clip: float = 1.0,
        device: str | torch.device = "cpu",
        reference_batch_seqs: int = 32,
    ):
        self.device = torch.device(device)
        self.lr, self.grad_clip, self.reference_batch_seqs = lr, grad_clip, reference_batch_seqs
        self.model, state = load_train_state(state_dir)
        self.model.to(self.device).train()
        self.step = int(state["step"])  # the target's global step at the checkpoint
        # placeholder hyperparameters: load_state_dict replaces every group's settings with the checkpoint's
        self.optimizer = make_optimizer(self.model, lr, (0.9, 0.95), 0.0)
        self.optimizer.load_state_dict(state["optimizer"])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._snapshot()

        ref_ids = _long(reference_ids)  # (R, L)
        ref_mask = None if reference_mask is None else np.asarray(reference_mask)
        lengths = _real_lengths(ref_mask, *ref_ids.shape)
        order = np.argsort(lengths, kind="stable")  # similar lengths share a batch: little padding per batch
        self.reference_ids = ref_ids[order]
        self.reference_mask = None if ref_mask is None else _long(ref_mask[order])
        self.reference_lengths = lengths[order]
        # what one reference evaluation computes, padding inside each batch included: the FLOPs ledger's input
        self.reference_batches = batch_shapes(self.reference_lengths, reference_batch_seqs)
        self.reference_tokens = sum(rows * tokens for rows, tokens in self.reference_batches)
        self.baseline_loss = self.reference_loss()  # L(D_ref | M): constant for this checkpoint
        self.probes_done, self.seconds = 0, 0.0

    def _snapshot(self) -> None:
        """Copies of the parameters and of every AdamW state tensor, taken once (never reloaded from disk)."""
        self._params0 = [p.detach().clone() for p in self.params]
        self._state0 = []
        for p in self.params:
            s = self.optimizer.state.get(p)
            self._state0.append(
                None if s is None else {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            )

    @torch.no_grad()
    def restore_params(self) -> None:
        for p, p0 in zip(self.params, self._params0, strict=True):
            p.copy_(p0)
            p.grad = None

    @torch.no_grad()
    def restore_optimizer(self) -> None:
        """AdamW moments and per-parameter step counts back to the checkpoint's (the step count sets the bias
        correction, so a leaked step changes the next probe's update even with identical moments)."""
        for p, s0 in zip(self.params, self._state0, strict=True):
            if s0 is None:  # a parameter the checkpoint never stepped: a probe must not leave state behind
                self.optimizer.state.pop(p, None)
                continue
            s = self.optimizer.state[p]
            for k, v in s0.items():
                if torch.is_tensor(v):
                    s[k].copy_(v)  # in place: the optimizer's own tensors, no reallocation
                else:
                    s[k] = v

    def restore(self) -> None:
        self.restore_params()
        self.restore_optimizer()

    def reference_loss(self) -> float:
        return token_mean_loss(
            self.model, self.reference_ids, self.reference_mask, self.reference_batch_seqs, self.reference_lengths
        )

    def _one_step(self, x: torch.Tensor) -> bool:
        """One AdamW step of the target on the batch ``x`` (1, L); False (no step) if loss or grad is not finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with autocast_for(self.device):
            loss = lm_loss(self.model, x)
        loss.backward()
        grad_norm = clip_grad_norm(self.params, self.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def probe(self, ids_batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """One independent probe per row of ``ids_batch`` (N, L): L(D_ref | A(M, x_i)) as float64 (N,).
        A probe whose step is not finite gets NaN (the influence stage drops it)."""
        rows = _long(ids_batch)  # (N, L)
        out = np.full(len(rows), np.nan)
        t0 = time.perf_counter()
        for i in range(len(rows)):
            self.restore()  # every probe starts from the checkpoint, whatever the previous one did
            if self._one_step(rows[i : i + 1].to(self.device)):  # (1, L): MATES probes a batch of one sequence
                out[i] = self.reference_loss()
        self.restore()  # leave the prober at the checkpoint
        self.seconds += time.perf_counter() - t0
        self.probes_done += len(rows)
        return out
