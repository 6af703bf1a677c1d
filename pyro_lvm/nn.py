"""Shared networks: MLPs, the encoder trunk of amortized guides, conv nets for 28x28 images, and gated units.

Architectures are registered by name (:data:`ARCHITECTURES`): one entry gives both halves of a VAE, the
decoder z -> x-space values (the model) and the encoder trunk x -> h (the amortized guides' features), so an
architecture family is one entry and no dispatcher is edited.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from pyro_lvm.registry import Registry

#: nonlinearities by name
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """sizes[0] -> hidden layers -> sizes[-1], the nonlinearity between layers; any leading batch dims."""

    def __init__(self, sizes: Sequence[int], activation_name: str = "relu") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation(activation_name))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Encoder(nn.Module):
    """MLP trunk x -> h (every layer followed by the nonlinearity); with no hidden layers h = x, a linear
    encoder once the guide's heads are attached. ``output_dim`` is h's width."""

    def __init__(self, input_dim: int, hidden: Sequence[int], activation_name: str = "relu") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), activation(activation_name)]
            width = h
        self.net = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet28(nn.Module):
    """A small transposed-convolution network z -> 28x28 image (flattened to 784)."""

    def __init__(self, latent_dim: int, activation_name: str = "relu") -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(latent_dim, 64 * 7 * 7), activation(activation_name))
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), activation(activation_name),  # (32, 14, 14)
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),  # (1, 28, 28)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, 64, 7, 7)
        return self.deconv(h).reshape(*lead, 784)


class Gated(nn.Module):
    r"""A gated linear unit (Dauphin et al. 2017): h = A(x) ⊙ σ(B(x)), with A and B affine maps of one shape.

    A = W₁· + b₁ and B = W₂· + b₂ are two dense layers (``dense``) or two (transposed) convolutions with
    the same kernel, stride and padding (``conv``, ``deconv``); the sigmoid gate σ(B(x)) ∈ (0, 1) decides
    per unit how much of the linear response A(x) passes, and is the unit's only nonlinearity (as in
    Tomczak & Welling's ``GatedDense`` and van den Berg et al.'s ``GatedConv2d``, whose units for binary data
    apply no activation to A). Shapes are those of the wrapped layers: (..., in) -> (..., out) for ``dense``,
    (B, C_in, H, W) -> (B, C_out, H', W') for the convolutions. Torch's default initialisation.
    """

    def __init__(self, value: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.value, self.gate = value, gate

    @classmethod
    def dense(cls, in_features: int, out_features: int) -> Gated:
        return cls(nn.Linear(in_features, out_features), nn.Linear(in_features, out_features))

    @classmethod
    def conv(cls, c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> Gated:
        return cls(*(nn.Conv2d(c_in, c_out, kernel, stride, padding) for _ in range(2)))

    @classmethod
    def deconv(cls, c_in: int, c_out: int, kernel: int, stride: int, padding: int, output_padding: int = 0) -> Gated:
        return cls(*(nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, output_padding) for _ in range(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


class GatedMLP(nn.Module):
    r"""x -> gated dense layers of widths ``hidden`` -> a linear map to ``out_dim`` (if given); any leading dims.

    With hᵢ = (W₁ⁱ hᵢ₋₁ + b₁ⁱ) ⊙ σ(W₂ⁱ hᵢ₋₁ + b₂ⁱ), h₀ = x: the decoder is z -> h_L -> W h_L + b (``out_dim``
    set; Tomczak & Welling's VampPrior VAE uses hidden (300, 300)), the encoder trunk is x -> h_L
    (``out_dim=None``; ``output_dim`` is the last hidden width, or the input width with no hidden layers).
    """

    def __init__(self, input_dim: int, hidden: Sequence[int], out_dim: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers.append(Gated.dense(width, h))
            width = h
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GatedConvEncoder28(nn.Module):
    r"""van den Berg et al.'s (2018, Sylvester flows) gated conv encoder trunk: 28x28 image -> 256 features.

    Six :class:`Gated` convolutions (channels, kernel, stride, padding), shapes per image::

        (1, 28, 28) -> 32,5,1,2 -> (32, 28, 28) -> 32,5,2,2 -> (32, 14, 14) -> 64,5,1,2 -> (64, 14, 14)
                    -> 64,5,2,2 -> (64, 7, 7) -> 64,5,1,2 -> (64, 7, 7) -> 256,7,1,0 -> (256, 1, 1)

    Input (..., 784) flattened row-major, output (..., 256); ``output_dim`` = 256.
    """

    output_dim = 256

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Gated.conv(1, 32, 5, 1, 2), Gated.conv(32, 32, 5, 2, 2), Gated.conv(32, 64, 5, 1, 2),
            Gated.conv(64, 64, 5, 2, 2), Gated.conv(64, 64, 5, 1, 2), Gated.conv(64, 256, 7, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.net(x.reshape(-1, 1, 28, 28)).reshape(*lead, 256)


class GatedConvDecoder28(nn.Module):
    r"""van den Berg et al.'s gated transposed-conv decoder: z -> 784 values (Bernoulli logits, or Gaussian means).

    z is read as a (k, 1, 1) image; six :class:`Gated` transposed convolutions (channels, kernel, stride,
    padding, output padding), then a 1x1 convolution to one channel, shapes per latent::

        (k, 1, 1) -> 64,7,1,0 -> (64, 7, 7) -> 64,5,1,2 -> (64, 7, 7) -> 32,5,2,2,1 -> (32, 14, 14)
                  -> 32,5,1,2 -> (32, 14, 14) -> 32,5,2,2,1 -> (32, 28, 28) -> 32,5,1,2 -> (32, 28, 28)
                  -> 1x1 conv -> (1, 28, 28)

    (their sigmoid after the 1x1 conv is the Bernoulli's: the decoder returns logits). Input (..., k) with any
    leading dims (IWAE evaluation passes (S, N, k)), output (..., 784).
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Gated.deconv(latent_dim, 64, 7, 1, 0), Gated.deconv(64, 64, 5, 1, 2), Gated.deconv(64, 32, 5, 2, 2, 1),
            Gated.deconv(32, 32, 5, 1, 2), Gated.deconv(32, 32, 5, 2, 2, 1), Gated.deconv(32, 32, 5, 1, 2),
        )
        self.out = nn.Conv2d(32, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        return self.out(self.net(z.reshape(-1, z.shape[-1], 1, 1))).reshape(*lead, 784)


#: decoder network factory(latent_dim, hidden, out_dim, activation) -> z -> out_dim values
NetworkFactory = Callable[[int, Sequence[int], int, str], nn.Module]
#: encoder trunk factory(input_dim, hidden, activation) -> x -> h, a module with ``output_dim`` (h's width)
EncoderFactory = Callable[[int, Sequence[int], str], nn.Module]


class Architecture(NamedTuple):
    """Both halves of a VAE architecture; ``entry[1]`` is ``widths`` (the data widths it supports)."""

    #: factory of the decoder z -> out_dim values (the model's network)
    decoder: NetworkFactory
    #: the data widths (features per point) both halves support, or ``None`` for any
    widths: tuple[int, ...] | None
    #: factory of the encoder trunk x -> h of the amortized guides
    encoder: EncoderFactory


#: architectures by name. ``hidden`` sizes the MLPs and is ignored by the conv architectures (fixed 28x28
#: stacks); ``activation`` is ignored by the gated ones (the sigmoid gate is their nonlinearity). ``conv``
#: keeps the MLP :class:`Encoder` (a conv decoder only), so its guides' parameter names are those of ``mlp``.
ARCHITECTURES: Registry[Architecture] = Registry("architecture")
ARCHITECTURES.register("mlp")(Architecture(lambda k, hidden, out, act: MLP([k, *hidden, out], act), None,
                                           lambda d, hidden, act: Encoder(d, hidden, act)))
ARCHITECTURES.register("conv")(Architecture(lambda k, hidden, out, act: ConvNet28(k, act), (784,),
                                            lambda d, hidden, act: Encoder(d, hidden, act)))
ARCHITECTURES.register("gated-mlp")(Architecture(lambda k, hidden, out, act: GatedMLP(k, hidden, out), None,
                                                 lambda d, hidden, act: GatedMLP(d, hidden)))
ARCHITECTURES.register("gated-conv")(Architecture(lambda k, hidden, out, act: GatedConvDecoder28(k), (784,),
                                                  lambda d, hidden, act: GatedConvEncoder28()))


def _supported(architecture: str, width: int, what: str) -> Architecture:
    entry = ARCHITECTURES[architecture]
    if entry.widths is not None and width not in entry.widths:
        raise ValueError(f"architecture: {architecture!r} {what} of width {entry.widths}, but the data has "
                         f"{width} features; use --architecture mlp or gated-mlp")
    return entry


def decoder_network(architecture: str, latent_dim: int, hidden: Sequence[int], out_dim: int,
                    activation_name: str) -> nn.Module:
    """The decoder of ``architecture``: (..., latent_dim) -> (..., out_dim); ``ValueError`` naming
    ``architecture`` for an unknown name or an unsupported ``out_dim``."""
    return _supported(architecture, out_dim, "makes outputs").decoder(latent_dim, tuple(hidden), out_dim,
                                                                      activation_name)


def encoder_network(architecture: str, input_dim: int, hidden: Sequence[int], activation_name: str) -> nn.Module:
    """The encoder trunk of ``architecture``: (..., input_dim) -> (..., output_dim), its width as ``output_dim``
    (for ``mlp`` and ``conv`` the MLP :class:`Encoder`); ``ValueError`` naming ``architecture`` for an unknown
    name or an unsupported ``input_dim``."""
    return _supported(architecture, input_dim, "reads inputs").encoder(input_dim, tuple(hidden), activation_name)
