r"""Reference posteriors by NUTS, and variational posteriors scored against them on identifiable quantities.

``nuts_reference(model, x, ...)`` runs Pyro's NUTS (Hoffman & Gelman 2014, with Stan's warm-up: step size by dual
averaging, a diagonal mass matrix from windowed adaptation) on a model's global latents and returns
``arviz.InferenceData``: ``posterior`` (each global site, plus the identifiable quantities of the model family),
``log_likelihood`` (log p(x_n | θ_s) per training point, so ``az.loo`` works), ``sample_stats`` (``diverging``),
with r̂ and ESS from ``az.summary``/``az.rhat``/``az.ess``. Chains run one after another in this process, each
under its own seed, so no worker processes are started and nothing global is touched.

``guide_posterior(model, guide, x, ...)`` draws θ ~ q(θ) from a fitted global guide into the same layout, and
:func:`posterior_errors` scores its means and standard deviations against the reference in the reference's
standard deviations. What is compared is the model family's business (:data:`SUMMARIES`, one entry per model):

* ``bayesian_fa``: W is identifiable only up to W R (R orthogonal), so μ, Ψ and C = W Wᵀ + diag Ψ are compared.
* ``gaussian_mixture``: the likelihood is invariant to permuting the components (label switching), so every
  draw — NUTS's and the guides' — is relabelled to one reference labelling (:func:`relabel_components`: each
  draw's component means matched to the reference's by least squares in units of the data's std), and the
  reference's components are ordered by decreasing weight, as :func:`~pyro_lvm.models.gaussian_mixture.component_order`
  orders a fit's. Compared: weights, means and covariances Σ_k.

The PSIS k̂ of a guide's joint importance weights over θ is :func:`pyro_lvm.evaluate.global_pareto_k`.

ArviZ is imported inside the functions (it takes seconds and pulls in matplotlib).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to

from pyro_lvm.models.base import LatentModel
from pyro_lvm.models.bayesian_fa import IDENTIFIABLE_NOTE, RotationQuotient
from pyro_lvm.registry import Registry
from pyro_lvm.runtime import local_params, seeded

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------- what each model family compares


@dataclass(frozen=True)
class PosteriorSummary:
    """How one model family's draws of θ are laid out and which functions of them are compared."""

    #: model -> dims (after chain, draw) of each global site and each identifiable quantity
    dims: Callable[[Any], dict[str, list[str]]]
    #: (model, θ draws (S, ...)) -> identifiable quantities (S, ...) by name
    identifiable: Callable[[Any, Params], Params]
    #: (model, θ draws (S, ...), reference or None) -> (relabelled draws, reference); ``None``: nothing to relabel
    relabel: Callable[[Any, Params, Params | None], tuple[Params, Params]] | None
    #: the quantities compared, in order; symmetric matrices among them are compared on their upper triangle
    compared: tuple[str, ...]
    #: one line on what is compared and why, written beside the numbers
    note: str
    #: model -> what NUTS samples instead of the model itself (a reparameterisation with the same posterior over
    #: the identifiable quantities; see :class:`NutsTarget`); ``None``: the model as it is
    nuts_target: Callable[[Any], NutsTarget] | None = None


class NutsTarget(Protocol):
    """A Pyro model for NUTS over sites ``sites`` whose draws map to draws of the model's globals (``to_globals``),
    started at ``initial_values`` (e.g. :class:`~pyro_lvm.models.bayesian_fa.RotationQuotient`)."""

    sites: tuple[str, ...]
    initial_values: Params

    def __call__(self, x: torch.Tensor) -> None: ...

    def to_globals(self, draws: Params) -> Params: ...


#: model name -> how its posteriors are summarised
SUMMARIES: Registry[PosteriorSummary] = Registry("posterior summary")

#: quantities whose last two dims are a symmetric matrix: only entries i <= j are compared
SYMMETRIC = frozenset({"cov"})


def _fa_dims(model: Any) -> dict[str, list[str]]:
    return {"W": ["feature", "latent"], "mu": ["feature"], "psi": ["feature"], "cov": ["feature_row", "feature_col"]}


