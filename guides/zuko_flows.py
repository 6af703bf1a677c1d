r"""Amortized guides from zuko's conditional flows: ``nsf:K`` (neural spline flow) and ``maf:K`` (masked
autoregressive flow).

`zuko <https://zuko.readthedocs.io>`_ is where normalizing flows for PyTorch are maintained now (Pyro's own flow
development stopped, pyro-ppl/pyro #3297). Its conditional flows are built here around the suite's encoder, as
:class:`~pyro_lvm.guides.AmortizedFlowGuide` builds Pyro's:

.. math::
    z_0 \sim \mathcal N(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2), \qquad
    z = f_1^{-1} \circ \dots \circ f_K^{-1}(z_0;\, h(x)), \qquad
    \log q(z \mid x) = \log q_0(f(z; h) \mid x) + \log \left|\det \frac{\partial f(z; h)}{\partial z}\right|,
    \qquad f = f_K \circ \dots \circ f_1

The base q₀ is the diagonal Gaussian of :class:`~pyro_lvm.guides.DiagonalGaussianGuide` (its encoder, ``loc``
and ``scale`` heads, ``init_scale``); zuko's own unconditional N(0, I) base is not used. Each f_k is one of
zuko's masked autoregressive transforms (``zuko.flows.MAF`` / ``zuko.flows.NSF`` with ``features`` = the
model's latent dimension, ``context`` = the encoder's width, ``transforms`` = K, ``hidden_features`` =
``GuideConfig.flow_hidden``), its MADE reading the context h(x) beside z; the coordinate order alternates
between layers. The last layer of every hypernetwork starts at zero, so every f_k starts as the identity (zero
shift and log-scale for MAF; equal bins and unit knot slopes for the spline) and the guide as the diagonal one.

**Direction.** zuko's flows are density estimators: f maps a sample to the base in one pass of each MADE, so
log q(z|x) of *any* z is cheap (objectives that score a given z, such as DReG, work), and drawing z runs each
f_k backwards, which for an autoregressive map takes one pass per coordinate (``latent_dim`` passes per
transform; the guide's own draws are scored from the same inversion, nothing is inverted twice). That is the
opposite trade-off of ``iaf:K`` and ``spline:K`` (one pass to draw, cached scores of their own draws only): for a
small latent vector (a wrapped function's handful of sites) it costs little, for a 40-dimensional VAE latent a
draw is 40 sequential network passes per transform.

**The adapter.** zuko's distributions are plain ``torch.distributions``: Pyro's ELBOs need ``score_parts``,
broadcasting under plates needs ``expand``. :class:`ZukoDistribution` wraps one as a Pyro ``TorchDistribution``:
``rsample`` draws and scores in one go (zuko's ``rsample_and_log_prob``) and keeps the score of its latest
draw, so ``log_prob`` of that very tensor is read back, and of any other tensor is computed (the fast direction);
``expand`` expands the base (the transforms broadcast their context against z). Pyro 1.9's
``pyro.contrib.zuko.ZukoToPyro`` is not used: it has no ``rsample`` (``dist.rsample()``, which the suite's
``encode`` and evaluators call, would fail), keeps every draw's score in a dict for the distribution's lifetime,
and does not call ``Distribution.__init__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import Distribution, constraints
from torch import nn
from torch.distributions import Transform

from pyro_lvm.models.base import LatentModel
from pyro_lvm.registry import Registry

from .amortized import DiagonalGaussianGuide
from .config import GuideConfig
from .flows import register_flow_family


class ZukoDistribution(dist.TorchDistribution):
    """A zuko (or any ``torch.distributions``) flow ``flow`` as a Pyro distribution, with its batch and event shapes.

    ``rsample`` uses ``flow.rsample_and_log_prob`` where the flow has it and remembers the pair (one, the latest):
    ``log_prob`` of that same tensor object returns the remembered score, of any other tensor ``flow.log_prob``.
    Reparameterized (``has_rsample``), so Pyro's ELBOs take pathwise gradients; no closed-form mean (the suite's
    ``encode`` then averages draws)."""

    arg_constraints: dict[str, constraints.Constraint] = {}
    has_rsample = True

    def __init__(self, flow: torch.distributions.Distribution, validate_args: bool | None = None) -> None:
        self.flow = flow
        self._latest: tuple[torch.Tensor, torch.Tensor] | None = None  # (draw, its log q)
        super().__init__(flow.batch_shape, flow.event_shape, validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        """The flow's sample space: zuko's ``NormalizingFlow`` names none, so its transform's domain (real vectors
        for MAF and NSF)."""
        try:
            return self.flow.support
        except NotImplementedError:
            return self.flow.transform.domain

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008 - torch's own default
        shape = torch.Size(sample_shape)
        if hasattr(self.flow, "rsample_and_log_prob"):
            z, log_q = self.flow.rsample_and_log_prob(shape)
            self._latest = (z, log_q)
            return z
        return self.flow.rsample(shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        latest = self._latest
        if latest is not None and value is latest[0]:
            return latest[1]
        return self.flow.log_prob(value)

    def expand(self, batch_shape: Any, _instance: Any = None) -> ZukoDistribution:
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return ZukoDistribution(self.flow.expand(batch_shape))


def _zuko(submodule: str) -> ModuleType:
    """``zuko.<submodule>``, imported when a guide is first built: importing zuko patches torch's ``Transform``
    class (it adds ``call_and_ladj`` and renames ``_InverseTransform``), which ``import pyro_lvm`` does not do."""
    return importlib.import_module(f"zuko.{submodule}")


@dataclass(frozen=True)
class ZukoFamily:
    """A zuko flow class by its name in ``zuko.flows`` (``"MAF"``, ``"NSF"``, ...: ``cls(features, context,
    transforms=K, hidden_features=..., **options)``) and what the guide registry shows of it."""

    flow: str
    default_k: int
    summary: str
    #: further keyword arguments of the flow class (e.g. ``bins`` of the spline)
    options: tuple[tuple[str, Any], ...] = ()


ZUKO_FLOWS: Registry[ZukoFamily] = Registry("zuko flow")
ZUKO_FLOWS.register("nsf")(ZukoFamily(
    "NSF", 2, "zuko's neural spline flow: autoregressive rational-quadratic splines, 8 bins on [-5, 5] "
    "(Durkan et al. 2019)"))
ZUKO_FLOWS.register("maf")(ZukoFamily(
    "MAF", 2, "zuko's masked autoregressive flow: affine MADE steps (Papamakarios et al. 2017)"))


def _start_at_identity(transform: nn.Module) -> None:
    """Zero the output layer of a zuko transform's hypernetwork ``hyper`` (a MADE for ``features`` > 1, an MLP of
    the context alone for one feature), so it outputs all-zero parameters: the identity for zuko's affine and
    rational-quadratic univariate transforms."""
    hyper = getattr(transform, "hyper", None)
    if not isinstance(hyper, nn.Sequential) or not list(hyper[-1].parameters()):
        raise TypeError(f"{type(transform).__name__}: no hypernetwork output layer to start at the identity")
    with torch.no_grad():
        for p in hyper[-1].parameters():
            p.zero_()


class ZukoFlowGuide(DiagonalGaussianGuide):
    """q(z|x): the diagonal Gaussian of :class:`DiagonalGaussianGuide` pushed through a zuko conditional flow's
    transforms, run backwards (see :mod:`pyro_lvm.guides.zuko_flows`). The public surface of
    :class:`~pyro_lvm.guides.AmortizedFlowGuide`: ``encoder``, ``base(h)``, ``conditioned(h)``, ``flow(x)``,
    ``distribution(x)``, ``local_parameters(x)`` / ``distribution_from(params)``, ``prior_component(u)``."""

    def __init__(self, model: LatentModel, config: GuideConfig, family: ZukoFamily, num_transforms: int) -> None:
        super().__init__(model, config)
        if isinstance(num_transforms, bool) or not isinstance(num_transforms, int) or num_transforms < 1:
            raise ValueError(f"K (number of transforms): need an integer >= 1, got {num_transforms!r}")
        flow = getattr(_zuko("flows"), family.flow)(
            features=self.latent_dim, context=self.encoder.output_dim, transforms=num_transforms,
            hidden_features=tuple(config.flow_hidden), **dict(family.options))
        #: the lazy transforms f_1, ..., f_K (sample → base direction), each ``t(h)`` a torch Transform
        self.transforms = nn.ModuleList(flow.transform.transforms)
        for t in self.transforms:  # every f_k starts as the identity: the guide starts as the diagonal Gaussian
            _start_at_identity(t)

    # -- the flow
    def _composed(self, contexts: Sequence[torch.Tensor]) -> Transform:
        """f = f_K ∘ ... ∘ f_1, each f_k conditioned on its own context (sample → base)."""
        return _zuko("transforms").ComposedTransform(*(t(c) for t, c in zip(self.transforms, contexts, strict=True)))

    def _distribution(self, base: Distribution, contexts: Sequence[torch.Tensor]) -> ZukoDistribution:
        return ZukoDistribution(_zuko("distributions").NormalizingFlow(self._composed(contexts), base))

    def conditioned(self, h: torch.Tensor) -> list[Transform]:
        """The transforms in the sampling direction, z₀ → z: f_K⁻¹ first, f_1⁻¹ last, each conditioned on h."""
        return [t(h).inv for t in reversed(self.transforms)]

    def flow(self, x: torch.Tensor) -> tuple[Distribution, list[Transform]]:
        """The base distribution and the conditioned transforms (sampling direction) for inputs ``x``."""
        h = self.encoder(x)
        return self.base(h), self.conditioned(h)

    def distribution(self, x: torch.Tensor) -> Distribution:
        h = self.encoder(x)
        return self._distribution(self.base(h), [h] * len(self.transforms))

    # -- per-point inference (pyro_lvm.gaps)
    def local_parameters(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's ``loc`` and unconstrained ``scale`` (N, k), then ``flow{i}.context``: the context h (N, C)
        each transform's MADE reads. Freed per point, the family is "these MADEs conditioned on a free context", a
        subset of a fully free MAF / NSF, so the approximation gap it measures is an upper bound (as for ``iaf``)."""
        h = self.encoder(x)
        out = self.head_parameters(h)
        out.update({f"flow{i}.context": h for i in range(len(self.transforms))})
        return out

    def distribution_from(self, params: dict[str, torch.Tensor]) -> Distribution:
        """The base N(loc, diag σ²) pushed through the transforms conditioned on each ``flow{i}.context``; batch
        shape (N,)."""
        base = super().distribution_from(params)
        contexts = []
        for i in range(len(self.transforms)):
            key = f"flow{i}.context"
            if key not in params:
                raise ValueError(f"params: no {key} entry for transform {i}; pass what local_parameters(x) returns")
            contexts.append(params[key])
        return self._distribution(base, contexts)


for _name in ZUKO_FLOWS:
    register_flow_family(_name, ZUKO_FLOWS[_name], ZukoFlowGuide)


def zuko_flow_names() -> Sequence[str]:
    return ZUKO_FLOWS.names()


__all__ = ["ZUKO_FLOWS", "ZukoFamily", "ZukoFlowGuide", "ZukoDistribution", "zuko_flow_names"]
