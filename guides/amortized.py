"""Amortized Gaussian guides: an encoder maps each x to the parameters of q(z|x)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import Distribution, constraints
from pyro.nn import PyroModule
from torch import nn

from pyro_lvm.models.base import LatentModel, data_plate
from pyro_lvm.nn import Encoder
from pyro_lvm.runtime import local_params, seeded

from .config import GuideConfig
from .registry import exact_posterior_available, register_guide


class LocalPosterior:
    """Mixin of guides with a per-point q(z|x): :meth:`posterior` and :meth:`encode` for new points.

    Subclasses provide ``distribution(x)`` (batch shape ``x.shape[:-1]``) and ``_model`` (a 1-tuple).
    """

    def posterior(self, x: object) -> Distribution:
        """q(z|x) for new points ``x`` (array, tensor or DataFrame of shape (N, D)), batch shape (N,)."""
        model = self._model[0]  # type: ignore[attr-defined]
        x = model.validate(x, name="x")
        with local_params(model, self), torch.no_grad():
            return self.distribution(x)  # type: ignore[attr-defined]

    def encode(self, x: object, num_samples: int = 256, seed: int | None = None) -> torch.Tensor:
        """E_q[z|x] per point, shape (N, latent_dim): exact for Gaussian families, else a Monte Carlo mean."""
        q = self.posterior(x)
        try:
            return q.mean
        except NotImplementedError:  # flows: no closed-form mean
            with seeded(seed), torch.no_grad():
                return q.sample((num_samples,)).mean(0)


def _scale_head(width: int, out: int, init_scale: float) -> nn.Linear:
    head = nn.Linear(width, out)
    with torch.no_grad():
        head.weight.mul_(0.01)
        head.bias.fill_(math.log(math.expm1(init_scale)))  # softplus(bias) = init_scale
    return head


class AmortizedGuide(LocalPosterior, PyroModule):
    """Base of amortized guides: ``distribution(x)`` is q(z|x) with batch shape ``x.shape[:-1]``.

    ``forward`` samples the model's local site from it inside the shared data plate, so model and
    guide have the same signature and site names. Subclasses implement :meth:`distribution`.
    """

    def __init__(self, model: LatentModel, config: GuideConfig) -> None:
        super().__init__()
        self._model = (model,)  # not a submodule: the model's state is not the guide's
        self.site = model.local_site
        self.data_dim, self.latent_dim = model.data_dim, model.latent_dim
        self.config = config
        self.encoder = Encoder(model.data_dim, tuple(config.hidden), config.activation)

    def distribution(self, x: torch.Tensor) -> Distribution:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        with data_plate(x.shape[0], total_size, x.device):
            pyro.sample(self.site, self.distribution(x))


class DiagonalGaussianGuide(AmortizedGuide):
    r"""q(z|x) = N(μ_φ(x), diag σ_φ(x)²): the vanilla VAE encoder."""

    def __init__(self, model: LatentModel, config: GuideConfig) -> None:
        super().__init__(model, config)
        width, k = self.encoder.output_dim, self.latent_dim
        self.loc = nn.Linear(width, k)
        self.scale = _scale_head(width, k, config.init_scale)

    def base(self, h: torch.Tensor) -> dist.Independent:
        return dist.Normal(self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-6).to_event(1)

    def distribution(self, x: torch.Tensor) -> Distribution:
        return self.base(self.encoder(x))


class CholeskyAffine(torch.distributions.Transform):
    """y = loc + L x with batched lower-triangular L; log|det| = Σᵢ log Lᵢᵢ (no solve for cached samples)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        super().__init__(cache_size=1)
        self.loc, self.scale_tril = loc, scale_tril

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + (self.scale_tril @ x.unsqueeze(-1)).squeeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.scale_tril, (y - self.loc).unsqueeze(-1), upper=False).squeeze(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1).expand(x.shape[:-1])


