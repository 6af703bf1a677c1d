r"""Amortized normalizing-flow guides.

A diagonal Gaussian base from the encoder is pushed through K transforms whose parameters are
produced by hypernetworks from the encoder's hidden features h(x):

.. math::
    z_0 \sim \mathcal N(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2), \qquad
    z_K = f_K \circ \dots \circ f_1(z_0; h(x)),
    \qquad \log q_K(z_K \mid x) = \log q_0(z_0 \mid x)
        - \sum_{k=1}^K \log \left|\det \frac{\partial f_k}{\partial z_{k-1}}\right|

Each family is a registry entry (``planar:K``, ``radial:K``, ``iaf:K``, ``householder:K``, ``spline:K``):
a transform factory handed to :class:`AmortizedFlowGuide`, as Pyro's ``AutoIAFNormal`` is a factory handed
to ``AutoNormalizingFlow``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions import Distribution
from pyro.distributions.torch_transform import TransformModule
from torch import nn

from pyro_lvm.models.base import LatentModel
from pyro_lvm.registry import Registry

from .amortized import DiagonalGaussianGuide
from .config import GuideConfig
from .registry import register_guide

#: factory(latent_dim, context_dim, hidden_dims) -> a (conditional) transform module
TransformFactory = Callable[[int, int, list[int]], nn.Module]


@dataclass(frozen=True)
class FlowFamily:
    factory: TransformFactory
    #: reverse the coordinate order between layers (autoregressive flows)
    permute: bool
    default_k: int
    summary: str


FLOWS: Registry[FlowFamily] = Registry("flow")


def _iaf(k: int, c: int, hidden: list[int]) -> nn.Module:
    # Kingma et al. (2016)'s numerically stable, sigmoid-gated update: z' = σ(s) z + (1 − σ(s)) m
    return T.conditional_affine_autoregressive(k, c, hidden, stable=True)


def _spline(k: int, c: int, hidden: list[int]) -> nn.Module:
    return T.conditional_spline_autoregressive(k, c, hidden, count_bins=8, bound=5.0)


FLOWS.register("planar")(FlowFamily(T.conditional_planar, False, 10, "planar flows (Rezende & Mohamed 2015)"))
FLOWS.register("radial")(FlowFamily(T.conditional_radial, False, 10, "radial flows (Rezende & Mohamed 2015)"))
FLOWS.register("iaf")(FlowFamily(_iaf, True, 2, "inverse autoregressive flow (Kingma et al. 2016)"))
FLOWS.register("householder")(FlowFamily(lambda k, c, h: T.conditional_householder(k, c, h), False, 4,
                                         "Householder reflections: full-covariance Gaussian (Tomczak & Welling 2016)"))
FLOWS.register("spline")(FlowFamily(_spline, True, 2, "autoregressive rational-quadratic splines (Durkan et al. 2019)"))


class AmortizedFlowGuide(DiagonalGaussianGuide):
    """q(z|x): the diagonal Gaussian of :class:`DiagonalGaussianGuide` pushed through conditioned transforms."""

    def __init__(self, model: LatentModel, config: GuideConfig, family: FlowFamily, num_transforms: int) -> None:
        super().__init__(model, config)
        context, hidden = self.encoder.output_dim, list(config.flow_hidden)
        if family.permute and any(h < self.latent_dim for h in hidden):
            raise ValueError(f"autoregressive flows need hidden sizes >= the latent dimension ({self.latent_dim}); "
                             f"got flow_hidden={tuple(hidden)}")
        self.transforms = nn.ModuleList(family.factory(self.latent_dim, context, hidden) for _ in range(num_transforms))
        # reversing the order between autoregressive layers lets every coordinate depend on every other
        self.reverse = T.Permute(torch.arange(self.latent_dim - 1, -1, -1)) if family.permute else None

    def conditioned(self, h: torch.Tensor) -> list[TransformModule]:
        out: list[TransformModule] = []
        for i, t in enumerate(self.transforms):
            if self.reverse is not None and i > 0:
                out.append(self.reverse)
            out.append(t.condition(h) if isinstance(t, dist.ConditionalTransform) else t)
        return out

    def flow(self, x: torch.Tensor) -> tuple[Distribution, list[TransformModule]]:
        """The base distribution and the conditioned transforms for inputs ``x``."""
        h = self.encoder(x)
        return self.base(h), self.conditioned(h)

    def distribution(self, x: torch.Tensor) -> Distribution:
        base, transforms = self.flow(x)
        return dist.TransformedDistribution(base, transforms)


def _register(name: str, family: FlowFamily) -> None:
    def factory(model: LatentModel, config: GuideConfig, k: int | None) -> AmortizedFlowGuide:
        return AmortizedFlowGuide(model, config, family, k or family.default_k)

    factory.__name__ = name
    register_guide(name, arg_name="K (number of transforms)", default_arg=family.default_k,
                   summary=f"{family.summary}, conditioned on the encoder")(factory)


for _name in FLOWS:
    _register(_name, FLOWS[_name])


def flow_names() -> Sequence[str]:
    return FLOWS.names()
