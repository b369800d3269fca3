"""The BLISS bilevel math on CPU, no Ray: closed-form hypergradient, batched vs per-sample c_i, losses, weights.

.venv/bin/python -m pytest tests/test_bilevel_math.py -q
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bliss_ray.bilevel.hypergrad import ci_ghost, ci_loop, hvp_of, score_hypergrad, solve_z
from bliss_ray.bilevel.losses import per_sample_ce, per_sample_kl, weighted_lower_loss
from bliss_ray.bilevel.weights import global_softmax, stale_softmax, weight_stats
from bliss_ray.models.arch import arch_from_preset
from bliss_ray.models.lm import build_lm
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
    # sigmoid scores bound the weight ratio by e (docs/method.md, "The bilevel problem")
    wide = global_softmax(torch.sigmoid(torch.tensor([-50.0, 50.0, 0.0])))[1]
    assert weight_stats(wide)["weight_max_min_ratio"] <= math.e + 1e-6


def test_stale_first_step_weights_sum_to_one_over_the_global_batch(monkeypatch):
    """Before the first hypergradient step there is no global normaliser: each of N workers takes a softmax of its
    own scores. Those sum to 1 per worker, N over the global batch; ``stale_softmax`` divides by N so that the
    global batch's CE weights sum to 1 as on every later step. N workers simulated one at a time (the first stale
    step needs no collective: only the world size)."""
    from bliss_ray.train import dist

    n_workers, local = 4, 3
    scores = torch.sigmoid(torch.randn(n_workers * local, generator=torch.Generator().manual_seed(0)))
    monkeypatch.setattr(dist, "world_size", lambda: n_workers)
    weights = torch.cat([stale_softmax(chunk, None) for chunk in scores.split(local)])
    assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-6), weights.sum()
    for r, chunk in enumerate(scores.split(local)):  # within a worker: that worker's softmax, scaled by 1/N
        assert torch.allclose(weights[r * local : (r + 1) * local] * n_workers, torch.softmax(chunk, 0))


class _GradRecorder:
    """Stands in for an optimizer: records the gradient each step is asked to take and leaves the weights alone,
    so that several settings are compared at the same point."""

    def __init__(self, params):
        self.params = list(params)
        self.grads = []

    def step(self):
        self.grads.append([p.grad.detach().clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


RANKS, LOCAL_SEQS = 4, 2  # the released run simulated on 4 GPUs × 2 sequences; N = 4 is a power of two, so every
# factor N below is exact in binary floating point and the scale identities hold to rounding-free precision


# the recorders never call the real optimizers' step, which the LR schedulers (stepped by outer_step) warn about
_NO_SCHED_WARNING = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")


def _outer_step_grads(**settings):
    """One outer step (K = 1) of bliss_ray on the whole global batch in one process; returns the proxy gradient of
    the inner step, the score-model hypergradient and the metrics. Models, batches and scores are fixed seeds."""
    from bliss_ray.bilevel.loop import BilevelState, outer_step
    from bliss_ray.bilevel.settings import BilevelSettings

    arch = arch_from_preset("pythia-micro", vocab_size=97)
    proxy = build_lm(arch, max_seq_len=16, seed=0).double()
    target = build_lm(arch, max_seq_len=16, seed=2).double()
    score = ScoreModel.from_proxy(proxy, use_sigmoid=True, copy_trunk=False, seed=1).double()
    ids = torch.randint(0, 97, (RANKS * LOCAL_SEQS, 16), generator=torch.Generator().manual_seed(3))
    ref = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(4))
    s = BilevelSettings(**({"outer_steps": 10, "warmup_frac": 0.0, "micro_batch_seqs": RANKS * LOCAL_SEQS} | settings))
    state = BilevelState.create(proxy, score, target, s)
    state.proxy_opt = _GradRecorder(p for p in proxy.parameters() if p.requires_grad)
    state.score_opt = _GradRecorder(q for q in score.parameters() if q.requires_grad)
    metrics = outer_step(state, s, lambda i: ids, lambda t: (ref, None))
    return state.proxy_opt.grads[0], state.score_opt.grads[0], metrics, (proxy, target, score, ids)


def _released_rank_loss(proxy, ids, w, target_logits, gamma, reg):
    """One rank's lower-level loss as the released ``bilevel_selection.py`` writes it: chunked_cross_entropy with
    ``weight`` (Σ_i w_i mean_t CE_i) + reg·Σ‖θ‖² + γ·kl_div_token_level (mean over positions, then the batch).
    Logits are upcast to fp32 as bliss_ray's losses do, so both sides round the loss alike."""
    logits = proxy(input_ids=ids).logits.float()
    b, _, v = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none").view(b, -1)
    loss = (ce * w.view(-1, 1)).mean(-1).sum() + reg * sum(p.norm(2).pow(2) for p in proxy.parameters())
    kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(target_logits.float(), -1), reduction="none")
    return loss + gamma * kl.sum(-1).mean(-1).mean(0)


