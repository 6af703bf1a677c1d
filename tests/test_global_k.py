"""``pyro_lvm.evaluate.global_pareto_k``: the Pareto k̂ of q(θ) over a model's global latents.

A conjugate toy whose posterior over θ is exactly Gaussian gives the reference points: the exact posterior as the
guide makes every weight equal (k̂ = −inf, ESS = S, and the ELBO of the weights is log p(x) itself); a fitted
full-rank Gaussian leaves k̂ low; the same guide narrowed leaves it high. On the Gaussian mixture the weights
sum the assignments out whichever way the model treats them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate

from pyro_lvm.evaluate import MIN_PSIS_SAMPLES, global_log_weights, global_pareto_k
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import GaussianMixture, GaussianMixtureConfig
from pyro_lvm.models.base import LatentModel, data_plate
from pyro_lvm.models.gaussian_mixture import make_mixture_data
from pyro_lvm.runtime import default_dtype, local_params, seeded
from pyro_lvm.saving import materialize

pytestmark = pytest.mark.usefixtures("float64")


class ConjugateGaussian(LatentModel):
    r"""θ ~ N(0, I₂), x_n | θ ~ N(A θ, I₂): p(θ | x) = N(Λ⁻¹ Aᵀ Σ_n x_n, Λ⁻¹), Λ = I + N AᵀA, exactly Gaussian,
    and log p(x) = log N(vec x; 0, I + B Bᵀ), B = 1_N ⊗ A. A mixes the coordinates, so the posterior is correlated."""

    local_site = None
    global_sites = ("theta",)

    def __init__(self) -> None:
        super().__init__()
        self.config = None
        self.data_dim = self.latent_dim = 2
        self.register_buffer("A", torch.tensor([[1.0, 0.0], [0.9, 0.5]]))

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        theta = pyro.sample("theta", dist.Normal(self.A.new_zeros(2), 1.0).to_event(1))
        with data_plate(x.shape[0], total_size, x.device):
            pyro.sample("x", dist.Normal(theta @ self.A.T, 1.0).to_event(1), obs=x)

    def exact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(posterior mean, posterior covariance, log p(x))."""
        cov = torch.linalg.inv(torch.eye(2) + len(x) * self.A.T @ self.A)
        b = self.A.repeat(len(x), 1)  # (2N, 2): vec x = B θ + ε
        evidence = dist.MultivariateNormal(torch.zeros(2 * len(x)), torch.eye(2 * len(x)) + b @ b.T)
        return cov @ self.A.T @ x.sum(0), cov, evidence.log_prob(x.reshape(-1)).item()


def _set_gaussian(guide: object, loc: torch.Tensor, cov: torch.Tensor) -> None:
    """Write N(loc, cov) into a ``fullrank`` guide: AutoMultivariateNormal's scale_tril is diag(scale) @ L, L unit
    lower-triangular."""
    q = guide.globals  # type: ignore[attr-defined]
    chol = torch.linalg.cholesky(cov)
    with local_params(guide), torch.no_grad():
        q.loc.copy_(loc)
        q.scale = chol.diagonal()
        q.scale_tril = chol / chol.diagonal()[:, None]


@pytest.fixture(scope="module")
def conjugate() -> Iterator[tuple[ConjugateGaussian, torch.Tensor, object]]:
    """50 points from the toy and a ``fullrank`` guide fitted to them: started at the least-squares θ̂ (as the
    mixture's guides start at k-means++), 80 Adam steps of a 16-particle Trace_ELBO, the step size decaying from
    0.05 to 0.0025 (the posterior is 2-D, so this fit is close to exact: ESS ~990 of 1000)."""
    with default_dtype(torch.float64):
        model = ConjugateGaussian()
        g = torch.Generator().manual_seed(0)
        x = torch.tensor([1.0, -0.5]) @ model.A.T + torch.randn(50, 2, generator=g)
        model.initial_values = {"theta": torch.linalg.solve(model.A, x.mean(0))}
        guide = build_guide("fullrank", model)
        elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
        with local_params(model, guide), seeded(0):
            elbo.differentiable_loss(model, guide, x)  # builds the autoguide's parameters
            optim = torch.optim.Adam(guide.parameters(), lr=0.05)
            decay = torch.optim.lr_scheduler.ExponentialLR(optim, 0.05 ** (1 / 80))
            for _ in range(80):
                optim.zero_grad()
                elbo.differentiable_loss(model, guide, x).backward()
                optim.step()
                decay.step()
        yield model, x, guide


