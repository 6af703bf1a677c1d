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
from pyro_lvm.nn import encoder_network
from pyro_lvm.runtime import local_params, seeded

from .config import GuideConfig
from .registry import exact_posterior_available, register_guide


class LocalPosterior:
    """Mixin of guides with a per-point q(z|x): :meth:`posterior` and :meth:`encode` for new points.

    Subclasses provide ``distribution(x)`` (batch shape ``x.shape[:-1]``) and ``_model`` (a 1-tuple), and
    split it in two for per-point (non-amortized) inference (:func:`pyro_lvm.gaps.inference_gaps`):

    * ``local_parameters(x) -> dict[str, Tensor]``: every per-point quantity the guide computes from x, each
      with the points on dim 0 — the coordinates of q(z|x) within the guide's family;
    * ``distribution_from(params)``: the member of the family those quantities pick, batch shape (N,), so that
      ``distribution_from(local_parameters(x))`` is ``distribution(x)``.

    Giving each point its own free ``params`` turns the amortized family into the same family without the
    encoder's constraint (Cremer et al. 2018, "Inference Suboptimality in Variational Autoencoders").
    """

    def local_parameters(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not expose its per-point parameters")

    def distribution_from(self, params: dict[str, torch.Tensor]) -> Distribution:
        raise NotImplementedError(f"{type(self).__name__} does not expose its per-point parameters")

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


def _take(params: dict[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    """``params[name]`` for each name; a missing key is a ``ValueError`` naming what was expected."""
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"params: missing {', '.join(missing)}; pass what local_parameters(x) returns "
                         f"(keys {', '.join(sorted(params)) or 'none'} given)")
    return [params[n] for n in names]


def _positive(raw: torch.Tensor) -> torch.Tensor:
    """The heads' standard deviations from their unconstrained outputs: softplus, floored at 1e-6."""
    return nn.functional.softplus(raw) + 1e-6


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
        self.encoder = encoder_network(config.architecture, model.data_dim, tuple(config.hidden), config.activation)

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
        return dist.Normal(self.loc(h), _positive(self.scale(h))).to_event(1)

    def distribution(self, x: torch.Tensor) -> Distribution:
        return self.base(self.encoder(x))

    def head_parameters(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Gaussian's per-point parameters from encoder features h (N, width): ``loc`` μ (N, k) and the
        unconstrained ``scale`` s (N, k), σ = softplus(s) + 1e-6."""
        return {"loc": self.loc(h), "scale": self.scale(h)}

    def local_parameters(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loc`` μ(x) and unconstrained ``scale`` s(x), each (N, k)."""
        return self.head_parameters(self.encoder(x))

    def distribution_from(self, params: dict[str, torch.Tensor]) -> Distribution:
        """N(μ, diag σ²) with σ = softplus(s) + 1e-6, batch shape (N,)."""
        loc, scale = _take(params, "loc", "scale")
        return dist.Normal(loc, _positive(scale)).to_event(1)

    def prior_component(self, u: torch.Tensor) -> Distribution:
        """The Gaussian N(μ_φ(u), diag σ_φ(u)²) at pseudo-inputs u (K, D), batch shape (K,): the VampPrior's
        components. For flow guides (subclasses) it is the base q₀(z|u), before the flow."""
        return self.base(self.encoder(u))


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
        return self.tril_from(self.diag(h), self.OFFDIAG_SCALE * self.offdiag(h))

    def tril_from(self, diag: torch.Tensor, offdiag: torch.Tensor) -> torch.Tensor:
        """L = (I + M) diag σ: ``diag`` (..., k) is σ unconstrained (σ = softplus + 1e-6), ``offdiag``
        (..., k(k−1)/2) fills M's strictly lower triangle row by row."""
        k = self.latent_dim
        unit = offdiag.new_zeros(offdiag.shape[:-1] + (k, k))  # (..., k, k)
        unit[..., self._rows, self._cols] = offdiag
        return (unit + self._eye) * _positive(diag).unsqueeze(-2)  # column j scaled by σⱼ; diagonal = σ

    def distribution(self, x: torch.Tensor) -> Distribution:
        h = self.encoder(x)
        loc = self.loc(h)
        base = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
        return dist.TransformedDistribution(base, [CholeskyAffine(loc, self.scale_tril(h))])

    def prior_component(self, u: torch.Tensor) -> Distribution:
        """N(μ_φ(u), L_φ(u) L_φ(u)ᵀ) at pseudo-inputs u (K, D), batch shape (K,): the VampPrior's components."""
        h = self.encoder(u)
        return dist.MultivariateNormal(self.loc(h), scale_tril=self.scale_tril(h))

    def local_parameters(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loc`` μ(x) (N, k), unconstrained ``diag`` (N, k) and ``offdiag``, M's entries (N, k(k−1)/2), as
        :meth:`tril_from` reads them. M itself, not its head's output (M / ``OFFDIAG_SCALE``), so that an
        optimiser of the per-point parameters moves the correlations as fast as the means and scales."""
        h = self.encoder(x)
        return {"loc": self.loc(h), "diag": self.diag(h), "offdiag": self.OFFDIAG_SCALE * self.offdiag(h)}

    def distribution_from(self, params: dict[str, torch.Tensor]) -> Distribution:
        """N(μ, L Lᵀ) with L = :meth:`tril_from` (diag, offdiag), written as z = μ + L ε; batch shape (N,)."""
        loc, diag, offdiag = _take(params, "loc", "diag", "offdiag")
        base = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
        return dist.TransformedDistribution(base, [CholeskyAffine(loc, self.tril_from(diag, offdiag))])


class ExactPosteriorGuide(LocalPosterior, PyroModule):
    """q(z|x) = p(z|x), the model's closed-form posterior; it has no parameters of its own."""

    def __init__(self, model: LatentModel) -> None:
        super().__init__()
        self.site = model.local_site
        self._model = (model,)  # not a submodule: the model's parameters are the model's to train

    def distribution(self, x: torch.Tensor) -> Distribution:
        return self._model[0].exact_posterior(x)

    def local_parameters(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """None: q(z|x) = p(z|x) is fixed by the model, so there is nothing per point to optimise (``{}``)."""
        return {}

    def distribution_from(self, params: dict[str, torch.Tensor]) -> Distribution:
        raise ValueError("params: the exact guide has no per-point parameters (local_parameters(x) is {}): its "
                         "q(z|x) is the model's p(z|x); use distribution(x)")

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