def _fa_identifiable(model: Any, theta: Params) -> Params:
    return {"cov": model.identifiable(theta)["cov"]}


SUMMARIES.register("bayesian_fa", origin=(__name__, "bayesian_fa"))(PosteriorSummary(
    _fa_dims, _fa_identifiable, None, ("mu", "psi", "cov"),
    IDENTIFIABLE_NOTE + "; NUTS samples W with its rotations factored out (RotationQuotient: the same posterior "
    "over mu, psi, cov), its W draws turned by Haar-random orthogonal matrices", RotationQuotient))


def _mixture_dims(model: Any) -> dict[str, list[str]]:
    square = ["component", "feature_row", "feature_col"]
    return {"weights": ["component"], "locs": ["component", "feature"], "scales": ["component", "feature"],
            "corr_chol": square, "cov": square}


def _mixture_identifiable(model: Any, theta: Params) -> Params:
    return {"cov": model.component_covariances(theta)}


def relabel_components(model: Any, theta: Params, reference: Params | None = None) -> tuple[Params, Params]:
    r"""Every draw's components permuted to one labelling; returns (relabelled draws, the reference).

    Each draw s gets the permutation π_s minimising Σ_k Σ_d ((μ_{s,π(k),d} − m_{k,d}) / σ̂_d)², its component
    means against the reference means m (σ̂: the data's std). With no ``reference``, m starts at the model's
    k-means++ start (``initial_values``) and is refined once as the mean of the relabelled draws (two passes of
    Stephens's 2000 relabelling by matching); the components are then ordered by decreasing mean weight (as
    ``component_order``), and that ordered mean is the reference returned. Pass a reference returned earlier
    (NUTS's) to put other draws (a guide's) into the same labelling.
    """
    from scipy.optimize import linear_sum_assignment

    from pyro_lvm.models.gaussian_mixture import component_order

    scale = model.data_scale.to(theta["locs"])
    locs = theta["locs"] / scale  # (S, K, D)

    def match(ref_locs: torch.Tensor) -> torch.Tensor:
        cost = torch.cdist(locs, (ref_locs / scale).expand_as(locs)) ** 2  # (S, K_draw, K_ref)
        perms = [linear_sum_assignment(c.T.numpy())[1] for c in cost.detach().cpu()]  # ref k -> draw component
        return torch.as_tensor(np.stack(perms), device=locs.device)  # (S, K)

    def apply(perm: torch.Tensor) -> Params:
        out = {}
        for k, v in theta.items():
            index = perm.reshape(perm.shape + (1,) * (v.dim() - 2)).expand(perm.shape + v.shape[2:])
            out[k] = v.gather(1, index)
        return out

    if reference is None:
        start = model.initial_values if model.initial_values is not None else {k: v[0] for k, v in theta.items()}
        relabelled = apply(match(start["locs"].to(theta["locs"])))
        relabelled = apply(match(relabelled["locs"].mean(0)))
        mean = {k: v.mean(0) for k, v in relabelled.items()}
        order = component_order(mean)
        reference = {k: v.index_select(0, order) for k, v in mean.items()}
    return apply(match(reference["locs"])), reference


SUMMARIES.register("gaussian_mixture", origin=(__name__, "gaussian_mixture"))(PosteriorSummary(
    _mixture_dims, _mixture_identifiable, relabel_components, ("weights", "locs", "cov"),
    "the mixture's likelihood is invariant to permuting components (label switching): every draw of NUTS and of "
    "each guide is relabelled to one reference labelling (component means matched to NUTS's posterior mean), "
    "components ordered by decreasing NUTS posterior-mean weight; compared are weights, locs and the component "
    "covariances cov"))


def summary_for(model: LatentModel) -> PosteriorSummary:
    """The :class:`PosteriorSummary` of ``model``'s family; a family without one is refused, naming those with one."""
    if model.name not in SUMMARIES:
        raise ValueError(f"model: no posterior summary for {model.name!r} (its identifiable quantities are not "
                         f"declared); models with one: {', '.join(SUMMARIES.names())}")
    return SUMMARIES[model.name]


