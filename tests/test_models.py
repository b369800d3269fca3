"""Models: Pythia presets match EleutherAI's published parameter counts, checkpoints round-trip through stock
transformers (safetensors), the score model's pooling/sigmoid and save/load.

    .venv/bin/python -m pytest tests/test_models.py -q
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bliss_ray.models.arch import arch_from_preset, padded_vocab
from bliss_ray.models.lm import build_lm, hf_config, load_lm, save_lm
from bliss_ray.models.score import ScoreModel

# Total parameters of the released Pythia models (EleutherAI/pythia README), vocabulary 50304.
PUBLISHED = {
    "pythia-14m": 14_067_712,
    "pythia-31m": 30_494_720,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_pythia_presets_match_published_sizes(name):
    arch = arch_from_preset(name, 50304)
    with torch.device("meta"):  # no memory, no compute: just the architecture transformers builds
        model = AutoModelForCausalLM.from_config(hf_config(arch, 1024))
    n = sum(p.numel() for p in model.parameters())
    assert n == PUBLISHED[name] == arch.n_params()
    c = model.config
    assert not c.tie_word_embeddings and c.use_parallel_residual and c.rope_parameters["partial_rotary_factor"] == 0.25


def test_llama_family_and_unknown_preset():
    arch = arch_from_preset("llama-0.5b", 50304)
    assert abs(arch.n_params() - 0.5e9) < 0.02e9
    with pytest.raises(KeyError, match="unknown model preset"):
        arch_from_preset("pythia-7m")


def test_padded_vocab():
    assert padded_vocab(50277) == 50304 and padded_vocab(8192) == 8192


def test_checkpoint_loads_with_stock_transformers(tmp_path):
    model = build_lm(arch_from_preset("pythia-micro", 128), max_seq_len=32)
    save_lm(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)
    torch.testing.assert_close(load_lm(tmp_path / "ckpt")(ids).logits, model(ids).logits)


def test_build_is_seeded():
    a = build_lm(arch_from_preset("pythia-micro", 128), 32, seed=3)
    b = build_lm(arch_from_preset("pythia-micro", 128), 32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("use_sigmoid", [True, False])
def test_score_model_pooling_head_and_roundtrip(tmp_path, use_sigmoid):
    proxy = build_lm(arch_from_preset("pythia-micro", 128), 32)
    score = ScoreModel.from_proxy(proxy, use_sigmoid=use_sigmoid).eval()
    trunk = proxy.base_model.state_dict()
    assert all(torch.equal(v, score.trunk.state_dict()[k]) for k, v in trunk.items())  # copied from the proxy
    ids = torch.randint(0, 128, (3, 10))
    logit, s = score(ids)
    assert logit.dtype == torch.float32 and logit.shape == (3,)
    torch.testing.assert_close(s, torch.sigmoid(logit) if use_sigmoid else logit)
    # padding does not change the pooled score of the real tokens
    padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(3, 10), torch.zeros(3, 4)], 1).long()
    torch.testing.assert_close(score(padded, mask)[0], logit, atol=1e-5, rtol=1e-5)
    score.save(tmp_path / "s")
    torch.testing.assert_close(ScoreModel.load(tmp_path / "s").eval()(ids)[0], logit)
    fresh = ScoreModel.from_proxy(proxy, use_sigmoid, copy_trunk=False, seed=7)
    assert not all(torch.equal(v, fresh.trunk.state_dict()[k]) for k, v in trunk.items())
