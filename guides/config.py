from __future__ import annotations

from dataclasses import dataclass

from pyro_lvm.config import ConfigError, ReadableConfig, check_choice, check_config
from pyro_lvm.nn import ACTIVATIONS, ARCHITECTURES


@dataclass
class GuideConfig(ReadableConfig):
    """Network sizes and kinds shared by the amortized guides."""

    #: hidden layer sizes of the encoder MLP; ``()`` makes a linear encoder (ignored by conv architectures)
    hidden: tuple[int, ...] = (64,)
    #: hidden layer sizes of each flow transform's hypernetwork
    flow_hidden: tuple[int, ...] = (64,)
    #: encoder nonlinearity, a name in ``pyro_lvm.nn.ACTIVATIONS`` (unused by the gated architectures,
    #: whose sigmoid gates are their nonlinearity)
    activation: str = "relu"
    #: encoder network, a name in ``pyro_lvm.nn.ARCHITECTURES``: mlp (also for conv), gated-mlp, or gated-conv
    #: (28x28 images only; ignores ``hidden``)
    architecture: str = "mlp"
    #: initial posterior standard deviation of the Gaussian heads
    init_scale: float = 0.1
    #: features of the conditioning context handed to flows (0: the encoder's last hidden layer)
    context_dim: int = 0

    def __post_init__(self) -> None:
        self.hidden, self.flow_hidden = tuple(self.hidden), tuple(self.flow_hidden)
        for name in ("hidden", "flow_hidden"):
            sizes = getattr(self, name)
            if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in sizes):
                raise ConfigError(name, f"layer sizes must be integers >= 1, got {sizes}")
        check_config(self, positive=("init_scale",), nonneg_int=("context_dim",))
        check_choice(self, "activation", ACTIVATIONS)
        check_choice(self, "architecture", ARCHITECTURES.names())
