"""The training objectives of ``pyro_lvm.objectives``: the per-point IWAE bound, its DReG gradients, and Pyro's
``RenyiELBO(alpha=0)`` beside them."""

from __future__ import annotations

import math

import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from pyro_lvm import fit
from pyro_lvm.config import ConfigError
from pyro_lvm.evaluate import per_point_bounds
from pyro_lvm.guides import build_guide
from pyro_lvm.models import VAE, FactorAnalysis, GaussianMixture
from pyro_lvm.objectives import IWAELoss, parse_objective
from pyro_lvm.runtime import local_params, seeded
from pyro_lvm.train import AnnealLatents, TrainConfig


def _fa(float64: None) -> tuple[FactorAnalysis, torch.nn.Module, torch.Tensor]:
    model, x = FactorAnalysis.example()
    guide = build_guide("amortized", model)
    with local_params(model, guide):
        guide(x)
    return model, guide, x


def test_iwae_loss_is_the_evaluators_per_point_bound(float64: None) -> None:
    """Same seed, same draws: −loss = Σ_n IWAE-K_n (the evaluator's), rescaled by N/B for a minibatch; K = 1 is
    Trace_ELBO's loss. Equal to float64 rounding: the two code paths share only the guide's draws."""
    model, guide, x = _fa(float64)
    with local_params(model, guide):
        for k in (1, 7):
            for points, total in ((32, None), (3, 30)):
                with seeded(0):
                    loss = IWAELoss(k).differentiable_loss(model, guide, x[:points], total_size=total)
                with seeded(0):
                    iwae = per_point_bounds(model, guide, x[:points], k)["iwae"]
                scale = (total or points) / points
                assert loss.item() == pytest.approx(-scale * iwae.sum().item(), rel=1e-12)
        with seeded(0):
            elbo = Trace_ELBO().differentiable_loss(model, guide, x)
        with seeded(0):
            assert IWAELoss(1).differentiable_loss(model, guide, x).item() == pytest.approx(elbo.item(), rel=1e-12)


def test_renyi_alpha0_is_the_bound_on_a_full_batch_and_inflates_it_under_minibatching(float64: None) -> None:
    """Pyro's RenyiELBO(alpha=0) keeps the independent data plate out of its log-mean-exp, so on the full data it
    equals IWAE-K; on a minibatch it raises the weights to the power N/B inside: Σ_n log (1/K) Σ_k w^{N/B}, which by
    the power-mean inequality exceeds the rescaled bound (N/B) Σ_n log (1/K) Σ_k w (here by tens of nats)."""
    model, guide, x = _fa(float64)
    renyi = RenyiELBO(alpha=0, num_particles=7, vectorize_particles=True, max_plate_nesting=1)
    ours = IWAELoss(7)
    with local_params(model, guide):
        with seeded(0):
            full_renyi = renyi.loss(model, guide, x)
        with seeded(0):
            full_ours = ours.loss(model, guide, x)
        assert full_renyi == pytest.approx(full_ours, rel=1e-12)
        for points in (1, 3):
            with seeded(1):
                log_w, _, scale = ours.log_weights(model, guide, x[:points], total_size=30)
            with seeded(1):
                mini_renyi = renyi.loss(model, guide, x[:points], total_size=30)
            powered = -(torch.logsumexp(scale * log_w, 0) - math.log(7)).sum().item()
            rescaled = -scale * (torch.logsumexp(log_w, 0) - math.log(7)).sum().item()
            assert mini_renyi == pytest.approx(powered, rel=1e-12)  # what Pyro computes, term by term
            assert rescaled - mini_renyi > 1.0  # a looser loss: an inflated bound, not 𝓛_K


def _directional(loss: torch.Tensor, params: list[torch.Tensor], v: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params)
    return sum((g * d).sum() for g, d in zip(grads, v, strict=True)).item()


