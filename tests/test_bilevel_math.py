"""The BLISS bilevel math on CPU, no Ray: closed-form hypergradient, batched vs per-sample c_i, losses, weights.

.venv/bin/python -m pytest tests/test_bilevel_math.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F

from bliss_ray.bilevel.hypergrad import ci_ghost, ci_loop, hvp_of, score_hypergrad, solve_z
from bliss_ray.bilevel.losses import per_sample_ce, per_sample_kl, weighted_lower_loss
from bliss_ray.bilevel.weights import global_softmax, stale_softmax, weight_stats
from bliss_ray.models.lm import arch_from_preset, build_lm
from bliss_ray.models.score import ScoreModel


def _ridge_problem(seed=0, n=12, d=5, k=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)  # training inputs
    y = torch.randn(n, generator=g, dtype=torch.float64)
    phi = torch.randn(n, k, generator=g, dtype=torch.float64)  # the score model's features of each sample
    A = torch.randn(7, d, generator=g, dtype=torch.float64)  # reference ("validation") set
    b = torch.randn(7, generator=g, dtype=torch.float64)
    return X, y, phi, A, b


def _phi_closed_form(w_s, X, y, phi, A, b, lam):
    """Φ(w_s) = f(θ*(w_s)) with θ* = argmin Σ P_i (x_iᵀθ − y_i)²/2 + λ‖θ‖², P = softmax(σ(φ w_s))."""
    P = torch.softmax(torch.sigmoid(phi @ w_s), 0)
    H = X.T @ (P[:, None] * X) + 2 * lam * torch.eye(X.shape[1], dtype=X.dtype)
    theta = torch.linalg.solve(H, X.T @ (P * y))
    return 0.5 * ((A @ theta - b) ** 2).mean(), theta, P


def test_implicit_hypergradient_matches_closed_form_and_finite_differences():
    """Weighted ridge regression: the implicit hypergradient (HVPs + Richardson + c_i + the softmax formula)
    equals autograd through the closed-form inner solution and central finite differences (float64)."""
    X, y, phi, A, b = _ridge_problem()
    lam = 0.05
    w_s = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    # exact: differentiate through the closed form
    phi_val, theta_star, P = _phi_closed_form(w_s, X, y, phi, A, b, lam)
    (exact,) = torch.autograd.grad(phi_val, [w_s])

    # implicit: z ≈ H⁻¹∇f by Richardson with HVPs at θ*, then -Σ P_j (c_j − c̄) ∇s_j
    theta = theta_star.detach().clone().requires_grad_(True)
    per_sample = 0.5 * (X @ theta - y) ** 2  # CE_i analogue
    hvp = hvp_of((P.detach() * per_sample).sum(), [theta], l2=lam)
    (grad_f,) = torch.autograd.grad(0.5 * ((A @ theta - b) ** 2).mean(), [theta])
    H_norm = torch.linalg.matrix_norm(X.T @ (P.detach()[:, None] * X) + 2 * lam * torch.eye(5, dtype=X.dtype), 2)
    z = solve_z(hvp, [grad_f], steps=4000, lr=1.0 / H_norm.item(), damping=0.0, init="zero", clip=None)
    c = torch.stack([torch.autograd.grad(per_sample[i], [theta], retain_graph=True)[0] @ z[0] for i in range(12)])
    score = torch.nn.Linear(3, 1, bias=False).double()
    score.weight.data = w_s.detach().clone()[None]
    s = torch.sigmoid(score(phi).squeeze(-1))
    p_local, _, _ = global_softmax(s)
    grads, _ = score_hypergrad(score, s, p_local, c)
    implicit = grads[0].squeeze(0)
    assert torch.allclose(implicit, exact, rtol=1e-6, atol=1e-10), (implicit, exact)

    # central finite differences of Φ
    eps = 1e-6
    fd = torch.zeros(3, dtype=torch.float64)
    for j in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[j] = eps
        fd[j] = (
            _phi_closed_form(w_s.detach() + e, X, y, phi, A, b, lam)[0]
            - _phi_closed_form(w_s.detach() - e, X, y, phi, A, b, lam)[0]
        ) / (2 * eps)
    assert torch.allclose(implicit, fd, rtol=1e-5, atol=1e-9), (implicit, fd)


def test_too_few_richardson_steps_do_not_match():
    """The comparison above can fail: with Q = 1 the approximate z gives a visibly different hypergradient."""
    X, y, phi, A, b = _ridge_problem()
    w_s = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    phi_val, theta_star, P = _phi_closed_form(w_s, X, y, phi, A, b, 0.05)
    (exact,) = torch.autograd.grad(phi_val, [w_s])
    theta = theta_star.detach().clone().requires_grad_(True)
    per_sample = 0.5 * (X @ theta - y) ** 2
    hvp = hvp_of((P.detach() * per_sample).sum(), [theta], l2=0.05)
    (grad_f,) = torch.autograd.grad(0.5 * ((A @ theta - b) ** 2).mean(), [theta])
    z = solve_z(hvp, [grad_f], steps=1, lr=0.01, damping=0.0, init="zero", clip=None)
    c = torch.stack([torch.autograd.grad(per_sample[i], [theta], retain_graph=True)[0] @ z[0] for i in range(12)])
    score = torch.nn.Linear(3, 1, bias=False).double()
    score.weight.data = w_s.detach().clone()[None]
    s = torch.sigmoid(score(phi).squeeze(-1))
    grads, _ = score_hypergrad(score, s, global_softmax(s)[0], c)
    assert not torch.allclose(grads[0].squeeze(0), exact, rtol=1e-3)


def _tiny(dtype, use_sigmoid, family="pythia-micro"):
    torch.manual_seed(0)
    proxy = build_lm(arch_from_preset(family, vocab_size=97), max_seq_len=16).to(dtype)
    score = ScoreModel.from_proxy(proxy, use_sigmoid=use_sigmoid, copy_trunk=False, seed=1).to(dtype)
    ids = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(3))
    z = {
        p: torch.randn(p.shape, dtype=dtype, generator=torch.Generator().manual_seed(i))
        for i, p in enumerate(proxy.parameters())
    }
    return proxy, score, ids, z


@pytest.mark.parametrize("use_sigmoid", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_batched_ci_and_hypergradient_equal_per_sample_loop(dtype, tol, use_sigmoid):
    """ci_ghost (batched, chunked) equals the per-sample loop on a tiny GPT-NeoX; so does the hypergradient."""
    proxy, score, ids, z = _tiny(dtype, use_sigmoid)
    c_ref = ci_loop(proxy, ids, z)
    c_fast = ci_ghost(proxy, ids, z, chunk=4)  # 6 rows in chunks of 4: exercises a ragged last chunk
    rel = ((c_fast.double() - c_ref).abs().max() / c_ref.abs().max()).item()
    assert rel < tol, rel
    grads = []
    for c in (c_ref, c_fast):
        _, s = score(ids)
        grads.append(score_hypergrad(score, s, global_softmax(s)[0], c)[0])
    scale = max(g.abs().max().item() for g in grads[0])  # tensors whose true gradient is ~0 compare at this scale
    assert scale > 0
    for g_ref, g_fast in zip(*grads, strict=True):
        assert (g_fast - g_ref).abs().max().item() <= tol * scale


def test_ghost_covers_llama_rmsnorm():
    proxy, _, ids, z = _tiny(torch.float64, True, family="llama-tiny")
    assert ((ci_ghost(proxy, ids, z, chunk=3) - ci_loop(proxy, ids, z)).abs().max()) < 1e-8


def test_kl_properties_and_direction():
    torch.manual_seed(0)
    a = torch.randn(3, 5, 11)
    assert per_sample_kl(a, a.clone()).abs().max() < 1e-6  # identical logits → 0
    b = torch.randn(3, 5, 11)
    kl = per_sample_kl(a, b)
    assert (kl >= 0).all() and (kl > 0).any()
    # documented direction: KL(target ‖ proxy) = F.kl_div(log_softmax(proxy), softmax(target))
    ref = F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="none").sum(-1).mean(1)
    assert torch.allclose(kl, ref, atol=1e-6)
    reverse = F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1), reduction="none").sum(-1).mean(1)
    assert not torch.allclose(kl, reverse, atol=1e-3)


def test_weighted_lower_loss_uniform_weights_is_mean_ce_and_kl_scaled():
    torch.manual_seed(0)
    logits, target = torch.randn(4, 6, 13), torch.randn(4, 6, 13)
    ids = torch.randint(0, 13, (4, 6))
    w = torch.full((4,), 0.25)
    loss, _, kl = weighted_lower_loss(logits, ids, w, None, gamma=0.5, global_batch=4)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6) and kl.abs().sum() == 0
    loss_kl, _, kl = weighted_lower_loss(logits, ids, w, target, gamma=0.5, global_batch=4)
    assert torch.allclose(loss_kl, ref + 0.5 * kl.mean(), atol=1e-6)


def test_reference_loss_continuation_mask():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    ce = per_sample_ce(logits, ids, mask)
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none").view(2, 4)
    assert torch.allclose(ce, torch.stack([tok[0, 2:].mean(), tok[1, 3]]), atol=1e-6)


def test_weights_sum_to_one_and_stats():
    s = torch.tensor([0.1, 0.9, 0.5, 0.2])
    p_local, p_all, norm = global_softmax(s)
    assert math.isclose(p_all.sum().item(), 1.0, rel_tol=1e-6) and torch.equal(p_local, p_all)
    assert torch.allclose(p_all, torch.softmax(s, 0))
    stale = stale_softmax(s, norm)  # with its own normaliser the stale form equals the fresh one
    assert torch.allclose(stale, p_all)
    stats = weight_stats(torch.full((8,), 1 / 8))
    assert math.isclose(stats["weight_entropy"], math.log(8)) and stats["weight_max_min_ratio"] == 1.0
    # sigmoid scores bound the weight ratio by e (method.md §1.3)
    wide = global_softmax(torch.sigmoid(torch.tensor([-50.0, 50.0, 0.0])))[1]
    assert weight_stats(wide)["weight_max_min_ratio"] <= math.e + 1e-6
