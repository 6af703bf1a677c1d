r"""Example Pyro model functions for :func:`pyro_lvm.wrap_model`: ordinary Pyro, nothing of the suite's inside.

Each takes the data x (points × features) and puts its per-point sites in ``pyro.plate("data", len(x))``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

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
