"""The MATES data influence model (pure PyTorch): a BERT regressor from a packed row to its probed loss.

MATES fine-tunes ``bert-base-uncased`` with a mean-pooled regression head; a 1024-token input is reshaped into
512-token chunks (BERT's position limit), every chunk runs through BERT on its own, and the hidden states of all
real tokens of all chunks are averaged (cxcscmu/MATES ``modeling_data_influence_model.py``):

    h = BERT(chunks of x)            (B·n, c, d),  c = min(L, 512), n = ⌈L / c⌉
    pred = wᵀ mean_{real tokens} h + b   (B,) fp32: the predicted (z-scored) post-probe reference loss

Offline, the platform trains the same architecture family from random initialisation on *our* token ids (MATES
decodes GPT-NeoX ids to text and re-tokenizes with BERT's WordPiece; we skip that, so no BERT tokenizer is
needed). ``pretrained_dir`` (a local ``bert-base-uncased`` copy) initialises the trunk where names and shapes
match; the word embeddings are never copied (our ids are not WordPiece ids).

Training (``train_influence_model``) follows MATES's recipe: z-scored targets, MSE, AdamW (weight decay 0.01)
with HF Trainer's default linear decay, a seeded 90/10 split, Spearman on the held-out 10 % after every epoch,
and the weights with the best held-out Spearman kept.

    fit = train_influence_model(ids, losses, arch=influence_arch("bert-tiny", 8192), lr=5e-4, epochs=5)
    fit.model.save("influence_model"); fit.spearman_heldout
    pred, _ = InfluenceModel.load("influence_model")(ids)       # (B,)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from bliss_ray.models.arch import BERT_MAX_POSITIONS, LMArch
from bliss_ray.train.loop import autocast_for


def bert_config(arch: LMArch, dropout: float = 0.1) -> BertConfig:
    return BertConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.d_model,
        num_hidden_layers=arch.n_layer,
        num_attention_heads=arch.n_head,
        intermediate_size=arch.d_ff,
        max_position_embeddings=BERT_MAX_POSITIONS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=None,  # no padding row: token 0 is a real token of our vocabulary, it must train
    )


class InfluenceModel(nn.Module):
    """BERT trunk + mean-pool over real tokens (across 512-token chunks) + Linear(d, 1)."""

    def __init__(self, arch: LMArch, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.arch, self.dropout_p = arch, dropout
        self.bert = BertModel(bert_config(arch, dropout), add_pooling_layer=False)  # the [CLS] pooler is unused
        self.dropout = nn.Dropout(dropout)  # MATES keeps BERT's classifier dropout
        self.head = nn.Linear(arch.d_model, 1)

    def vocab_size(self) -> int:
        return self.bert.config.vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(pred, pred): the fp32 prediction (B,) twice, so callers index ``[0]`` as for the BLISS score model."""
        b, seq_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)  # packed rows: every position is a real token
        chunk = min(seq_len, BERT_MAX_POSITIONS)
        n = math.ceil(seq_len / chunk)
        pad = n * chunk - seq_len
        if pad:  # the last chunk is short: pad it, masked out of attention and of the mean
            input_ids = F.pad(input_ids, (0, pad))
            attention_mask = F.pad(attention_mask, (0, pad))
        hidden = self.bert(
            input_ids=input_ids.reshape(b * n, chunk), attention_mask=attention_mask.reshape(b * n, chunk)
        ).last_hidden_state  # (B·n, c, d): positions restart in every chunk, as in MATES
        hidden = hidden.reshape(b, n * chunk, -1)  # (B, n·c, d)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, n·c, 1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (B, d): mean over every real token of every chunk
        pred = self.head(self.dropout(pooled).float()).squeeze(-1).float()  # (B,) fp32 regression output
        return pred, pred

    def save(self, path: str | Path) -> None:
        """``model.safetensors`` + ``influence_model.json`` (the architecture): no pickles."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path / "model.safetensors")
        meta = {"arch": dataclasses.asdict(self.arch), "dropout": self.dropout_p}
        (path / "influence_model.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> InfluenceModel:
        path = Path(path)
        meta = json.loads((path / "influence_model.json").read_text())
        model = cls(LMArch(**meta["arch"]), dropout=meta["dropout"])
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model

    def load_pretrained_trunk(self, pretrained_dir: str | Path) -> dict[str, list[str]]:
        """Copy a local BERT checkpoint's weights (``model.safetensors``) into the trunk where names and shapes
        match; never the word embeddings. Returns {"loaded": [...], "skipped": [...]}."""
        weights = load_file(Path(pretrained_dir) / "model.safetensors")
        own = self.bert.state_dict()
        loaded, skipped = [], []
        for name, tensor in weights.items():
            key = name.removeprefix("bert.")  # BertForPreTraining / BertForMaskedLM prefix their trunk
            if key in own and own[key].shape == tensor.shape and "word_embeddings" not in key:
                own[key] = tensor.to(own[key].dtype)
                loaded.append(key)
            else:
                skipped.append(name)
        self.bert.load_state_dict(own)
        return {"loaded": loaded, "skipped": skipped}


@dataclass
class InfluenceFit:
    model: InfluenceModel  # with the best held-out Spearman's weights
    history: list[dict]  # one entry per evaluation: epoch, step, train_mse, heldout_mse, spearman
    spearman_heldout: float | None  # the best held-out Spearman (None if never defined)
    best_epoch: int | None
    target_mean: float  # z-scoring of the targets: pred · std + mean is a post-probe loss
    target_std: float
    train_rows: int
    heldout_rows: int
    pretrained: dict = field(default_factory=dict)


def heldout_split(n: int, heldout_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (train, held-out) split of row indices; at least 2 rows in each part when n ≥ 4."""
    order = np.random.default_rng(seed).permutation(n)
    held = min(max(2, round(n * heldout_frac)), n - 2) if n >= 4 else 0
    return np.sort(order[held:]), np.sort(order[:held])


