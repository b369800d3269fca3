"""The BLISS score model: the proxy's transformer trunk + mean-pool + Linear(d, 1) (+ sigmoid).

    logit_i = wᵀ mean_t h_{i,t} + b        (fp32, mean over non-padding positions)
    s_i     = σ(logit_i) if use_sigmoid else logit_i

The trunk has exactly the proxy's config (released code: ``GPTRegression`` from the same lit-gpt config).
``score_init="proxy_warmup"`` copies the trunk from the warmed-up proxy (released default); ``"random"`` keeps
the fresh init. Ranking the corpus uses the fp32 ``logit``: σ is monotone, so the order is the same as by s_i,
without the ties that fp16 sigmoid scores create at the selection cut-off (docs/method.md, "Scoring and
selection").

    score_model = ScoreModel.from_proxy(proxy, use_sigmoid=True)
    logit, score = score_model(input_ids)          # (B,), (B,)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, PreTrainedModel


class ScoreModel(nn.Module):
    def __init__(self, trunk_config, use_sigmoid: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk: PreTrainedModel = AutoModel.from_config(trunk_config)  # GPTNeoXModel / LlamaModel, no LM head
        self.head = nn.Linear(trunk_config.hidden_size, 1)  # PyTorch default init, as the released code
        self.use_sigmoid = use_sigmoid

    @classmethod
    def from_proxy(cls, proxy: PreTrainedModel, use_sigmoid: bool, copy_trunk: bool = True, seed: int = 0):
        """A score model with the proxy's architecture; ``copy_trunk`` copies the (warmed-up) proxy's trunk."""
        proxy = getattr(proxy, "module", proxy)
        model = cls(proxy.config, use_sigmoid=use_sigmoid, seed=seed)
        if copy_trunk:
            model.trunk.load_state_dict(proxy.base_model.state_dict())
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
        if attention_mask is None:
            pooled = hidden.mean(1)  # (B, d): packed rows have no padding
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (B, d): mean over real tokens only
        head_dtype = torch.promote_types(self.head.weight.dtype, torch.float32)  # fp32, or fp64 in exact tests
        logit = F.linear(pooled.to(head_dtype), self.head.weight.to(head_dtype), self.head.bias.to(head_dtype))
        logit = logit.squeeze(-1)  # (B,) raw fp32 logit, used for ranking
        score = torch.sigmoid(logit) if self.use_sigmoid else logit  # (B,) s_i, what the softmax weights use
        return logit, score

    def save(self, path: str | Path) -> None:
        """Safetensors weights + the trunk config + the head flag (no pickles)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path / "model.safetensors")
        self.trunk.config.save_pretrained(path / "trunk")
        (path / "score_model.json").write_text(json.dumps({"use_sigmoid": self.use_sigmoid}))

    @classmethod
    def load(cls, path: str | Path, attn: str = "sdpa") -> ScoreModel:
        path = Path(path)
        config = AutoConfig.from_pretrained(path / "trunk")
        config._attn_implementation = attn
        meta = json.loads((path / "score_model.json").read_text())
        model = cls(config, use_sigmoid=meta["use_sigmoid"])
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model
