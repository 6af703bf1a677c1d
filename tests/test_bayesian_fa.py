"""Bayesian factor analysis: the collapsed likelihood against the closed form and the uncollapsed model, the
rotation quotient NUTS samples, and PSIS-LOO on its InferenceData. (NUTS recovering a known covariance is checked
on the experiment's one NUTS run, in test_compare_posteriors.py.)"""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch
from pyro import poutine
from scipy import stats

from pyro_lvm import build_guide, evaluate, to_inference_data
from pyro_lvm.data import make_factor_analysis_data
from pyro_lvm.models.bayesian_fa import BayesianFAConfig, BayesianFactorAnalysis, RotationQuotient, covariance
from pyro_lvm.runtime import local_params, seeded

pytestmark = pytest.mark.usefixtures("float64")


def _model(n: int = 100, d: int = 3, k: int = 1, seed: int = 0) -> tuple[BayesianFactorAnalysis, torch.Tensor, dict]:
    x, truth = make_factor_analysis_data(n, d, k, seed=seed)
    model = BayesianFactorAnalysis(BayesianFAConfig(d, k))
    model.init_from_data(x)
    return model, x, truth


def _theta(d: int, k: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W": torch.randn(d, k, generator=g), "mu": torch.randn(d, generator=g),
            "psi": 0.3 + torch.rand(d, generator=g)}


def test_collapsed_likelihood_is_the_closed_form_and_the_uncollapsed_model() -> None:
    """log p(x_n|θ) three ways at a generic θ (float64): the model's Pyro site, log N(x; μ, WWᵀ + Ψ) by a dense
    Cholesky, and the uncollapsed model: exactly, log p(x, z|θ) − log p(z|x, θ) for any z, and by Monte Carlo,
    log (1/S) Σ_s p(x | z_s, θ) with z_s ~ N(0, I)."""
    model, x, _ = _model(n=8, d=4, k=2)
    theta = _theta(4, 2)
    dense = torch.distributions.MultivariateNormal(theta["mu"], covariance(theta)).log_prob(x)
    torch.testing.assert_close(model.log_likelihood_at(x, theta), dense, rtol=0, atol=1e-10)
    with local_params(model), torch.no_grad():
        tr = poutine.trace(poutine.condition(model, data=theta)).get_trace(x)
    torch.testing.assert_close(tr.nodes["x"]["fn"].log_prob(x), dense, rtol=0, atol=1e-10)

    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    identity = model.log_joint_at(x, z, theta) - model.posterior_z_at(x, theta).log_prob(z)
    torch.testing.assert_close(identity, dense, rtol=0, atol=1e-10)

    s = 100_000
    zs = torch.randn(s, 1, 2, generator=torch.Generator().manual_seed(3))
    loc = theta["mu"] + zs @ theta["W"].T  # (S, 1, D) against x (N, D)
    lik = torch.distributions.Normal(loc, theta["psi"].sqrt()).log_prob(x).sum(-1)  # (S, N): log p(x_n | z_s, θ)
    w = torch.exp(lik - dense)  # p(x|z_s)/p(x): mean 1
    estimate = torch.log(w.mean(0))
    se = w.std(0) / math.sqrt(s)  # standard error of the mean of w, ~ that of the log estimate (mean 1)
    assert ((estimate).abs() < 5 * se).all(), (estimate, se)  # 5 standard errors: a false alarm is ~1e-6 per point