@torch.no_grad()
def predict(model: InfluenceModel, ids: np.ndarray, batch_seqs: int, device: torch.device) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(ids), batch_seqs):
        x = torch.as_tensor(np.asarray(ids[s : s + batch_seqs]), dtype=torch.long, device=device)  # (b, L)
        with autocast_for(device):
            out.append(model(x)[0].float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's ρ, or None when undefined (fewer than 3 points, or a constant input)."""
    from scipy.stats import spearmanr  # here, not at the top: scoring loads this module on torch-only GPU hosts

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def _z_scored(losses: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(mean, std, z-scored losses): MATES z-scores all labels before splitting."""
    losses = np.asarray(losses, dtype=np.float64)
    mean, std = float(losses.mean()), float(losses.std())
    return mean, std, (losses - mean) / (std if std > 0 else 1.0)


def _adamw_linear_decay(
    model: nn.Module, lr: float, weight_decay: float, total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with HF Trainer's default schedule: the learning rate decays linearly to 0 over ``total`` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))


def _train_epoch(
    model: InfluenceModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    ids: np.ndarray,
    z: np.ndarray,
    order: np.ndarray,
    batch_seqs: int,
    device: torch.device,
) -> tuple[float, int]:
    """One pass over the shuffled training rows ``order``: MSE steps on the z-scored targets.
    Returns (sum of per-row squared errors, optimizer steps taken)."""
    sq_sum, steps = 0.0, 0
    for s in range(0, len(order), batch_seqs):
        rows = np.sort(order[s : s + batch_seqs])  # sorted reads from a memmap are faster
        x = torch.as_tensor(np.asarray(ids[rows]), dtype=torch.long, device=device)  # (b, L)
        y = torch.as_tensor(z[rows], dtype=torch.float32, device=device)  # (b,)
        with autocast_for(device):
            pred = model(x)[0]  # (b,) fp32
        loss = F.mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        steps += 1
        sq_sum += loss.item() * len(rows)
    return sq_sum, steps


def _heldout_metrics(
    model: InfluenceModel, ids: np.ndarray, z: np.ndarray, held_idx: np.ndarray, batch_seqs: int, device
) -> dict:
    """Held-out MSE and Spearman of the model's predictions against the z-scored targets (empty: no held-out rows)."""
    if not len(held_idx):
        return {}
    pred = predict(model, ids[held_idx], batch_seqs, device)
    return {
        "heldout_mse": float(np.mean((pred - z[held_idx]) ** 2)),
        "spearman": spearman(pred, z[held_idx]),
    }


def train_influence_model(
    ids: np.ndarray,
    losses: np.ndarray,
    *,
    arch: LMArch,
    lr: float,
    epochs: int,
    batch_seqs: int = 32,
    weight_decay: float = 0.01,
    heldout_frac: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dropout: float = 0.1,
    pretrained_dir: str | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> InfluenceFit:
    """Fit an ``InfluenceModel`` to (rows ``ids`` (N, L), probed ``losses`` (N,)); see the module docstring."""
    device = torch.device(device)
    mean, std, z = _z_scored(losses)
    train_idx, held_idx = heldout_split(len(losses), heldout_frac, seed)
    model = InfluenceModel(arch, dropout=dropout, seed=seed)
    pretrained = model.load_pretrained_trunk(pretrained_dir) if pretrained_dir else {}
    model.to(device).train()
    opt, sched = _adamw_linear_decay(model, lr, weight_decay, max(1, math.ceil(len(train_idx) / batch_seqs) * epochs))
    rng = np.random.default_rng([seed, 1])
    history, best, best_state, best_epoch, step = [], -math.inf, None, None, 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(train_idx)  # a fresh seeded shuffle every epoch
        sq_sum, steps = _train_epoch(model, opt, sched, ids, z, order, batch_seqs, device)
        step += steps
        entry = {"epoch": epoch, "step": step, "train_mse": sq_sum / max(1, len(train_idx))}
        entry |= {"lr": sched.get_last_lr()[0]} | _heldout_metrics(model, ids, z, held_idx, batch_seqs, device)
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
        rho = entry.get("spearman")
        score = rho if rho is not None else -math.inf
        if best_state is None or score > best:  # keep the best by held-out Spearman (the first epoch if undefined)
            best, best_epoch = score, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    model.load_state_dict(best_state)
    model.eval()
    return InfluenceFit(
        model=model,
        history=history,
        spearman_heldout=best if math.isfinite(best) else None,
        best_epoch=best_epoch,
        target_mean=mean,
        target_std=std,
        train_rows=len(train_idx),
        heldout_rows=len(held_idx),
        pretrained={k: len(v) for k, v in pretrained.items()},
    )
