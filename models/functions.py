r"""Example Pyro model functions for :func:`pyro_lvm.wrap_model`: ordinary Pyro, nothing of the suite's inside.

Each takes the data x (points × features) and puts its per-point sites in ``pyro.plate("data", len(x))``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

#: latent dimension of the examples
K = 2


def poisson_pca(x: torch.Tensor) -> None:
    r"""Poisson PCA with a per-point size factor, for counts.

    z_n ~ N(0, I_K), s_n ~ LogNormal(0, 1), x_nd | z_n, s_n ~ Poisson(s_n exp(b_d + (z_n W)_d)); W, b point
    estimates. Two local sites of different supports (real vector, positive scalar).
    """
    d = x.shape[-1]
    W = pyro.param("W", lambda: 0.1 * torch.randn(K, d))
    b = pyro.param("b", lambda: torch.zeros(d))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        rate = s.unsqueeze(-1) * (b + z @ W).exp()
        pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)


def factor_analysis(x: torch.Tensor) -> None:
    r"""Factor analysis: z_n ~ N(0, I_K), x_n | z_n ~ N(μ + z_n W, diag ψ); W, μ, ψ point estimates."""
    d = x.shape[-1]
    W = pyro.param("W", lambda: 0.1 * torch.randn(K, d))
    mu = pyro.param("mu", lambda: torch.zeros(d))
    psi = pyro.param("psi", lambda: torch.ones(d), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
        pyro.sample("x", dist.Normal(mu + z @ W, psi.sqrt()).to_event(1), obs=x)


def factor_analysis_log_likelihood(x: torch.Tensor, W: torch.Tensor, mu: torch.Tensor,
                                   psi: torch.Tensor) -> torch.Tensor:
    r"""The exact log p(x_n) of :func:`factor_analysis`: N(x_n; μ, WᵀW + diag ψ), per point (``log_likelihood=``)."""
    cov = W.T @ W + torch.diag(psi)
    return dist.MultivariateNormal(mu, covariance_matrix=cov).log_prob(x)


#: clusters of :func:`latent_clusters`
CLUSTERS = 3


def latent_clusters(x: torch.Tensor) -> None:
    r"""Factor analysis whose factors come from a mixture: a discrete local site, summed out.

    c_n ~ Categorical(π),   z_n | c_n ~ N(m_{c_n}, I_K),   x_n | z_n ~ N(μ + z_n W, diag ψ);
    π, m, W, μ, ψ point estimates. The cluster c_n is marked ``infer={"enumerate": "parallel"}``: the wrapped
    model sums it out exactly, and the guide is q(z_n | x_n) alone (see :func:`latent_clusters_log_likelihood`
    for the exact log p(x_n)).
    """
    from pyro.ops.indexing import Vindex

    d = x.shape[-1]
    weights = pyro.param("weights", lambda: torch.full((CLUSTERS,), 1.0 / CLUSTERS),
                         constraint=dist.constraints.simplex)
    m = pyro.param("m", lambda: 2.0 * torch.randn(CLUSTERS, K))
    W = pyro.param("W", lambda: 0.5 * torch.randn(K, d))
    mu = pyro.param("mu", lambda: torch.zeros(d))
    psi = pyro.param("psi", lambda: torch.ones(d), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(Vindex(m)[..., c, :], 1.0).to_event(1))
        pyro.sample("x", dist.Normal(mu + z @ W, psi.sqrt()).to_event(1), obs=x)


def latent_clusters_log_likelihood(x: torch.Tensor, weights: torch.Tensor, m: torch.Tensor, W: torch.Tensor,
                                   mu: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    r"""The exact log p(x_n) of :func:`latent_clusters`: log Σ_c π_c N(x_n; μ + m_c W, WᵀW + diag ψ)."""
    cov = W.T @ W + torch.diag(psi)
    per_cluster = dist.MultivariateNormal(mu + m @ W, covariance_matrix=cov).log_prob(x.unsqueeze(-2))  # (N, C)
    return (per_cluster + weights.log()).logsumexp(-1)


def topic_weights(x: torch.Tensor) -> None:
    r"""A simplex per point: θ_n ~ Dir(1), x_n | θ_n ~ N(θ_n B, 1); B point estimate (K + 1 topics)."""
    d = x.shape[-1]
    B = pyro.param("B", lambda: torch.randn(K + 1, d))
    with pyro.plate("data", len(x)):
        theta = pyro.sample("theta", dist.Dirichlet(torch.ones(K + 1)))
        pyro.sample("x", dist.Normal(theta @ B, 1.0).to_event(1), obs=x)


def robust_factor_analysis(x: torch.Tensor) -> None:
    r"""Student-t factor analysis as a Gamma-scaled Gaussian: z_n ~ N(0, I_K), w_n ~ Gamma(ν/2, ν/2),
    x_n | z_n, w_n ~ N(μ + z_n W, σ²/w_n); ν = 4; W, μ, σ point estimates."""
    d = x.shape[-1]
    W = pyro.param("W", lambda: 0.1 * torch.randn(K, d))
    mu = pyro.param("mu", lambda: torch.zeros(d))
    sigma = pyro.param("sigma", lambda: torch.ones(()), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
        w = pyro.sample("w", dist.Gamma(2.0, 2.0))
        pyro.sample("x", dist.Normal(mu + z @ W, sigma / w.sqrt().unsqueeze(-1)).to_event(1), obs=x)


def bayesian_pca(x: torch.Tensor) -> None:
    r"""PCA with a prior on the loadings (global latents beside per-point ones): W_kd ~ N(0, 1) and a noise scale
    σ ~ LogNormal(0, 1) shared by every point; z_n ~ N(0, I_K), x_n | z_n, W, σ ~ N(μ + z_n W, σ² I); μ a point
    estimate. Guided by a pair, e.g. ``amortized+meanfield``."""
    d = x.shape[-1]
    mu = pyro.param("mu", lambda: torch.zeros(d))
    with pyro.plate("rows", K, dim=-2), pyro.plate("columns", d, dim=-1):
        W = pyro.sample("W", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
        pyro.sample("x", dist.Normal(mu + z @ W, sigma.unsqueeze(-1)).to_event(1), obs=x)


def shifted_normal(x: torch.Tensor) -> None:
    r"""The smallest model with both kinds of latent, and a closed form: τ ~ N(0, 1) global, z_n ~ N(0, I) per
    point, x_n | z_n, τ ~ N(z_n + τ, I); so log p(x_n | τ) = Σ_d log N(x_nd; τ, 2)."""
    d = x.shape[-1]
    tau = pyro.sample("tau", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        pyro.sample("x", dist.Normal(z + tau.unsqueeze(-1), 1.0).to_event(1), obs=x)


class TwoLayerVAE(PyroModule):
    r"""A VAE with two stochastic layers (Sønderby et al. 2016; the HVAE of Tomczak & Welling 2018), for binary
    data such as binarized MNIST:

        z₂ ~ N(0, I),   z₁ | z₂ ~ N(μ(z₂), diag σ²(z₂)),   x | z₁ ~ Bernoulli(π(z₁))

    with p(z₁|z₂) and p(x|z₁) MLPs (the decoder's weights are point estimates, owned by the wrapped model). Two local
    sites, so the amortized guides are one q(z₁, z₂ | x) over both, correlations included.

        model = pyro_lvm.wrap_model(TwoLayerVAE(data_dim=784), data_dim=784)
    """

    def __init__(self, data_dim: int = 784, z1: int = 40, z2: int = 20, hidden: int = 300) -> None:
        super().__init__()
        self.z1, self.z2 = z1, z2
        self.prior_net = nn.Sequential(nn.Linear(z2, hidden), nn.Tanh(), nn.Linear(hidden, 2 * z1))
        self.decoder = nn.Sequential(nn.Linear(z1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, data_dim))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            z2 = pyro.sample("z2", dist.Normal(0.0, 1.0).expand([self.z2]).to_event(1))
            loc, log_scale = self.prior_net(z2).chunk(2, -1)
            z1 = pyro.sample("z1", dist.Normal(loc, log_scale.clamp(-6, 3).exp()).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z1)).to_event(1), obs=x)