# ---------------------------------------------------------------------- NUTS


def check_global_only(model: LatentModel, x: torch.Tensor) -> None:
    """NUTS needs every latent continuous and global: a discrete site (an assignment the model samples rather than
    sums out) or a per-point latent is refused, naming it."""
    with local_params(model), torch.no_grad(), seeded(0):
        tr = poutine.trace(model).get_trace(x[:2])
    latent = [s for s in tr.nodes.values() if s["type"] == "sample" and not s["is_observed"]
              and type(s["fn"]).__name__ != "_Subsample"]
    for site in latent:
        if site["fn"].support.is_discrete:
            raise ValueError(f"model: NUTS needs continuous latents, and {model.name} samples the discrete site "
                             f"{site['name']!r}; build it with the site summed out (for the mixture: "
                             "assignments='collapsed')")
        if site["name"] not in model.global_sites:
            raise ValueError(f"model: NUTS here samples global latents only, and {model.name} has the site "
                             f"{site['name']!r} outside its global_sites {model.global_sites}; use a model with "
                             "its local latents integrated out")


def jittered_init(values: Params | None, jitter: float) -> Callable[[dict[str, Any]], torch.Tensor]:
    """A Pyro ``init_loc_fn``: each site at ``values`` moved by N(0, jitter²) in the unconstrained space (drawn from
    torch's RNG), so chains start apart but near a good point; sites without a value start at the prior median."""
    from pyro.infer.autoguide.initialization import init_to_median

    def init(site: dict[str, Any]) -> torch.Tensor:
        if values is None or site["name"] not in values:
            return init_to_median(site)
        value = values[site["name"]]
        transform = biject_to(site["fn"].support)
        u = transform.inv(value)
        return transform(u + jitter * torch.randn_like(u)).detach()

    return init


@contextlib.contextmanager
def _quiet_mcmc_logger() -> Iterator[None]:
    """Pyro's MCMC resets the handlers of the ``pyro.infer.mcmc`` logger and turns off its propagation on every run;
    both are restored afterwards."""
    logger = logging.getLogger("pyro.infer.mcmc")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)


