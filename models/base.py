"""Shared pieces of every latent-variable model: the data plate, input checks, the base class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyro
import torch
from pyro.distributions import Distribution
from pyro.nn import PyroModule

from pyro_lvm.checks import check_matrix
from pyro_lvm.runtime import local_params, module_device, module_dtype, seeded

DATA_PLATE = "data"

#: ELBO estimators (names in ``pyro_lvm.train.ELBOS``) that train a model whose only latents are
#: reparameterized continuous sites; a model with discrete sites narrows the list (see :class:`ModelTraits`)
CONTINUOUS_ELBOS: tuple[str, ...] = ("trace", "meanfield", "jit", "tracegraph", "traceenum")


def data_plate(n: int, total_size: int | None = None, device: torch.device | None = None) -> pyro.plate:
    """The plate over data points, at dim -1, shared by every model and guide.

    ``total_size`` is the size of the full data set when ``n`` points are a minibatch: Pyro then
    scales the log-densities inside the plate by ``total_size / n`` so the ELBO stays an unbiased
    estimate of the full-data ELBO.
    """
    size = n if total_size is None else int(total_size)
    if size < n:
        raise ValueError(f"total_size={size} is smaller than the minibatch ({n} points)")
    subsample = torch.arange(n, device=device) if size != n else None
    return pyro.plate(DATA_PLATE, size=size, subsample=subsample, dim=-1, device=device)


def in_data_plate(site: dict) -> bool:
    """Whether a trace site (or a message being processed) sits inside the data plate: a per-point term."""
    return any(f.name == DATA_PLATE for f in site.get("cond_indep_stack", ()))


def row_blocks(x: Any) -> Any:
    """(first row, rows) of data for a rule checked row by row: the tensor itself in one block, or a split streamed
    from a file (:class:`pyro_lvm.data.MappedRows`) block by block, never all of it at once."""
    if hasattr(x, "blocks"):
        for start, values in x.blocks():
            yield start, torch.as_tensor(values, dtype=x.dtype)
    else:
        yield 0, x


@dataclass(frozen=True)
class ModelTraits:
    """What a model of a given config offers to guides, estimators and evaluators.

    Known from the config alone (no data, no parameters), so an experiment can check every guide and
    estimator against the model before it loads data or trains anything.
    """

    #: the registered model name
    name: str
    #: per-point continuous latent site the amortized guides target (``None``: no such site)
    local_site: str | None
    #: global latent sample sites (guided by autoguides)
    global_sites: tuple[str, ...]
    #: a per-point discrete site that a guide must propose (``None``: none, or summed out)
    local_discrete_site: str | None
    #: whether :meth:`LatentModel.exact_posterior` is implemented
    has_exact_posterior: bool
    #: estimator used when the caller names none
    default_elbo: str
    #: every estimator that optimises the right objective for this model, with the reason others are refused
    elbos: tuple[str, ...]
    elbo_note: str = ""
    #: ``False`` where the sites are only known once the model is built on data (a wrapped function before its
    #: data are loaded): a guide is then checked for its spelling only, and in full when the model is built
    structure_known: bool = True


class LatentModel(PyroModule):
    r"""Base class of the suite's Pyro models.

    A model is a callable ``model(x, total_size=None)`` with its local latents inside
    :func:`data_plate`; guides are callables with the same signature and the same site names.
    Subclasses that have closed forms override :meth:`log_likelihood` (exact log p(x)) and
    :meth:`exact_posterior` (p(z|x)); every model implements :meth:`_sample` for :meth:`sample`.

    Models are plain ``PyroModule``\ s: called inside Pyro's default (global parameter store) setting
    they behave as any Pyro model; the library's entry points (``fit``, ``evaluate``, ``save``/``load``,
    ``sample``) run them with ``module_local_params`` on, so models never share parameters.
    """

    #: set by :func:`~pyro_lvm.registry.register_model`
    name: ClassVar[str] = ""
    #: the config dataclass that builds this model (first field: ``data_dim``)
    Config: ClassVar[type]
    #: name of the per-point latent sample site the amortized guides target (``None``: no such site)
    local_site: ClassVar[str | None] = "z"
    #: names of global latent sample sites (guided by autoguides)
    global_sites: tuple[str, ...] = ()
    #: name of a per-point discrete site that a guide must propose (``None``: none, or summed out)
    local_discrete_site: str | None = None
    #: plates nested around any site (the data plate at dim -1 and any others): Pyro's particle plates go left
    max_plate_nesting: int = 1
    #: name in ``pyro_lvm.evaluate.EVALUATORS`` of the held-out bounds that fit this model
    evaluator: ClassVar[str] = "importance"
    #: whether :meth:`exact_posterior` is implemented
    has_exact_posterior: ClassVar[bool] = False
    #: name in ``pyro_lvm.train.ELBOS`` of the estimator this model trains with by default
    default_elbo: str = "trace"

    data_dim: int
    latent_dim: int

    @classmethod
    def traits_for(cls, config: object) -> ModelTraits:
        """The :class:`ModelTraits` of a model built from ``config`` (override where the config changes them)."""
        return ModelTraits(cls.name, cls.local_site, tuple(cls.global_sites), cls.local_discrete_site,
                           cls.has_exact_posterior, cls.default_elbo, CONTINUOUS_ELBOS)

    @property
    def traits(self) -> ModelTraits:
        return type(self).traits_for(self.config)

    @classmethod
    def example(cls, seed: int = 0) -> tuple[LatentModel, torch.Tensor]:
        """A tiny instance and data to match, used by the contract tests over every model x guide pair."""
        raise NotImplementedError(f"{cls.__name__} does not provide example()")

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    def validate(self, x: object, name: str = "data") -> torch.Tensor:
        """Check data at the boundary (2-D, right width, finite, representable in the model's dtype, squares
        finite there too) and return it as a tensor of the model's dtype on its device; subclasses add their
        own rules. Bad data raise one ``ValueError`` line starting with ``name``."""
        return check_matrix(x, name=name, width=self.data_dim, dtype=self.dtype, device=self.device,
                            finite_square=True)

    def validate_training(self, x: object, name: str = "training data") -> torch.Tensor:
        """Check training data: :meth:`validate` plus any rule that only training needs."""
        return self.validate(x, name)

    def init_from_data(self, x: object) -> None:
        """Data-dependent initialisation (default: none). Overrides call :meth:`validate_training` first."""

    def bind_guide(self, guide: object) -> None:
        """Called by :func:`pyro_lvm.build_guide` with each guide built for this model: a model whose density uses
        the guide (the VAE's VampPrior shares its encoder) keeps a reference; the default does nothing."""

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor | None:
        """Exact log p(x) per data point, or ``None`` where it is intractable."""
        return None

    def exact_posterior(self, x: torch.Tensor) -> Distribution:
        raise NotImplementedError(f"{type(self).__name__} has no closed-form posterior")

    def sample(self, n: int, *, mean: bool = False, guide: object = None, seed: int | None = None) -> torch.Tensor:
        """``n`` draws from the model, shape (n, data_dim): x ~ p(x), or with ``mean=True`` E[x | z] for z ~ p(z).

        Models whose globals are latent (the mixture) take them from ``guide`` (its point estimate).
        ``seed`` fixes the draws without touching the caller's RNG state.
        """
        if int(n) < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        with local_params(self, guide), seeded(seed), torch.no_grad():
            return self._sample(int(n), mean=mean, guide=guide)

    def _sample(self, n: int, *, mean: bool, guide: object) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement sampling")

    def _apply(self, fn: Any, recurse: bool = True) -> LatentModel:
        """``to``/``double``/``cuda``: a model's ``initial_values`` (a dict of plain tensors, not buffers, as its
        sites vary and it may be absent) follow its parameters to the new device and dtype, as buffers do, so a
        guide started from them on a GPU starts there."""
        super()._apply(fn, recurse)
        values = getattr(self, "initial_values", None)
        if values:
            self.initial_values = {k: fn(v) for k, v in values.items()}
        return self

    def _globals_to_sample_from(self, guide: object, what: str) -> dict[str, torch.Tensor]:
        """For models with latent globals: ``guide``'s point estimate of them, else the model's initial values;
        ``what`` names the model in the error asking for the guide."""
        if guide is not None:
            return guide.point_estimate(self.data_loc.unsqueeze(0))  # type: ignore[attr-defined]
        if getattr(self, "initial_values", None) is not None:
            return self.initial_values  # type: ignore[attr-defined]
        raise ValueError(f"guide: {what}'s globals are latent; pass the fitted guide, model.sample(n, guide=guide)")
