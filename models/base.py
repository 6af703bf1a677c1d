"""Shared pieces of every latent-variable model: the data plate, input checks, the base class."""

from __future__ import annotations

from typing import ClassVar

import pyro
import torch
from pyro.distributions import Distribution
from pyro.nn import PyroModule

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


def check_matrix(x: object, *, name: str = "data", width: int | None = None) -> torch.Tensor:
    """Return ``x`` as a 2-D floating tensor or raise a ``ValueError`` that says what is wrong."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # noqa: BLE001 - anything torch cannot read is bad input
            raise ValueError(f"{name}: cannot be read as a numeric array ({e})") from None
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D array (points x features), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 points)")
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name}: expected {width} features per point, got {x.shape[1]}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(-1).nonzero().flatten()
        kinds = "NaN" if torch.isnan(x).any() else "inf"
        raise ValueError(
            f"{name}: contains {kinds} values in {len(rows)} of {x.shape[0]} rows "
            f"(first bad row: {int(rows[0])}); clean or impute the data first"
        )
    return x


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
