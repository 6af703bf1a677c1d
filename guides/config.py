from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GuideConfig:
    """Network sizes shared by the amortized guides."""

    #: hidden layer sizes of the encoder MLP; ``()`` makes a linear encoder
    hidden: tuple[int, ...] = (64,)
    #: hidden layer sizes of each flow transform's hypernetwork
    flow_hidden: tuple[int, ...] = (64,)
    #: encoder nonlinearity, a name in ``models.vae.ACTIVATIONS``
    activation: str = "relu"
    #: initial posterior standard deviation of the Gaussian heads
    init_scale: float = 0.1
    #: features of the conditioning context handed to flows (0: the encoder's last hidden layer)
    context_dim: int = 0
