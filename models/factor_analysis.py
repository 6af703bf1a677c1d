"""Factor analysis and probabilistic PCA as Pyro models."""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from pyro_lvm.config import check_config
from pyro_lvm.registry import register_model
from pyro_lvm.runtime import seeded

from .base import LatentModel, data_plate


@dataclass
class FactorAnalysisConfig:
    data_dim: int
    latent_dim: int
    #: lower bound on each noise variance; keeps Heywood cases (Ψ_i -> 0) from diverging
    min_noise: float = 1e-6
    #: standard deviation of the random initial W
    init_scale: float = 0.1

    def __post_init__(self) -> None:
        check_config(self, positive_int=("data_dim", "latent_dim"), positive=("min_noise", "init_scale"))
        if self.latent_dim > self.data_dim:
            raise ValueError(f"latent_dim: must be <= data_dim ({self.data_dim}), got {self.latent_dim}")


@register_model("factor_analysis")
class FactorAnalysis(LatentModel):
    r"""Factor analysis.

    .. math::
        z_n \sim \mathcal N(0, I_k), \qquad
        x_n \mid z_n \sim \mathcal N(\mu + W z_n, \Psi), \quad \Psi = \mathrm{diag}(\psi_1..\psi_D)

    so that :math:`x_n \sim \mathcal N(\mu, W W^\top + \Psi)` and
    :math:`p(z \mid x) = \mathcal N(G W^\top \Psi^{-1}(x - \mu), G)` with
    :math:`G = (I + W^\top \Psi^{-1} W)^{-1}`. ``W``, ``μ``, ``Ψ`` are point-estimated parameters.
    """

    Config = FactorAnalysisConfig
    has_exact_posterior = True

    def __init__(self, config: FactorAnalysisConfig) -> None:
        super().__init__()
        self.config = config
        self.data_dim, self.latent_dim = config.data_dim, config.latent_dim
        D, k = self.data_dim, self.latent_dim
        # W from its own generator, seeded by torch's current seed (``torch.initial_seed()``, which a seeded run
        # sets): a seed fixes W, and building the model leaves the random stream of what is built next (the
        # guide) as it was
        g = torch.Generator().manual_seed(torch.initial_seed())
        self.W = torch.nn.Parameter(config.init_scale * torch.randn(D, k, generator=g))
        self.mu = torch.nn.Parameter(torch.zeros(D))
        self._init_noise(torch.ones(D))

    @classmethod
    def example(cls, seed: int = 0) -> tuple[FactorAnalysis, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        W, mu = torch.randn(6, 2, generator=g), torch.randn(6, generator=g)
        x = mu + torch.randn(32, 2, generator=g) @ W.T + 0.5 * torch.randn(32, 6, generator=g)
        with seeded(seed):
            model = cls(FactorAnalysisConfig(6, 2))
        model.init_from_data(x)
        return model, x

    def _init_noise(self, var: torch.Tensor) -> None:
        self.psi = PyroParam(var.clamp_min(2 * self.config.min_noise),
                             constraint=constraints.greater_than(self.config.min_noise))

    @property
    def noise_variance(self) -> torch.Tensor:
        """Ψ as a vector of D variances."""
        return self.psi

    def init_from_data(self, x: object) -> None:
        """μ ← the data mean, Ψ ← half of each feature's variance (W keeps its random start)."""
        x = self.validate_training(x)
        with torch.no_grad():
            self.mu.copy_(x.mean(0))
            var = x.var(0) if len(x) > 1 else torch.ones_like(x[0])
            self._init_noise(var.to(self.W.dtype) / 2)

    def set_parameters(self, W: object, mu: object, noise_variance: object) -> None:
        """Set (W, μ, Ψ), e.g. to scikit-learn's EM solution (arrays or tensors of any float dtype)."""
        like = {"dtype": self.W.dtype, "device": self.W.device}
        W, mu = torch.as_tensor(W).to(**like), torch.as_tensor(mu).to(**like)
        noise = torch.as_tensor(noise_variance).to(**like)
        if W.shape != self.W.shape or mu.shape != self.mu.shape:
            raise ValueError(f"set_parameters: expected W of shape {tuple(self.W.shape)} and mu of shape "
                             f"{tuple(self.mu.shape)}, got {tuple(W.shape)} and {tuple(mu.shape)}")
        if not (noise > 0).all():
            raise ValueError("set_parameters: noise_variance must be > 0")
        with torch.no_grad():
            self.W.copy_(W)
            self.mu.copy_(mu)
            self._init_noise(noise.expand(self.data_dim))

    def rotate(self, R: torch.Tensor) -> None:
        """W ← W R for an orthogonal R: p(x) is unchanged (W R Rᵀ Wᵀ = W Wᵀ), p(z|x) is rotated."""
        R = torch.as_tensor(R).to(dtype=self.W.dtype, device=self.W.device)
        if R.shape != (self.latent_dim, self.latent_dim) or not torch.allclose(
                R.T @ R, torch.eye(self.latent_dim, dtype=R.dtype), atol=1e-8):
            raise ValueError(f"rotate: expected an orthogonal {self.latent_dim}x{self.latent_dim} matrix")
        with torch.no_grad():
            self.W.copy_(self.W @ R)

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        W, mu, sd = self.W, self.mu, self.noise_variance.sqrt()
        with data_plate(x.shape[0], total_size, x.device):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(mu[: self.latent_dim]), 1.0)
                            .expand([self.latent_dim]).to_event(1))
            loc = mu + z @ W.T  # (..., N, D)
            pyro.sample("x", dist.Normal(loc, sd).to_event(1), obs=x)

    def _sample(self, n: int, *, mean: bool, guide: object) -> torch.Tensor:
        z = torch.randn(n, self.latent_dim, dtype=self.W.dtype, device=self.W.device)
        loc = self.mu + z @ self.W.T
        return loc if mean else loc + self.noise_variance.sqrt() * torch.randn_like(loc)

    def marginal(self) -> dist.LowRankMultivariateNormal:
        """p(x) = N(μ, W Wᵀ + Ψ)."""
        return dist.LowRankMultivariateNormal(self.mu, self.W, self.noise_variance)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return self.marginal().log_prob(x)

    def posterior_precision(self) -> torch.Tensor:
        """G⁻¹ = I + Wᵀ Ψ⁻¹ W, shared by every data point."""
        W = self.W
        return torch.eye(self.latent_dim, dtype=W.dtype, device=W.device) + (W.T / self.noise_variance) @ W

    def posterior_covariance(self) -> torch.Tensor:
        """G = (I + Wᵀ Ψ⁻¹ W)⁻¹."""
        return torch.cholesky_inverse(torch.linalg.cholesky(self.posterior_precision()))

    def exact_posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        G = self.posterior_covariance()
        mean = ((x - self.mu) / self.noise_variance) @ self.W @ G  # (N, k)
        # one k x k Cholesky factor broadcast over points, not one per point
        return dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(G))

    def mean_field_gap(self) -> float:
        """KL(q* || p(z|x)) for the best diagonal Gaussian q*, the same for every x (nats per point).

        For a Gaussian posterior N(m, G) the optimal fully factorised Gaussian has precisions
        diag(G⁻¹), leaving KL = ½ Σᵢ log (G⁻¹)ᵢᵢ + ½ log det G.
        """
        with torch.no_grad():
            precision = self.posterior_precision().double()
            return float(0.5 * precision.diagonal().log().sum() - 0.5 * torch.logdet(precision))