def test_iwae_and_dreg_guide_gradients_are_unbiased_for_the_bounds_gradient(float64: None) -> None:
    """On factor analysis with the model fixed: the directional derivative of 𝓛_K (K = 5) along a random direction of
    the guide's parameters, by central differences of the *evaluator's* IWAE-K over 2,000 replicate copies of the
    data with common random numbers, against the mean of 40 independent single-copy gradients of each training loss.
    Both must agree within 4 standard errors of that mean (the reference's own error, from 2,000 copies, is ~7x
    smaller). DReG's model gradient is IWAE's exactly, draw by draw (same seed, float64)."""
    model, guide, x = _fa(float64)
    params = [p for p in guide.parameters()]
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    with local_params(model, guide):
        copies, h = x.repeat(2000, 1), 1e-4

        def bound_at(t: float) -> float:
            with torch.no_grad():
                for p, d in zip(params, v, strict=True):
                    p.add_(t * d)
            with seeded(11):
                value = per_point_bounds(model, guide, copies, 5, 10**6)["iwae"].sum().item() / 2000
            with torch.no_grad():
                for p, d in zip(params, v, strict=True):
                    p.sub_(t * d)
            return value

        reference = -(bound_at(h) - bound_at(-h)) / (2 * h)  # d(loss)/dt along v
        for dreg in (False, True):
            loss = IWAELoss(5, dreg=dreg)
            draws = []
            for seed in range(40):
                with seeded(100 + seed):
                    draws.append(_directional(loss.differentiable_loss(model, guide, x), params, v))
            est = torch.tensor(draws)
            se = est.std().item() / math.sqrt(len(draws))
            assert abs(est.mean().item() - reference) < 4 * se, (dreg, est.mean().item(), reference, se)
        # under KL warm-up (β = 0.5 on log p(z) and log q(z|x)) DReG must stay unbiased for the tempered bound,
        # whose pathwise gradient is the plain IWAE estimator's: the two means agree within 4 combined errors
        # (each draw averages 200 replicate copies of the data, so that a bias of the size the wrong weighting
        # w̃² would leave shows: that weighting fails this check)
        means, errors = [], []
        many = x.repeat(200, 1)
        for dreg in (False, True):
            loss = IWAELoss(5, dreg=dreg)
            draws = []
            for seed in range(12):
                with seeded(300 + seed), AnnealLatents({"z"}, 0.5):
                    draws.append(_directional(loss.differentiable_loss(model, guide, many), params, v) / 200)
            est = torch.tensor(draws)
            means.append(est.mean().item())
            errors.append(est.std().item() / math.sqrt(len(draws)))
        assert abs(means[0] - means[1]) < 4 * math.hypot(*errors), (means, errors)
        model_params = list(model.parameters())
        for seed in range(3):
            grads = []
            for dreg in (False, True):
                with seeded(seed):
                    grads.append(torch.autograd.grad(IWAELoss(5, dreg=dreg).differentiable_loss(model, guide, x),
                                                     model_params))
            for a, b in zip(*grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fit_trains_the_iwae_objectives_and_refuses_combinations_that_would_train_another(float64: None) -> None:
    model, x = VAE.example()
    for objective in ("iwae:3", "iwae-dreg:3"):
        m, _ = VAE.example()
        guide = build_guide("amortized", m)
        result = fit(m, guide, x, x, TrainConfig(epochs=2, batch_size=8, seed=0, objective=objective, quiet=True,
                                                restore_best=False))
        assert result.elbo == objective and all(math.isfinite(r["train_loss"]) for r in result.history)
        # validated, and its best state chosen, on the bound it trains: IWAE-K with its own K
        assert result.monitor == "valid_iwae" and all("valid_iwae" in r for r in result.history)
    refused = [
        (model, "amortized", {"objective": "iwae:3", "elbo": "meanfield"}, "leave elbo unset"),
        (model, "amortized", {"objective": "iwae:3", "num_particles": 2}, "num_particles"),
        (model, "planar:2", {"objective": "iwae-dreg:3"}, "cannot"),
        (model, "sylvester-o:2", {"objective": "iwae-dreg:3"}, "cannot"),
    ]
    gm, gx = GaussianMixture.example()
    refused.append((gm, "map", {"objective": "iwae:3"}, "per-point bound"))
    for m, spec, settings, words in refused:
        guide = build_guide(spec, m)
        with pytest.raises(ConfigError, match=words) as e:
            fit(m, guide, gx if m is gm else x, config=TrainConfig(epochs=1, quiet=True, **settings))
        assert e.value.field == "objective"
    for bad in ("iwae:0", "iwae:x", "elbo:3", "renyi"):
        with pytest.raises(ConfigError, match="objective"):
            TrainConfig(objective=bad)
    with pytest.raises(ConfigError, match="JIT"):
        TrainConfig(objective="iwae:2", elbo="jit")
    assert parse_objective("iwae") == ("iwae", 5) and parse_objective(" iwae-dreg:8 ") == ("iwae-dreg", 8)
