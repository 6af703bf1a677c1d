"""Shared pieces of every latent-variable model: the data plate, input checks, the base class."""

from __future__ import annotations

from typing import ClassVar

import pyro
import torch
from pyro.distributions import Distribution
from pyro.nn import PyroModule

from pyro_lvm.checks import check_matrix

DATA_PLATE = "data"


def data_plate(n: int, total_size: int | None = None) -> pyro.plate:
    """The plate over data points, at dim -1, shared by every model and guide.

    ``total_size`` is the size of the full data set when ``n`` points are a minibatch: Pyro then
    scales the log-densities inside the plate by ``total_size / n`` so the ELBO stays an unbiased
    estimate of the full-data ELBO.
    """
    size = n if total_size is None else int(total_size)
    if size < n:
        raise ValueError(f"total_size={size} is smaller than the minibatch ({n} points)")
    return pyro.plate(DATA_PLATE, size=size, subsample=torch.arange(n) if size != n else None, dim=-1)


class LatentModel(PyroModule):
    """Base class of the suite's Pyro models.

    A model is a callable ``model(x, total_size=None)`` with its local latents inside
    :func:`data_plate`; guides are callables with the same signature and the same site names.
    Subclasses that have closed forms override :meth:`log_likelihood` (exact log p(x)) and
    :meth:`exact_posterior` (p(z|x)).
    """

    #: name of the per-point latent sample site the amortized guides target (``None``: no such site)
    local_site: ClassVar[str | None] = "z"
    #: names of global latent sample sites (guided by autoguides)
    global_sites: tuple[str, ...] = ()
    #: name of a per-point discrete site that a guide must propose (``None``: none, or summed out)
    local_discrete_site: str | None = None
    #: name in ``experiments.evaluate.EVALUATORS`` of the held-out bounds that fit this model
    evaluator: ClassVar[str] = "importance"
    #: whether :meth:`exact_posterior` is implemented
    has_exact_posterior: ClassVar[bool] = False

    #: name in ``experiments.train.ELBOS`` of the estimator this model trains with by default
    default_elbo: str = "trace"

    data_dim: int
    latent_dim: int

    @classmethod
    def example(cls, seed: int = 0) -> tuple[LatentModel, torch.Tensor]:
        """A tiny instance and data to match, used by the contract tests over every model x guide pair."""
        raise NotImplementedError(f"{cls.__name__} does not provide example()")

    def validate(self, x: object, name: str = "data") -> torch.Tensor:
        """Check data at the boundary: 2-D, right width, finite (subclasses add their own rules)."""
        return check_matrix(x, name=name, width=self.data_dim)

    def validate_training(self, x: object, name: str = "training data") -> torch.Tensor:
        """Check training data: :meth:`validate` plus any rule that only training needs."""
        return self.validate(x, name)

    def init_from_data(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation (default: none)."""

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor | None:
        """Exact log p(x) per data point, or ``None`` where it is intractable."""
        return None

    def exact_posterior(self, x: torch.Tensor) -> Distribution:
        raise NotImplementedError(f"{type(self).__name__} has no closed-form posterior")