def nuts_reference(
    model: LatentModel,
    x: object,
    *,
    num_samples: int = 500,
    warmup: int = 500,
    chains: int = 2,
    seed: int | None = 0,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 8,
    jitter: float = 0.5,
    jit: bool = True,
    progress: bool = False,
) -> Any:
    r"""NUTS draws of ``model``'s global latents given training data ``x``, as ``arviz.InferenceData``.

    The model must have only continuous global latents (:func:`check_global_only`): the Bayesian factor model
    (z summed out) and the mixture with ``assignments="collapsed"`` (c summed out). What NUTS samples is the
    family's ``nuts_target`` where it declares one (the factor model: W with its rotations factored out,
    :class:`~pyro_lvm.models.bayesian_fa.RotationQuotient`, whose draws map back to draws of the model's W, μ, Ψ),
    else the model itself. Each of ``chains`` chains runs ``warmup`` adaptation steps (step size by dual
    averaging towards ``target_accept_prob``, a diagonal mass matrix) and keeps ``num_samples`` draws, started
    at the initial values moved by N(0, ``jitter``²) in the unconstrained space (:func:`jittered_init`), so r̂
    compares chains that started apart. ``jit`` compiles the potential energy with the PyTorch JIT (2-3x faster
    steps on small models; the same numbers up to rounding). Chain c runs under ``seeded(seed + c)`` and the
    map back under ``seeded(seed)`` (``seed=None``: the caller's RNG), with module-local parameters, one chain
    after another in this process; the caller's RNG, Pyro settings and Pyro's MCMC logger are left as they were.

    Groups: ``posterior`` (chain, draw, ...): every global site of the model, the family's identifiable
    quantities (:data:`SUMMARIES`; the mixture's draws relabelled by :func:`relabel_components`) and the target's
    own sites where they differ (``W_free``, ``W_diag``); ``log_likelihood`` ``x`` (chain, draw, point) =
    log p(x_n | θ_s), so ``az.loo`` works; ``sample_stats`` ``diverging``; ``observed_data`` ``x``. Attributes of
    ``posterior``: ``model``, ``num_samples``, ``warmup``, ``chains``, ``seed``, ``step_size``, ``accept_prob``
    and ``divergences`` per chain, ``seconds`` (wall time), ``note`` (what is compared and how NUTS sampled) and
    the library versions. r̂ and ESS: ``az.summary(idata, var_names=[...])`` or :func:`nuts_diagnostics`.
    """
    import arviz as az
    from pyro.infer import MCMC, NUTS

    from pyro_lvm.saving import library_version

    for name, v in (("num_samples", num_samples), ("warmup", warmup), ("chains", chains),
                    ("max_tree_depth", max_tree_depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup" else 1):
            raise ValueError(f"{name}: must be an integer >= {0 if name == 'warmup' else 1}, got {v!r}")
    if not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob: must be in (0, 1), got {target_accept_prob!r}")
    if not (math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter: must be a finite number >= 0, got {jitter!r}")
    summary = summary_for(model)
    x = model.validate_training(x, name="x")
    check_global_only(model, x)
    target = summary.nuts_target(model) if summary.nuts_target is not None else None
    sampled = target if target is not None else model
    sites = tuple(target.sites) if target is not None else tuple(model.global_sites)
    start_values = target.initial_values if target is not None else getattr(model, "initial_values", None)
    dims = summary.dims(model)
    coords = {"point": np.arange(x.shape[0]), "feature": np.arange(model.data_dim),
              "feature_row": np.arange(model.data_dim), "feature_col": np.arange(model.data_dim)}
    parts, draws, stats = [], [], {"step_size": [], "accept_prob": [], "divergences": []}
    start = time.perf_counter()
    for c in range(chains):
        with local_params(model), seeded(None if seed is None else seed + c), _quiet_mcmc_logger():
            kernel = NUTS(sampled, target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth,
                          init_strategy=jittered_init(start_values, jitter), jit_compile=jit, ignore_jit_warnings=True,
                          )
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=not progress)
            mcmc.run(x)
            diag = mcmc.diagnostics()
            stats["step_size"].append(float(kernel.step_size))
            stats["accept_prob"].append(float(next(iter(diag["acceptance rate"].values()))))
            stats["divergences"].append(len(next(iter(diag["divergences"].values()))))
            draws.append({k: v.detach() for k, v in mcmc.get_samples().items()})
            # the posterior is rebuilt below; from_pyro gives sample_stats (diverging). Its log_likelihood is
            # computed below too: Pyro's vectorised Predictive, which from_pyro uses, mis-shapes global sites with
            # event dims outside every plate (W, the mixture's weights)
            parts.append(az.from_pyro(mcmc, log_likelihood=False, coords=coords,
                                      dims={k: v for k, v in dims.items() if k in sites}))
    seconds = time.perf_counter() - start
    idata = parts[0] if chains == 1 else az.concat(*parts, dim="chain")
    raw = {k: torch.cat([d[k] for d in draws]) for k in sites}  # (C·S, ...), chains one after another
    with torch.no_grad(), seeded(seed):
        theta = target.to_globals(raw) if target is not None else raw
        theta = {k: theta[k] for k in model.global_sites}
        theta, _ = _relabel(summary, model, theta, None)
        values = {**{k: v for k, v in raw.items() if k not in theta}, **theta, **summary.identifiable(model, theta)}
        log_lik = torch.stack([model.log_likelihood_at(x, {k: v[s] for k, v in theta.items()})
                               for s in range(chains * num_samples)])  # (C·S, N): log p(x_n | θ_s)
    arrays = {k: v.reshape((chains, num_samples) + v.shape[1:]).cpu().numpy() for k, v in values.items()}
    attrs = {"model": model.name, "num_samples": num_samples, "warmup": warmup, "chains": chains,
             "target_accept_prob": target_accept_prob, "max_tree_depth": max_tree_depth, "seconds": seconds,
             "sampled": type(sampled).__name__, "note": summary.note, "pyro_lvm_version": str(library_version()),
             "pyro_version": str(pyro.__version__), "arviz_version": str(az.__version__), **stats}
    if seed is not None:
        attrs["seed"] = int(seed)
    chain_coords = {**coords, "chain": np.arange(chains)}
    idata.posterior = az.dict_to_dataset(arrays, library=pyro, coords=chain_coords, dims=dims, attrs=attrs)
    idata.sample_stats = idata.sample_stats.assign_coords(chain=np.arange(chains))
    idata.add_groups(log_likelihood=az.dict_to_dataset(
        {"x": log_lik.reshape(chains, num_samples, -1).cpu().numpy()}, library=pyro, coords=chain_coords,
        dims={"x": ["point"]}))
    idata.observed_data = az.dict_to_dataset({"x": x.cpu().numpy()}, library=pyro, coords=coords,
                                             dims={"x": ["point", "feature"]}, default_dims=[])
    return idata


def _relabel(summary: PosteriorSummary, model: Any, theta: Params, reference: Params | None
             ) -> tuple[Params, Params | None]:
    if summary.relabel is None:
        return theta, None
    return summary.relabel(model, theta, reference)


def reference_labels(model: Any, idata: Any) -> Params | None:
    """The labelling of a reference posterior (its relabelled posterior mean), for :func:`guide_posterior`;
    ``None`` for a family with no labels to switch."""
    if summary_for(model).relabel is None:
        return None
    return {k: torch.as_tensor(idata.posterior[k].mean(("chain", "draw")).values) for k in model.global_sites}


def nuts_diagnostics(idata: Any, var_names: Sequence[str]) -> dict[str, Any]:
    """Largest r̂ (rank-normalised split r̂, Vehtari et al. 2021), smallest bulk and tail ESS over every scalar
    of ``var_names``, and the divergences, of a :func:`nuts_reference` posterior."""
    import arviz as az

    with np.errstate(invalid="ignore", divide="ignore"):
        rhat = az.rhat(idata, var_names=list(var_names))
        bulk = az.ess(idata, var_names=list(var_names), method="bulk")
        tail = az.ess(idata, var_names=list(var_names), method="tail")

    def extreme(ds: Any, fn: Callable[[np.ndarray], float]) -> float:
        values = np.concatenate([np.ravel(ds[v].values) for v in var_names])
        values = values[np.isfinite(values)]
        return float(fn(values)) if values.size else math.nan

    return {"r_hat_max": extreme(rhat, np.max), "ess_bulk_min": extreme(bulk, np.min),
            "ess_tail_min": extreme(tail, np.min),
            "divergences": int(np.asarray(idata.sample_stats["diverging"].values).sum()),
            "draws": int(idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"])}


# ---------------------------------------------------------------------- variational posteriors in the same layout


@torch.no_grad()
def guide_posterior(model: LatentModel, guide: Any, x: object, *, num_samples: int = 1000, seed: int | None = 0,
                    reference: Params | None = None) -> Any:
    """``num_samples`` draws θ ~ q(θ) of a fitted global guide as ``InferenceData`` laid out as
    :func:`nuts_reference`'s ``posterior`` (one chain), relabelled to ``reference``
    (:func:`reference_labels` of the NUTS run) where the family has labels. A point mass (``map``) gives
    ``num_samples`` equal draws. ``x`` only builds the guide's parameters on first use."""
    import arviz as az

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: must be an integer >= 1, got {num_samples!r}")
    summary = summary_for(model)
    x = model.validate(x, name="x")
    shapes = {k: v.shape for k, v in guide.point_estimate(x).items()}
    with local_params(model, guide), seeded(seed):
        draws = [guide.sample_globals(x) for _ in range(num_samples)]
    theta = {k: torch.stack([d[k].reshape(shapes[k]) for d in draws]) for k in model.global_sites}
    theta, _ = _relabel(summary, model, theta, reference)
    values = {**theta, **summary.identifiable(model, theta)}
    coords = {"feature": np.arange(model.data_dim), "feature_row": np.arange(model.data_dim),
              "feature_col": np.arange(model.data_dim)}
    attrs = {"model": model.name, "guide": str(getattr(guide, "spec", type(guide).__name__)),
             "num_samples": num_samples, "note": summary.note}
    if seed is not None:
        attrs["seed"] = int(seed)
    posterior = az.dict_to_dataset({k: v.cpu().numpy()[None] for k, v in values.items()}, library=pyro,
                                   coords=coords, dims=summary.dims(model), attrs=attrs)
    return az.InferenceData(posterior=posterior)


def scalar_entries(idata: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Every scalar of ``names`` in ``idata.posterior`` as ``"name[i,j]" -> draws`` (chains pooled); symmetric
    matrices (:data:`SYMMETRIC`) contribute their upper triangle i <= j only."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        values = idata.posterior[name].values  # (chain, draw, ...)
        values = values.reshape((-1,) + values.shape[2:])
        shape = values.shape[1:]
        for index in itertools.product(*map(range, shape)):
            if name in SYMMETRIC and index[-2] > index[-1]:
                continue
            label = f"{name}[{','.join(map(str, index))}]" if index else name
            out[label] = values[(slice(None), *index)]
    return out


def posterior_errors(reference: Any, approx: Any, names: Sequence[str]) -> list[dict[str, Any]]:
    r"""Per scalar of ``names``: the reference's and the approximation's mean and sd, and their errors in the
    reference's standard deviations: ``mean_error`` z = (m_q − m_ref) / s_ref, ``sd_error`` = (s_q − s_ref) / s_ref,
    ``sd_ratio`` = s_q / s_ref (1: right width; < 1 too narrow; 0 for a point mass)."""
    ref, app = scalar_entries(reference, names), scalar_entries(approx, names)
    rows = []
    for label, r in ref.items():
        a = app[label]
        m_r, s_r, m_a, s_a = float(r.mean()), float(r.std(ddof=1)), float(a.mean()), float(a.std(ddof=1))
        s_r = s_r if s_r > 0 else math.nan
        s_a = 0.0 if s_a <= 1e-12 * max(1.0, abs(m_a)) else s_a  # a point mass's equal draws: rounding, not width
        rows.append({"name": label, "quantity": label.split("[")[0], "nuts_mean": m_r, "nuts_sd": s_r,
                     "mean": m_a, "sd": s_a, "mean_error": (m_a - m_r) / s_r, "sd_error": (s_a - s_r) / s_r,
                     "sd_ratio": s_a / s_r})
    return rows


def error_summary(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean and max |z| of the mean errors, mean and max |sd error|, and the sd ratio's geometric mean (``nan``
    when a ratio is 0, i.e. a point mass), min and max, over ``rows`` of :func:`posterior_errors`."""
    z = np.array([r["mean_error"] for r in rows], dtype=float)
    e = np.array([r["sd_error"] for r in rows], dtype=float)
    ratio = np.array([r["sd_ratio"] for r in rows], dtype=float)
    with np.errstate(divide="ignore"):
        geo = float(np.exp(np.mean(np.log(ratio)))) if (ratio > 0).all() else math.nan
    return {"count": len(rows), "mean_abs_mean_error": float(np.mean(np.abs(z))),
            "max_abs_mean_error": float(np.max(np.abs(z))), "mean_abs_sd_error": float(np.mean(np.abs(e))),
            "max_abs_sd_error": float(np.max(np.abs(e))), "sd_ratio_geomean": geo,
            "sd_ratio_min": float(ratio.min()), "sd_ratio_max": float(ratio.max())}


__all__ = ["SUMMARIES", "NutsTarget", "PosteriorSummary", "check_global_only", "error_summary", "guide_posterior",
           "jittered_init", "nuts_diagnostics", "nuts_reference", "posterior_errors", "reference_labels",
           "relabel_components", "scalar_entries", "summary_for"]