class FullCovGaussianGuide(AmortizedGuide):
    r"""q(z|x) = N(μ_φ(x), L Lᵀ) with L = (I + M_φ(x)) diag σ_φ(x), M strictly lower-triangular.

    This is the LDLᵀ factorisation, which reaches every covariance: the diagonal guide's sample
    σ ⊙ ε followed by a volume-preserving unit-triangular map (a linear IAF step), so with M = 0 it
    *is* the diagonal guide. Written as z = μ + L ε, ε ~ N(0, I), log q(z|x) = log N(ε; 0, I) − Σᵢ log σᵢ
    for the guide's own samples: no triangular solve, whose float32 round-off an optimiser can exploit.

    The off-diagonal head's outputs are scaled by ``OFFDIAG_SCALE`` so that Adam, whose steps on each
    weight are about ``lr`` regardless of the gradient's size, moves the k(k−1)/2 correlations more
    slowly than the means and scales. With the plain Cholesky factor L = diag σ + M instead, the guide
    trained a VAE 6 nats *worse* than the diagonal guide's (``python -m benchmarks.fullcov_ablation``).
    """

    OFFDIAG_SCALE = 0.1

    def __init__(self, model: LatentModel, config: GuideConfig) -> None:
        super().__init__(model, config)
        width, k = self.encoder.output_dim, self.latent_dim
        self.loc = nn.Linear(width, k)
        self.diag = _scale_head(width, k, config.init_scale)
        self.offdiag = nn.Linear(width, k * (k - 1) // 2)
        with torch.no_grad():
            self.offdiag.weight.mul_(0.01)
            self.offdiag.bias.zero_()
        self.register_buffer("_rows", torch.tril_indices(k, k, -1)[0], persistent=False)
        self.register_buffer("_cols", torch.tril_indices(k, k, -1)[1], persistent=False)
        self.register_buffer("_eye", torch.eye(k), persistent=False)

    def scale_tril(self, h: torch.Tensor) -> torch.Tensor:
        k = self.latent_dim
        unit = h.new_zeros(h.shape[:-1] + (k, k))  # (..., k, k)
        unit[..., self._rows, self._cols] = self.OFFDIAG_SCALE * self.offdiag(h)
        scale = nn.functional.softplus(self.diag(h)) + 1e-6  # (..., k)
        return (unit + self._eye) * scale.unsqueeze(-2)  # column j scaled by σⱼ; diagonal = σ

    def distribution(self, x: torch.Tensor) -> Distribution:
        h = self.encoder(x)
        loc = self.loc(h)
        base = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
        return dist.TransformedDistribution(base, [CholeskyAffine(loc, self.scale_tril(h))])


class ExactPosteriorGuide(LocalPosterior, PyroModule):
    """q(z|x) = p(z|x), the model's closed-form posterior; it has no parameters of its own."""

    def __init__(self, model: LatentModel) -> None:
        super().__init__()
        self.site = model.local_site
        self._model = (model,)  # not a submodule: the model's parameters are the model's to train

    def distribution(self, x: torch.Tensor) -> Distribution:
        return self._model[0].exact_posterior(x)

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        with data_plate(x.shape[0], total_size, x.device):
            pyro.sample(self.site, self.distribution(x))


@register_guide("amortized", summary="encoder -> diagonal Gaussian per point (the vanilla VAE)")
def amortized(model: LatentModel, config: GuideConfig, arg: int | None = None) -> DiagonalGaussianGuide:
    return DiagonalGaussianGuide(model, config)


@register_guide("amortized-fullcov", summary="encoder -> full-covariance Gaussian per point (Cholesky)")
def amortized_fullcov(model: LatentModel, config: GuideConfig, arg: int | None = None) -> FullCovGaussianGuide:
    return FullCovGaussianGuide(model, config)


@register_guide("exact", requires=exact_posterior_available, summary="the model's analytic posterior p(z|x)")
def exact(model: LatentModel, config: GuideConfig, arg: int | None = None) -> ExactPosteriorGuide:
    return ExactPosteriorGuide(model)