def test_the_exact_posterior_gives_equal_weights_and_the_evidence(conjugate: tuple) -> None:
    """q(θ) = p(θ|x) makes every log w_s = log p(x): k̂ = −inf (constant weights), ESS = S, and the ELBO and IWAE
    of the weights equal the closed-form log p(x) to rounding (float64; 1e-9 of ~150 nats)."""
    model, x, _ = conjugate
    guide = build_guide("fullrank", model)
    materialize(model, guide)
    loc, cov, log_px = model.exact(x)
    _set_gaussian(guide, loc, cov)
    r = global_pareto_k(model, guide, x, num_samples=200, seed=0)
    assert r["pareto_k_theta"] == -math.inf and r["ess_theta"] == pytest.approx(200, rel=1e-12)
    assert r["elbo_theta"] == pytest.approx(log_px, abs=1e-9) and r["iwae_theta"] == pytest.approx(log_px, abs=1e-9)
    assert r["num_samples"] == 200 and r["num_points"] == 50 and r["note"] is None


def test_a_fitted_fullrank_guide_has_low_k_and_a_narrowed_one_high_k(conjugate: tuple) -> None:
    """A Gaussian proposal c times as wide as a Gaussian target gives weights ∝ exp((1 − c²) |u|² / 2), u ~ N(0, I₂),
    an exact Pareto tail of shape k = 1 − c²: about 0 for the fitted guide (c ≈ 1; measured −0.2 to 0.3 over
    evaluation seeds), 0.75 at c = 0.5. One k̂ from S = 1000 draws has a standard deviation of ~0.18 at k = 0.75
    (measured over 10 seeds), so the narrowed guide's k̂ is averaged over 4 seeds (sd ~0.09) and must lie within
    0.75 ± 0.25, well above the fitted guide's < 0.5; its ESS collapses with it."""
    model, x, guide = conjugate
    fitted = global_pareto_k(model, guide, x, num_samples=1000, seed=0)
    assert fitted["pareto_k_theta"] < 0.5 and fitted["ess_theta"] > 0.9 * 1000, fitted
    q = guide.globals
    with local_params(guide):
        scale = q.scale.detach().clone()
    try:
        with local_params(guide):
            q.scale = 0.5 * scale
        narrowed = [global_pareto_k(model, guide, x, num_samples=1000, seed=s) for s in range(4)]
    finally:
        with local_params(guide):
            q.scale = scale
    mean_k = sum(r["pareto_k_theta"] for r in narrowed) / len(narrowed)
    assert 0.5 < mean_k < 1.0 and mean_k > fitted["pareto_k_theta"] + 0.3, [r["pareto_k_theta"] for r in narrowed]
    assert max(r["ess_theta"] for r in narrowed) < 0.5 * fitted["ess_theta"]
    # narrowing moved q(θ) away from p(θ|x): the estimated KL lower bound (IWAE − ELBO) grows
    assert narrowed[0]["iwae_theta"] - narrowed[0]["elbo_theta"] > fitted["iwae_theta"] - fitted["elbo_theta"]


def test_seeds_bad_sample_counts_point_masses_and_no_side_effects(conjugate: tuple) -> None:
    model, x, guide = conjugate
    with pytest.raises(ValueError, match=f"num_samples: must be an integer >= {MIN_PSIS_SAMPLES}"):
        global_pareto_k(model, guide, x, num_samples=MIN_PSIS_SAMPLES - 1)
    state = torch.get_rng_state()
    a, b = (global_pareto_k(model, guide, x, num_samples=50, seed=3) for _ in range(2))
    assert a == b and torch.equal(state, torch.get_rng_state()) and model.training and guide.training
    point = global_pareto_k(model, build_guide("map", model), x, num_samples=50)
    assert point["pareto_k_theta"] is None and point["ess_theta"] is None and "point mass" in point["note"]


def test_mixture_weights_sum_the_assignments_out_under_every_scheme() -> None:
    """The same q(θ) and seed give the same log-weights whether c is collapsed, enumerated or proposed by an
    amortized q(c|x) (which the weights ignore: c is enumerated in the model); one draw equals −TraceEnum_ELBO
    with the globals' guide alone (1e-9 of ~400 nats, float64)."""
    x, _ = make_mixture_data(60, 2, 2, seed=1)
    weights = {}
    for scheme in ("collapsed", "enumerated", "amortized"):
        model = GaussianMixture(GaussianMixtureConfig(2, 2, "full", scheme))
        model.init_from_data(x, seed=0)
        guide = build_guide("fullrank", model, GuideConfig(hidden=(4,)))
        materialize(model, guide)  # the k-means++ start: the same parameters under every scheme
        with local_params(model, guide), seeded(0):
            weights[scheme] = global_log_weights(model, guide, x, 30)
        with local_params(model, guide), seeded(1):
            one = global_log_weights(model, guide, x, 1)
        with local_params(model, guide), seeded(1), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "TraceEnum_ELBO found no sample sites")  # collapsed: nothing to sum
            loss = TraceEnum_ELBO(max_plate_nesting=1).loss(config_enumerate(model, "parallel"), guide.globals, x)
        assert one.item() == pytest.approx(-loss, abs=1e-9), scheme
    torch.testing.assert_close(weights["enumerated"], weights["collapsed"], rtol=0, atol=1e-9)
    torch.testing.assert_close(weights["amortized"], weights["collapsed"], rtol=0, atol=1e-9)
