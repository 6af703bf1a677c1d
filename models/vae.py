"""Variational autoencoder decoders as Pyro models, with swappable likelihoods and priors."""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import Distribution
from torch import nn

from pyro_lvm.registry import Registry, register_model

from .base import LatentModel, check_matrix, data_plate

PRIORS: Registry[type[nn.Module]] = Registry("prior")
DECODERS: Registry[type[nn.Module]] = Registry("decoder")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus}


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


class MLP(nn.Module):
    """z -> hidden layers -> output; accepts any leading batch dims."""

    def __init__(self, sizes: list[int], activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConvNet28(nn.Module):
    """A small transposed-convolution network z -> 28x28 image (flattened to 784)."""

    def __init__(self, latent_dim: int, activation: str = "relu") -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        self.fc = nn.Sequential(nn.Linear(latent_dim, 64 * 7 * 7), act())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), act(),  # (32, 14, 14)
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),  # (1, 28, 28)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, 64, 7, 7)
        return self.deconv(h).reshape(*lead, 784)


def decoder_network(config: VAEConfig, out_dim: int) -> nn.Module:
    if config.architecture == "conv":
        if out_dim != 784:
            raise ValueError(f"the conv decoder makes 28x28 images (784 values), but the data has {out_dim}")
        return ConvNet28(config.latent_dim, config.activation)
    if config.architecture != "mlp":
        raise ValueError(f"unknown architecture {config.architecture!r}; valid: mlp, conv")
    return MLP([config.latent_dim, *config.hidden, out_dim], config.activation)


@DECODERS.register("bernoulli")
class BernoulliDecoder(nn.Module):
    r"""p(x|z) = Π_d Bernoulli(x_d; σ(f_θ(z)_d)), for binary data."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.net = decoder_network(config, config.data_dim)

    def forward(self, z: torch.Tensor) -> Distribution:
        # data are checked to be 0/1 once at the boundary (validate), not at every step
        return dist.Bernoulli(logits=self.net(z), validate_args=False).to_event(1)

    @staticmethod
    def validate(x: torch.Tensor, name: str) -> None:
        if not ((x == 0) | (x == 1)).all():
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
        if config.gaussian_scale not in ("pixel", "shared"):
            raise ValueError(f"gaussian_scale must be 'pixel' or 'shared', got {config.gaussian_scale!r}")
        self.net = decoder_network(config, config.data_dim)
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
        g = torch.Generator().manual_seed(0)
        self.logits = nn.Parameter(torch.zeros(c))
        self.locs = nn.Parameter(torch.randn(c, k, generator=g))
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
        if config.latent_dim < 1 or config.data_dim < 1:
            raise ValueError(f"latent_dim and data_dim must be >= 1, got {config.latent_dim}, {config.data_dim}")
        self.decoder = DECODERS[config.decoder](config)
        self.prior = PRIORS[config.prior](config)

    @classmethod
    def example(cls, seed: int = 0) -> tuple[VAE, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(16, 12, generator=g) < 0.3).float()
        return cls(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,))), x

    def validate(self, x: object, name: str = "data") -> torch.Tensor:
        x = check_matrix(x, name=name, width=self.data_dim)
        self.decoder.validate(x, name)
        return x

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        prior = self.prior()
        with data_plate(x.shape[0], total_size):
            z = pyro.sample("z", prior)  # (..., N, k)
            pyro.sample("x", self.decoder(z), obs=x)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Means of p(x|z) for n draws z ~ p(z), shape (n, data_dim)."""
        return self.decoder.mean(self.prior().sample((n,)))

    @property
    def num_decoder_params(self) -> int:
        return sum(p.numel() for p in self.decoder.parameters())
