"""Issue 22: the Pareto k̂ of per-point importance weights must not depend on the dtype.

With the exact guide q(z|x) = p(z|x) every log-weight log p(x, z) − log q(z|x) equals log p(x): k̂ = −inf in
float64, and float32 rounding of the terms must not be fitted as a Pareto tail (it was: pareto_k_mean = inf).
Guides that do miss posterior mass must keep their finite, large k̂ in both dtypes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_lvm import build_guide, evaluate
from pyro_lvm.evaluate import PARETO_K_THRESHOLD, global_pareto_k, psis
from pyro_lvm.guides import GuideConfig
from pyro_lvm.models import FactorAnalysis, FactorAnalysisConfig
from pyro_lvm.runtime import default_dtype, seeded

FRAC = f"pareto_k_frac_above_{PARETO_K_THRESHOLD}"
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def diabetes() -> np.ndarray:
    """scikit-learn's diabetes data (442 x 10), standardized."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x = sklearn_datasets.load_diabetes().data
    return (x - x.mean(0)) / x.std(0)


def _fa(x: np.ndarray, latent_dim: int = 2) -> FactorAnalysis:
    """Factor analysis at scikit-learn's EM solution, in torch's current default dtype."""
    decomposition = pytest.importorskip("sklearn.decomposition")
    fa = decomposition.FactorAnalysis(latent_dim, random_state=0).fit(x)
    with seeded(0):
        model = FactorAnalysis(FactorAnalysisConfig(x.shape[1], latent_dim))
    model.set_parameters(fa.components_.T, fa.mean_, fa.noise_variance_)
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_guide_on_diabetes_gets_constant_weights_in_either_dtype(diabetes: np.ndarray,
                                                                       dtype: torch.dtype) -> None:
    """Before the fix float32 gave k̂ = inf for some points (pareto_k_mean = inf), float64 −inf everywhere."""
    with default_dtype(dtype):
        model = _fa(diabetes)
        m = evaluate(model, build_guide("exact", model), diabetes, iwae_k=500, seed=0)
    k = m["per_point"]["pareto_k"]
    assert k.dtype == torch.float64 and k.shape == (len(diabetes),)
    assert torch.isneginf(k).all()
    assert m["pareto_k_mean"] == -math.inf and m["pareto_k_max"] == -math.inf and m[FRAC] == 0.0
    assert m["elbo"] == pytest.approx(m["exact_log_likelihood"], abs=1e-4)  # the weights are log p(x)
    assert m["per_point"]["elbo"].dtype == dtype  # bounds stay in the model's dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_fresh_amortized_guide_keeps_its_heavy_tails(diabetes: np.ndarray, dtype: torch.dtype) -> None:
    """An untrained encoder misses the posterior by hundreds of nats: finite k̂, most points above 0.7."""
    with default_dtype(dtype):
        model = _fa(diabetes)
        with seeded(0):
            guide = build_guide("amortized", model)
        m = evaluate(model, guide, diabetes, iwae_k=500, seed=0)
    k = m["per_point"]["pareto_k"]
    assert torch.isfinite(k).all()
    assert m[FRAC] > 0.5 and math.isfinite(m["pareto_k_mean"]) and m["pareto_k_mean"] > PARETO_K_THRESHOLD


def _diagonal_guide(model: FactorAnalysis, scale: float) -> object:
    """A linear diagonal-Gaussian encoder with the posterior's mean and ``scale`` times the best diagonal's sds."""
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    with torch.no_grad():
        G = model.posterior_covariance()
        A = G @ (model.W.T / model.noise_variance)  # posterior mean = A (x − μ)
        guide.loc.weight.copy_(A)
        guide.loc.bias.copy_(-A @ model.mu)
        sd = scale * model.posterior_precision().diagonal().rsqrt() - 1e-6  # the head adds 1e-6
        guide.scale.weight.zero_()
        guide.scale.bias.copy_(torch.log(torch.expm1(sd)))  # softplus⁻¹
    return guide


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_narrow_mean_field_guide_on_a_correlated_posterior_keeps_its_tails(diabetes: np.ndarray,
                                                                            dtype: torch.dtype) -> None:
    """W rotated so p(z|x) is correlated, q diagonal with half the best diagonal's sds: it misses the posterior's
    mass along the correlation, the weights are heavy-tailed (k̂ > 0.7), and no dtype calls them constant."""
    with default_dtype(dtype):
        model = _fa(diabetes)
        with torch.no_grad():
            _, eigvecs = torch.linalg.eigh(model.posterior_covariance())
        c = math.sqrt(0.5)
        model.rotate(eigvecs @ torch.tensor([[c, -c], [c, c]]))
        m = evaluate(model, _diagonal_guide(model, 0.5), diabetes, iwae_k=500, seed=0)
    k = m["per_point"]["pareto_k"]
    assert torch.isfinite(k).all()
    assert m[FRAC] > 0.5


def test_psis_calls_float32_rounding_of_the_terms_constant_but_not_a_real_spread() -> None:
    """Log-weights summed in float64 from float32 terms of size ~30: a spread of a few float32 ulps of the
    terms is rounding (k̂ = −inf) only when psis is told the terms' resolution and size; a spread of 0.1 nat is
    not, whatever it is told."""
    g = torch.Generator().manual_seed(0)
    eps32 = torch.finfo(torch.float32).eps
    base = torch.full((1000, 3), -12.5, dtype=torch.float64)
    noise = base + 50 * eps32 * 30 * torch.rand(1000, 3, generator=g, dtype=torch.float64)
    magnitude = torch.full((3,), 30.0, dtype=torch.float64)
    _, k_default = psis(noise)  # float64 input, no hint: float64's own rounding tolerance
    assert not torch.isneginf(k_default).any()
    _, k = psis(noise, magnitude=magnitude, resolution=eps32)
    assert torch.isneginf(k).all()
    real = base + 0.1 * torch.randn(1000, 3, generator=g, dtype=torch.float64) ** 2
    _, k_real = psis(real, magnitude=magnitude, resolution=eps32)
    assert torch.isfinite(k_real).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_weights_are_summed_in_float64(dtype: torch.dtype) -> None:
    """global_log_weights returns float64 whatever the model's dtype, and a Gaussian q(θ) far narrower than
    the posterior keeps a finite k̂ in float32 as in float64."""
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal

    from pyro_lvm.evaluate import global_log_weights
    from pyro_lvm.runtime import local_params

    with default_dtype(dtype):
        x = torch.linspace(-1.0, 1.0, 50)

        def model(x: torch.Tensor) -> None:
            import pyro

            theta = pyro.sample("theta", dist.Normal(torch.zeros(()), 1.0))
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("x", dist.Normal(theta, 1.0), obs=x)

        guide = AutoNormal(model, init_scale=0.01)
        with local_params(model, guide), seeded(0):
            lw = global_log_weights(model, guide, x, 50)
        assert lw.dtype == torch.float64 and lw.shape == (50,)
        out = global_pareto_k(model, guide, x, num_samples=200, seed=0)
    assert math.isfinite(out["pareto_k_theta"])
