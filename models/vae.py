"""Variational autoencoder decoders as Pyro models, with swappable likelihoods and priors."""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import Distribution
from torch import nn

from pyro_lvm.config import ConfigError, check_choice, check_config
from pyro_lvm.nn import ACTIVATIONS, ARCHITECTURES, decoder_network
from pyro_lvm.registry import Registry, register_model
from pyro_lvm.runtime import seeded

from .base import LatentModel, data_plate

PRIORS: Registry[type[nn.Module]] = Registry("prior")
DECODERS: Registry[type[nn.Module]] = Registry("decoder")


@dataclass
class VAEConfig:
    data_dim: int
    latent_dim: int = 40
    hidden: tuple[int, ...] = (300, 300)
    #: likelihood: "bernoulli" (binary data, logits) or "gaussian" (continuous data)
    decoder: str = "bernoulli"
    #: network: "mlp", or "conv" for 28x28 images
    architecture: str = "mlp"
    activation: str = "relu"
    #: Gaussian decoder's log-scale: "pixel" (one learned per dimension) or "shared" (one for all)
    gaussian_scale: str = "pixel"
    #: prior p(z): a name in PRIORS ("standard", "mog")
    prior: str = "standard"
    #: components of a learned mixture-of-Gaussians prior
    prior_components: int = 10

    def __post_init__(self) -> None:
        check_config(self, positive_int=("data_dim", "latent_dim", "prior_components"))
        self.hidden = tuple(self.hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError("hidden", f"layer sizes must be integers >= 1, got {self.hidden}")
        check_choice(self, "decoder", DECODERS.names())
        check_choice(self, "architecture", ARCHITECTURES.names())
        check_choice(self, "activation", ACTIVATIONS)
        check_choice(self, "gaussian_scale", ("pixel", "shared"))
        check_choice(self, "prior", PRIORS.names())
        widths = ARCHITECTURES[self.architecture][1]
        if widths is not None and self.data_dim not in widths:
            raise ConfigError("architecture", f"{self.architecture!r} makes outputs of width {widths}, but "
                              f"data_dim is {self.data_dim}; use 'mlp'")


def _network(config: VAEConfig) -> nn.Module:
    return decoder_network(config.architecture, config.latent_dim, config.hidden, config.data_dim, config.activation)


@DECODERS.register("bernoulli")
class BernoulliDecoder(nn.Module):
    r"""p(x|z) = Π_d Bernoulli(x_d; σ(f_θ(z)_d)), for binary data."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.net = _network(config)

    def forward(self, z: torch.Tensor) -> Distribution:
        # no per-call validation of the logits (a NaN would print a tensor); the observed data are checked to be
        # 0/1 by validate, at the library's boundary and again in VAE.forward for callers who bypass it
        return dist.Bernoulli(logits=self.net(z), validate_args=False).to_event(1)

    @staticmethod
    def validate(x: torch.Tensor, name: str) -> None:
        if bool(torch.count_nonzero(x * (x - 1))):  # 0 exactly where x is 0 or 1 (NaN and inf are not): one pass
            bad = int((~((x == 0) | (x == 1))).any(-1).sum())
            raise ValueError(f"{name}: the Bernoulli decoder needs binary 0/1 data, but {bad} rows have other "
                             "values; binarize the data or use --decoder gaussian")

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(z))


@DECODERS.register("gaussian")
class GaussianDecoder(nn.Module):
    r"""p(x|z) = Π_d N(x_d; f_θ(z)_d, s_d²) with learned log-scales (per dimension or shared)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.net = _network(config)
        self.log_scale = nn.Parameter(torch.zeros(config.data_dim if config.gaussian_scale == "pixel" else 1))

    def forward(self, z: torch.Tensor) -> Distribution:
        scale = self.log_scale.clamp(min=-7.0).exp()  # floor avoids degenerate variance on constant pixels
        return dist.Normal(self.net(z), scale, validate_args=False).to_event(1)

    @staticmethod
    def validate(x: torch.Tensor, name: str) -> None:
        return None

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@PRIORS.register("standard")
class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.register_buffer("zero", torch.zeros(config.latent_dim))

    def forward(self) -> Distribution:
        return dist.Normal(self.zero, 1.0).to_event(1)


@PRIORS.register("mog")
class MixturePrior(nn.Module):
    r"""A learned mixture of Gaussians, p(z) = Σ_c π_c N(z; m_c, diag s_c²): one answer to the prior hole."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        c, k = config.prior_components, config.latent_dim
        self.logits = nn.Parameter(torch.zeros(c))
        self.locs = nn.Parameter(torch.randn(c, k))  # torch's global RNG: a seed fixes it
        self.log_scales = nn.Parameter(torch.zeros(c, k))

    def forward(self) -> Distribution:
        comp = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), comp)


@register_model("vae")
class VAE(LatentModel):
    r"""A variational autoencoder's generative model.

    .. math:: z_n \sim p(z), \qquad x_n \mid z_n \sim p_\theta(x_n \mid f_\theta(z_n))

    with p(z) from :data:`PRIORS` (standard normal by default) and p_θ(x|z) from :data:`DECODERS`
    (Bernoulli logits for binary data, Gaussian with learned scales for continuous data).
    """

    Config = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.data_dim, self.latent_dim = config.data_dim, config.latent_dim
        self.decoder = DECODERS[config.decoder](config)
        self.prior = PRIORS[config.prior](config)

    @classmethod
    def example(cls, seed: int = 0) -> tuple[VAE, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(16, 12, generator=g) < 0.3).to(torch.get_default_dtype())
        with seeded(seed):
            return cls(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,))), x

    def validate(self, x: object, name: str = "data") -> torch.Tensor:
        x = super().validate(x, name)
        self.decoder.validate(x, name)
        return x

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        if not torch.jit.is_tracing():  # a plain Pyro loop (SVI + Trace_ELBO) gets the decoder's data check too
            self.decoder.validate(x, "data")
        prior = self.prior()
        with data_plate(x.shape[0], total_size, x.device):
            z = pyro.sample("z", prior)  # (..., N, k)
            pyro.sample("x", self.decoder(z), obs=x)

    def _sample(self, n: int, *, mean: bool, guide: object) -> torch.Tensor:
        z = self.prior().sample((n,))
        return self.decoder.mean(z) if mean else self.decoder(z).sample()

    @property
    def num_decoder_params(self) -> int:
        return sum(p.numel() for p in self.decoder.parameters())