@_NO_SCHED_WARNING
def test_released_loss_scaling_is_the_ddp_mean_of_the_released_per_rank_losses():
    """``loss_scaling: released`` with N = 4: bliss_ray's inner-step gradient (one process, whole global batch)
    equals the released code on 4 ranks — each rank's Σ_local P_i CE_i + γ KL_local + λ‖θ‖² with the global
    softmax weights, gradients averaged as DDP does — i.e. ∇ (1/N)·[Σ P_i CE_i + Nγ KL + Nλ‖θ‖²]; and the clip
    acts on that averaged gradient, as the released ``fabric.clip_gradients`` after DDP's all-reduce."""
    gamma, reg = 0.3, 1e-2  # large enough that the KL and L2 terms move the gradient well above the tolerance
    common = {"gamma": gamma, "l2": reg, "loss_scaling": "released", "released_devices": RANKS}
    grads, _, _, (proxy, target, score, ids) = _outer_step_grads(**common, grad_clip=1e9)
    params = [p for p in proxy.parameters() if p.requires_grad]
    with torch.no_grad():
        weights = torch.softmax(score(ids)[1], 0)  # the global softmax every rank computes from gathered scores
        target_logits = target(input_ids=ids).logits
    per_rank = []
    for r in range(RANKS):
        rows = slice(r * LOCAL_SEQS, (r + 1) * LOCAL_SEQS)
        loss = _released_rank_loss(proxy, ids[rows], weights[rows], target_logits[rows], gamma, reg)
        per_rank.append(torch.autograd.grad(loss, params))
    ddp_mean = [sum(g) / RANKS for g in zip(*per_rank, strict=True)]
    # both sides evaluate the loss in fp32 and differ only in summation order (per-rank sums vs one global sum),
    # ~1e-7 relative; 1e-5 of the largest entry. Dropping 1/N on CE, or N on γ or λ, moves it by O(1).
    scale = max(g.abs().max().item() for g in ddp_mean)
    for a, b in zip(grads, ddp_mean, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * scale
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ddp_mean])).item()
    clipped, _, _, _ = _outer_step_grads(**common, grad_clip=norm / 2)  # the clip binds: halves the gradient
    for a, b in zip(clipped, ddp_mean, strict=True):
        assert (a - b * (norm / 2) / (norm + 1e-6)).abs().max().item() <= 1e-5 * scale  # torch's clip coefficient


