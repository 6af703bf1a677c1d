"""Shared networks: MLPs, the encoder trunk of amortized guides, and a small 28x28 conv decoder.

Architectures are registered by name (:data:`ARCHITECTURES`), so a decoder family is one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


#: decoder network factory(latent_dim, hidden, out_dim, activation) -> z -> out_dim values
NetworkFactory = Callable[[int, Sequence[int], int, str], nn.Module]
#: (factory, the output widths it supports or ``None`` for any) by name
ARCHITECTURES: Registry[tuple[NetworkFactory, tuple[int, ...] | None]] = Registry("architecture")
ARCHITECTURES.register("mlp")((lambda k, hidden, out, act: MLP([k, *hidden, out], act), None))
ARCHITECTURES.register("conv")((lambda k, hidden, out, act: ConvNet28(k, act), (784,)))


def decoder_network(architecture: str, latent_dim: int, hidden: Sequence[int], out_dim: int,
                    activation_name: str) -> nn.Module:
    factory, widths = ARCHITECTURES[architecture]
    if widths is not None and out_dim not in widths:
        raise ValueError(f"architecture: {architecture!r} makes outputs of width {widths}, but the data has "
                         f"{out_dim} features; use --architecture mlp")
    return factory(latent_dim, hidden, out_dim, activation_name)