@register_model("ppca")
class PPCA(FactorAnalysis):
    r"""Probabilistic PCA: factor analysis with isotropic noise, :math:`\Psi = \sigma^2 I`.

    .. math:: z_n \sim \mathcal N(0, I_k), \qquad x_n \mid z_n \sim \mathcal N(\mu + W z_n, \sigma^2 I)
    """

    def _init_noise(self, var: torch.Tensor) -> None:
        self.sigma2 = PyroParam(var.mean().clamp_min(2 * self.config.min_noise).reshape(()),
                                constraint=constraints.greater_than(self.config.min_noise))

    @property
    def noise_variance(self) -> torch.Tensor:
        return self.sigma2.expand(self.data_dim)

    def mle(self, x: object) -> None:
        """Set the closed-form maximum-likelihood solution (Tipping & Bishop 1999)."""
        x = self.validate_training(x)
        with torch.no_grad():
            mu = x.mean(0)
            cov = torch.cov((x - mu).T, correction=0)
            evals, evecs = torch.linalg.eigh(cov)
            evals, evecs = evals.flip(0), evecs.flip(1)
            k = self.latent_dim
            sigma2 = evals[k:].mean() if k < self.data_dim else evals.new_tensor(self.config.min_noise)
            W = evecs[:, :k] * (evals[:k] - sigma2).clamp_min(0).sqrt()
            self.set_parameters(W, mu, sigma2)