@_NO_SCHED_WARNING
def test_released_scaling_differs_from_global_by_the_stated_factors():
    """(1/N)·g(Nγ, Nλ): the released inner gradient × N equals ``global`` with γ → Nγ, λ → Nλ, and is not
    ``global`` at the same γ, λ. In the outer step the Hessian is scaled by 1/N as well, so z is N× the z of
    ``global`` with (Nγ, Nλ) if η_z → η_z/N and μ → Nμ (the clipped Richardson residual is the same vector in
    both), and so is the hypergradient: one full outer step, including the per-tensor z clip, checks it."""
    n, gamma, reg, z_lr, mu = RANKS, 0.3, 1e-2, 0.5, 0.1
    base = {"hypergrad_clip": None, "grad_clip": 1e9, "z_init": "zero", "z_clip": 1.0, "z_steps": 3}
    rel_p, rel_s, rel_m, _ = _outer_step_grads(
        **base, gamma=gamma, l2=reg, z_lr=z_lr, z_damping=mu, loss_scaling="released", released_devices=n
    )
    glob_p, glob_s, glob_m, _ = _outer_step_grads(**base, gamma=n * gamma, l2=n * reg, z_lr=z_lr / n, z_damping=n * mu)
    for a, b in zip(rel_p, glob_p, strict=True):
        torch.testing.assert_close(a * n, b, rtol=1e-12, atol=1e-300)
    for a, b in zip(rel_s, glob_s, strict=True):
        torch.testing.assert_close(a, b * n, rtol=1e-12, atol=1e-300)
    assert rel_m["z_norm"] == pytest.approx(n * glob_m["z_norm"], rel=1e-12)
    assert rel_m["lower_loss"] == pytest.approx(glob_m["lower_loss"], rel=1e-12)  # the metric stays Σ P_i CE_i
    same_p, _, _, _ = _outer_step_grads(**base, gamma=gamma, l2=reg, z_lr=z_lr, z_damping=mu)
    assert not all(torch.allclose(a * n, b, rtol=1e-3) for a, b in zip(rel_p, same_p, strict=True))
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(rel_p, same_p, strict=True))


def test_paper_presets_reproduce_the_released_eight_gpu_objective():
    """The paper presets run on 8 workers and use the released code's effective objective on its 8 GPUs."""
    from bliss_ray.config import load_experiment

    for name in ("pythia410m", "pythia1b"):
        exp = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "paper" / f"{name}.yaml", [])
        assert exp.bilevel.loss_scaling == "released" and exp.bilevel.released_devices == 8
        assert exp.resources.bilevel_workers == 8 and exp.bilevel.micro_batch_seqs * 8 == 32  # run.sh: 8 × 4


def test_a_bilevel_stage_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(tmp_path):
    """``bilevel.checkpoint``: 4 outer steps straight vs 2 steps, a checkpoint, a fresh process's state loaded from
    it, 2 more: proxy and score model, both AdamW states, both schedulers, the stale normaliser and every step's
    metrics agree bit for bit (``weight_norm: stale`` makes step 3 depend on the saved normaliser)."""
    from bliss_ray.bilevel.checkpoint import load_bilevel, save_bilevel
    from bliss_ray.bilevel.loop import BilevelState, run_bilevel
    from bliss_ray.bilevel.settings import BilevelSettings
    from tests.conftest import assert_same_state

    arch = arch_from_preset("pythia-micro", vocab_size=97)
    s = BilevelSettings(
        outer_steps=4, weight_norm="stale", gamma=0.1, micro_batch_seqs=4, proxy_lr=1e-3, score_lr=1e-3
    )
    ids = torch.randint(0, 97, (32, 16), generator=torch.Generator().manual_seed(3))
    target = build_lm(arch, max_seq_len=16, seed=2).eval()

    def fresh() -> BilevelState:
        proxy = build_lm(arch, max_seq_len=16, seed=0)
        return BilevelState.create(proxy, ScoreModel.from_proxy(proxy, True, copy_trunk=True, seed=1), target, s)

    def run(state: BilevelState, end: int) -> BilevelState:
        return run_bilevel(
            state, s, lambda i: ids[4 * i : 4 * i + 4], lambda t: (ids[-4:], None), end_step=end, ckpt_every_steps=1
        )

    ref = run(fresh(), 4)
    save_bilevel(run(fresh(), 2), tmp_path, resumed_from=[])
    resumed, resumed_from = load_bilevel(tmp_path, s, target, torch.device("cpu"))
    assert resumed_from == [2] and resumed.normaliser is not None
    end = run(resumed, 4)
    for a, b in ((end.proxy, ref.proxy), (end.score_model, ref.score_model)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    for opt in ("proxy_opt", "score_opt", "proxy_sched", "score_sched"):
        assert_same_state(getattr(end, opt).state_dict(), getattr(ref, opt).state_dict(), opt)
    assert (end.normaliser.max, end.normaliser.denom) == (ref.normaliser.max, ref.normaliser.denom)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("_s")} for m in ms]  # noqa: E731
    assert strip(end.metrics) == strip(ref.metrics)