def test_rotations_leave_the_likelihood_and_prior_unchanged_and_the_quotient_adds_its_jacobian() -> None:
    """W R for an orthogonal R gives the same log p(x|θ) and prior; the rotation quotient's canonical W̃ is in W's
    orbit (same WWᵀ) with its anchor rows lower triangular; its log density is the model's at W = W̃ plus
    Σ_i (k − i) log W̃_{a_i i} (i = 1..k) and k log 2 (half-normals on the diagonal)."""
    model, x, _ = _model(n=30, d=5, k=3)
    theta = _theta(5, 3)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(4)))
    turned = {**theta, "W": theta["W"] @ q}
    torch.testing.assert_close(model.log_likelihood_at(x, turned), model.log_likelihood_at(x, theta), rtol=0,
                               atol=1e-10)
    prior = model.priors()["W"]
    torch.testing.assert_close(prior.log_prob(turned["W"]), prior.log_prob(theta["W"]), rtol=0, atol=1e-10)

    target = RotationQuotient(model, start=theta)
    tilde = target.canonical(theta["W"])
    torch.testing.assert_close(tilde @ tilde.T, theta["W"] @ theta["W"].T, rtol=0, atol=1e-10)
    top = tilde[target.anchors]
    assert torch.all(top.triu(1).abs() < 1e-12) and torch.all(top.diagonal() > 0)
    sites = {k: target.initial_values[k] for k in target.sites}
    torch.testing.assert_close(target.assemble(sites["W_free"], sites["W_diag"]), tilde, rtol=0, atol=1e-12)
    with local_params(model), torch.no_grad():
        quotient = poutine.trace(poutine.condition(target, data=sites)).get_trace(x).log_prob_sum()
        original = poutine.trace(poutine.condition(model, data={**theta, "W": tilde})).get_trace(x).log_prob_sum()
    jacobian = sum((3 - 1 - i) * math.log(sites["W_diag"][i]) for i in range(3))
    # the model's density at W̃ includes its fixed zeros (above the anchors' diagonal), which the quotient does not
    zeros = ~(target.free_mask | target.diag_mask)
    sd = (model.config.loading_prior_scale * model.data_scale).unsqueeze(-1).expand(5, 3)[zeros]
    at_zero = torch.distributions.Normal(0.0, sd).log_prob(torch.zeros_like(sd)).sum().item()
    assert quotient.item() == pytest.approx(original.item() - at_zero + jacobian + 3 * math.log(2), abs=1e-8)


def test_the_quotient_jacobian_matches_the_prior_pushed_through_the_canonical_form() -> None:
    """Under the prior (no data) W has iid N(0, s_d²) entries; its canonical form's anchor diagonal W̃_{a_i i} is
    then s_{a_i} χ_{k−i+1}, which is what the quotient's density half-normal × W̃^{k−i} is: a Kolmogorov-Smirnov
    test of 20,000 prior draws per diagonal entry (each p > 0.001; the draws are seeded)."""
    model, _, _ = _model(n=30, d=5, k=3)
    target = RotationQuotient(model)
    prior = model.priors()["W"]
    with seeded(5):
        draws = prior.sample((20_000,))
    tilde = target.canonical(draws)
    scale = model.config.loading_prior_scale * model.data_scale
    for i, a in enumerate(target.anchors):
        values = (tilde[:, a, i] / scale[a]).numpy()
        assert stats.kstest(values, stats.chi(3 - i).cdf).pvalue > 1e-3, i


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")  # an unfitted q(θ): some k̂ are high
def test_psis_loo_on_the_inference_data_of_a_guide() -> None:
    """``to_inference_data`` of a Bayesian FA and a mean-field q(θ) (at its start, the PPCA solution with sds 0.1:
    fitting is the contract test's business): log_likelihood = log p(x_n | θ_s) at the exported draws of the global
    latents, so ``az.loo`` is PSIS-LOO over q(θ); the evaluator's columns: elbo = E_q log p(x|θ) and the predictive
    log E_q p(x|θ) ≥ it (Jensen, per point)."""
    model, x, _ = _model(n=60, d=3, k=1)
    with seeded(0):
        guide = build_guide("meanfield", model)
    idata = to_inference_data(model, guide, x, num_samples=100, seed=0)
    loo = az.loo(idata, pointwise=True)
    assert math.isfinite(loo.elpd_loo) and loo.pareto_k.shape == (60,)
    post = idata.posterior
    for s in (0, 57):
        theta = {k: torch.as_tensor(post[k].values[0, s]) for k in ("W", "mu", "psi")}
        torch.testing.assert_close(model.log_likelihood_at(x, theta),
                                   torch.as_tensor(idata.log_likelihood["x"].values[0, s]), rtol=0, atol=1e-8)
        torch.testing.assert_close(covariance(theta), torch.as_tensor(post["cov"].values[0, s]), rtol=0, atol=1e-12)
    log_w = idata.sample_stats["log_p"].values - idata.sample_stats["log_q"].values  # = log p(x_n|θ_s), z exact
    np.testing.assert_allclose(log_w, idata.log_likelihood["x"].values, atol=1e-8)
    scores = evaluate(model, guide, x, posterior_samples=50, seed=0)
    pp = scores["per_point"]
    assert scores["elbo"] == pytest.approx(scores["expected_log_likelihood"])
    assert scores["predictive_log_likelihood"] >= scores["elbo"]
    assert torch.equal(pp["elbo"], pp["iwae"])
