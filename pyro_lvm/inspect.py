r"""Any fit as ArviZ ``InferenceData``: posterior draws, replicated data, per-point likelihoods, importance weights.

``to_inference_data(model, guide, data)`` draws from the fitted guide for chosen points of ``data`` and collects
what ArviZ needs to inspect the fit (``az.summary``, ``az.plot_posterior``, ``az.loo``, ``to_netcdf``).
How a model's draws are made is its ``evaluator``'s entry in :data:`INSPECTORS` (``importance``: a continuous
local latent z ~ q(z|x); ``mixture``: global latents θ ~ q(θ) and an assignment c per point), so a new model
family adds an entry, not a branch.

ArviZ is imported inside the functions: importing it takes seconds and pulls in matplotlib, and importing
``pyro_lvm`` changes no global setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

from pyro_lvm.evaluate import PARETO_K_THRESHOLD, _draws_by_points, importance_traces, psis, trace_terms
from pyro_lvm.models.base import LatentModel, in_data_plate
from pyro_lvm.registry import Registry
from pyro_lvm.runtime import local_params, seeded

#: the most numbers (draws × points × (data_dim + latent_dim + 4)) one call may hold: 5e7 is 200 MB in
#: float32 and 400 MB in float64 before ArviZ's own copies. The default 200 draws of 1000 points fit for
#: data up to ~250 features; MNIST (784 pixels) needs ``max_points`` ≤ ~300 at 200 draws.
MAX_VALUES = 50_000_000

#: points × draws per chunk of the local-latent draws, as in evaluation (``EvalConfig.max_rows``)
MAX_ROWS = 25_000


@dataclass
class Draws:
    """What an inspector returns for S draws of P points; every array's leading dim is the draw.

    ``posterior`` maps a site to (S, ...) with ``dims`` naming its dims after the draw; ``x_rep`` (S, P, D)
    are replicated data; ``log_lik`` (S, P) the per-point log-likelihood; ``log_p``/``log_q`` (S, P) the two
    halves of each draw's log importance weight; ``coords`` any extra coordinates the dims need; ``note`` says
    in one line how the draws were made (stored as the ``draws`` attribute).
    """

    posterior: dict[str, np.ndarray]
    dims: dict[str, list[str]]
    x_rep: np.ndarray
    log_lik: np.ndarray
    log_p: np.ndarray
    log_q: np.ndarray
    coords: dict[str, Any] = field(default_factory=dict)
    note: str = ""


Inspector = Callable[[LatentModel, Any, torch.Tensor, int], Draws]
#: model.evaluator -> how to draw from a fit for inspection
INSPECTORS: Registry[Inspector] = Registry("inspector")


@INSPECTORS.register("importance")
def local_latent_draws(model: LatentModel, guide: Any, x: torch.Tensor, num_samples: int) -> Draws:
    r"""z_{s,n} ~ q(z|x_n) and x^{rep}_{s,n} ~ p(x | z_{s,n}), with log p(x_n | z), log p(x_n, z) and log q(z|x_n).

    Draws in chunks of at most :data:`MAX_ROWS` (points × draws), through the same Pyro traces as
    evaluation (a particle plate left of the data plate), so every guide is scored as the ELBO sees it.
    """
    n, (k, d) = x.shape[0], (model.latent_dim, model.data_dim)
    dtype = _numpy_dtype(x)
    z = np.empty((num_samples, n, k), dtype)
    x_rep = np.empty((num_samples, n, d), dtype)
    log_lik, log_p, log_q = (np.empty((num_samples, n), dtype) for _ in range(3))
    global_sites = tuple(getattr(model, "global_sites", ()))
    theta_draws: dict[str, list[np.ndarray]] = {}
    discrete: dict[str, np.ndarray] = {}
    points = max(1, min(n, MAX_ROWS // num_samples))
    # with global latents each draw s is a joint one: θ_s ~ q(θ), then z_{s,n} ~ q(z|x_n) scored at θ_s
    samples = 1 if global_sites else max(1, min(num_samples, MAX_ROWS // points))
    local = getattr(guide, "local", guide)

    def fill(s0: int, s: int, p0: int) -> None:
        xb = x[p0:p0 + points]
        p1 = p0 + xb.shape[0]
        guide_tr, model_tr = importance_traces(model, local, xb, s)
        t = trace_terms(model, guide_tr, model_tr, (s, xb.shape[0]))
        z[s0:s0 + s, p0:p1] = _np(t["z"])
        log_lik[s0:s0 + s, p0:p1] = _np(t["log_lik"])
        log_p[s0:s0 + s, p0:p1] = _np(t["log_lik"] + t["log_prior"])
        log_q[s0:s0 + s, p0:p1] = _np(t["log_q"])
        rep, sites = _replicate(model_tr, (s, xb.shape[0], d))
        x_rep[s0:s0 + s, p0:p1] = _np(rep)
        for name, v in sites.items():  # discrete sites summed out in the model: drawn from p(c | z, x)
            discrete.setdefault(name, np.zeros((num_samples, n), np.int64))[s0:s0 + s, p0:p1] = _np(v)

    if global_sites:
        for s0 in range(num_samples):
            theta = guide.sample_globals(x)
            for name, v in theta.items():
                theta_draws.setdefault(name, []).append(_np(v))
            with poutine.condition(data=theta):
                for p0 in range(0, n, points):
                    fill(s0, 1, p0)
    else:
        for p0 in range(0, n, points):
            for s0 in range(0, num_samples, samples):
                fill(s0, min(samples, num_samples - s0), p0)
    if hasattr(model, "unpack_draws"):  # a wrapped function: each local site under its name, in its support
        posterior, dims = model.unpack_draws(z)
    else:
        posterior, dims = {model.local_site: z}, {model.local_site: ["point", "latent"]}
    for name, values in discrete.items():
        posterior[name], dims[name] = values, ["point"]
    for name, values in theta_draws.items():  # each global under its own name, its dims named after it
        posterior[name] = np.stack(values)
        dims[name] = [f"{name}_dim_{i}" for i in range(posterior[name].ndim - 1)]
    note = "z ~ q(z|x); x_rep ~ p(x|z) at each draw of z; log_likelihood = log p(x|z)"
    if global_sites:
        note = ("theta ~ q(theta), then z ~ q(z|x) at each draw; x_rep ~ p(x|z,theta); "
                "log_likelihood = log p(x|z,theta)")
    return Draws(posterior, dims, x_rep, log_lik, log_p, log_q, note=note)


@INSPECTORS.register("mixture")
def mixture_draws(model: Any, guide: Any, x: torch.Tensor, num_samples: int) -> Draws:
    r"""θ_s ~ q(θ), c_{s,n} ~ q(c|x_n), x^{rep}_{s,n} ~ N(μ_c, Σ_c) under θ_s, and log p(x_n | θ_s).

    q(c|x) is the guide's amortized assignment posterior where it has one, else the exact p(c | x_n, θ_s)
    (c summed out or enumerated), as in evaluation. Components are ordered by the weights of the guide's
    point estimate θ̂ (largest first, as the experiment's ``write_posterior``), so every draw, and c, carries
    one labelling; a point mass (``map``) gives S equal draws of θ.
    """
    from pyro_lvm.models.gaussian_mixture import component_order, reorder

    order = component_order(guide.point_estimate(x))
    relabel = torch.argsort(order)  # old component index -> its rank by weight
    q_logits = guide.assignments.distribution(x).logits if guide.assignments is not None else None
    n, d = x.shape
    dtype = _numpy_dtype(x)
    theta_draws: dict[str, list[np.ndarray]] = {}
    c_draws = np.empty((num_samples, n), np.int64)
    x_rep = np.empty((num_samples, n, d), dtype)
    log_lik, log_p, log_q = (np.empty((num_samples, n), dtype) for _ in range(3))
    shapes = {k: v.shape for k, v in guide.point_estimate(x).items()}
    for s in range(num_samples):
        theta = {k: v.reshape(shapes[k]) for k, v in guide.sample_globals(x).items()}  # no plate padding
        lj = model.log_joint(x, theta)  # (N, K): log π_k + log N(x_n; μ_k, Σ_k)
        lp = torch.logsumexp(lj, -1)
        logits = q_logits if q_logits is not None else lj - lp.unsqueeze(-1)
        logits = torch.log_softmax(logits, -1)
        c = torch.distributions.Categorical(logits=logits).sample()  # (N,)
        chosen = {k: theta[k][c] for k in model.covariance.sites}
        x_rep[s] = _np(model.covariance.component(theta["locs"][c], chosen).sample())
        log_lik[s], c_draws[s] = _np(lp), _np(relabel[c])
        log_p[s] = _np(lj.gather(-1, c.unsqueeze(-1)).squeeze(-1))
        log_q[s] = _np(logits.gather(-1, c.unsqueeze(-1)).squeeze(-1))
        for k, v in reorder(theta, order).items():
            theta_draws.setdefault(k, []).append(_np(v))
    posterior = {k: np.stack(v) for k, v in theta_draws.items()}
    posterior["c"] = c_draws
    dims = {"weights": ["component"], "locs": ["component", "feature"], "scales": ["component", "feature"],
            "corr_chol": ["component", "feature_row", "feature_col"], "c": ["point"]}
    return Draws(posterior, {k: dims[k] for k in posterior}, x_rep, log_lik, log_p, log_q,
                 coords={"component": np.arange(model.num_components)},
                 note="theta ~ q(theta); c ~ q(c|x) (or p(c|x,theta) when c is exact); x_rep ~ p(x|c,theta); "
                      "log_likelihood = log p(x|theta)")


def to_inference_data(
    model: LatentModel,
    guide: Any,
    data: object,
    *,
    num_samples: int = 200,
    points: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    max_points: int = 1000,
    seed: int | None = None,
    feature_names: Sequence[str] | None = None,
) -> Any:
    r"""A fitted model and guide as ``arviz.InferenceData``, from ``num_samples`` draws for chosen points of ``data``.

    ``data`` is an array, tensor or DataFrame (points, features), checked by ``model.validate``. ``points`` are
    indices into it (distinct, in range); by default the first ``min(N, max_points)`` points (data files that
    are ordered, such as binarized MNIST, need a random ``points`` to be representative). The draws hold
    ``num_samples × points × (data_dim + latent_dim + 4)`` numbers, refused above :data:`MAX_VALUES`
    (5e7; 200 draws × 1000 points fit up to ~250 features). Everything runs with module-local parameters, in
    eval mode, without gradients and under ``seeded(seed)`` (``None``: the caller's RNG); no global state is
    changed. Groups, each of one chain (``chain`` = 1, ``draw`` = ``num_samples``):

    * ``posterior``: local-latent models (factor analysis, PPCA, VAEs): ``z`` (chain, draw, point, latent),
      z ~ q(z|x). The Gaussian mixture: its global latents from q(θ), components ordered by the point
      estimate's weights (``weights`` (…, component), ``locs`` and ``scales`` (…, component, feature),
      ``corr_chol`` (…, component, feature_row, feature_col) for full covariances) and each point's assignment
      ``c`` (chain, draw, point) in that labelling, drawn from q(c|x) (the amortized guide) or p(c|x, θ_s).
      Point-estimated globals (W, μ, Ψ, decoder weights) are parameters, not draws, and are not included.
    * ``posterior_predictive``: ``x`` (chain, draw, point, feature), a replicate of each point drawn given that
      draw's latents: x ~ p(x | z_s) for local-latent models; for the mixture x ~ N(μ_c, Σ_c) under θ_s with
      the assignment c drawn above (a replicate of the point's own component, not a fresh draw from the mixture).
    * ``log_likelihood``: ``x`` (chain, draw, point). For the mixture log p(x_n | θ_s), c summed out: the
      pointwise likelihood over draws of the globals, so ``az.loo``/``az.waic`` are PSIS-LOO/WAIC with q(θ)
      standing in for the posterior (pass the training data for an out-of-sample estimate; their k̂ also
      flags draws where q(θ) is a poor stand-in). For models whose globals are point estimates (factor
      analysis, PPCA, VAEs) it is log p(x_n | z_{s,n}) with z_{s,n} ~ q(z|x_n): each point's likelihood given
      its *own* latent draw. ``az.loo`` over it is not a model comparison: leaving x_n out of the posterior of
      its own z_n leaves the prior p(z_n), so its elpd is the harmonic-mean estimate
      log 1/E_q[1/p(x_n|z)] of log p(x_n) (exact only when q = p(z|x_n), and of infinite variance in
      general), with the globals held fixed; compare such models by ``pyro_lvm.evaluate``'s held-out bounds.
    * ``sample_stats``: ``log_p`` = log p(x_n, z_{s,n}) and ``log_q`` = log q(z_{s,n}|x_n) (chain, draw,
      point), whose difference is each draw's log importance weight (for the mixture: log p(x_n, c | θ_s)
      and log q(c|x_n)), and ``pareto_k`` (point): the PSIS k̂ of each point's weights over the draws
      (``pyro_lvm.evaluate.psis``: NaN below 21 draws, −inf where the weights are constant, e.g. the exact
      posterior or a ``map`` mixture with exact assignments).
      For every continuous local latent ``v`` (a float posterior variable whose first dim is ``point``: ``z``
      where the model has one; not the mixture's discrete ``c``), also, per point and without the
      draw dims: ``v_mean_raw`` = (1/S) Σ_s v_s, the guide's Monte Carlo mean, and ``v_mean_psis`` =
      Σ_s w̃_s v_s, the PSIS-corrected posterior mean, with w̃_s = exp(log w̃_s) / Σ_t exp(log w̃_t) the
      Pareto-smoothed, normalised importance weights of that point's draws (log w = log_p − log_q,
      smoothed by ``pyro_lvm.evaluate.psis``). ``v_mean_psis`` estimates E_p[v | x_n] under the model's
      posterior, not the guide's; it is NaN where it cannot be trusted: k̂ > 0.7 (the weights are too
      heavy-tailed; Vehtari et al. 2024) or k̂ not estimated (fewer than 21 draws). Where k̂ = −inf (constant
      weights, the exact posterior) it equals ``v_mean_raw``.
    * ``observed_data``: ``x`` (point, feature), the chosen points.

    Coordinates: ``point`` (the indices into ``data``), ``latent`` (0..k−1), ``feature`` (``feature_names``,
    else a DataFrame's column names, else 0..D−1), ``component`` (0..K−1, by decreasing weight). Attributes
    of every group: ``model`` (registered name), ``guide`` (``guide.spec``), ``num_samples``, ``seed`` (when
    given), ``draws`` (one line on how they were made) and the versions of pyro_lvm, Pyro, torch and ArviZ; no
    ``created_at`` (ArviZ's wall-clock stamp is removed, so one seed gives the same InferenceData and ``.nc`` bytes).
    """
    import arviz as az

    from pyro_lvm.saving import library_version
    from pyro_lvm.wrap import model_for

    model = model_for(model, guide)
    num_samples = _positive_int(num_samples, "num_samples")
    max_points = _positive_int(max_points, "max_points")
    if feature_names is None and hasattr(data, "columns"):
        feature_names = [str(c) for c in data.columns]
    x = model.validate(data, name="data")
    n, d = x.shape
    index = _point_indices(points, n, max_points)
    features = _feature_coords(feature_names, d)
    size = num_samples * len(index) * (d + model.latent_dim + 4)
    if size > MAX_VALUES:
        raise ValueError(f"to_inference_data: {num_samples} draws x {len(index)} points x ({d} features + "
                         f"{model.latent_dim} latents + 4) = {size:,} numbers, more than MAX_VALUES = {MAX_VALUES:,}; "
                         "pass fewer points (points=..., max_points=...) or num_samples")
    inspector = INSPECTORS[model.evaluator]
    xp = x[torch.as_tensor(index, device=x.device)]
    with _eval_mode(model, guide), local_params(model, guide), seeded(seed), torch.no_grad():
        draws = inspector(model, guide, xp, num_samples)
        smoothed, pareto_k = psis(torch.from_numpy(draws.log_p - draws.log_q))  # in the model's dtype: see psis

    attrs: dict[str, Any] = {
        "model": model.name, "guide": str(getattr(guide, "spec", type(guide).__name__)),
        "num_samples": num_samples, "pyro_lvm_version": str(library_version()), "pyro_version": str(pyro.__version__),
        "torch_version": str(torch.__version__), "arviz_version": str(az.__version__), "draws": draws.note,
    }
    if seed is not None:
        attrs["seed"] = int(seed)
    coords = {"point": index, "latent": np.arange(model.latent_dim), "feature": features,
              "feature_row": features, "feature_col": features, **draws.coords}

    def group(values: dict[str, np.ndarray], dims: dict[str, list[str]], sampled: bool = True) -> Any:
        values = {k: v[None] for k, v in values.items()} if sampled else values  # one chain
        used = {dim for v in dims.values() for dim in v}
        ds = az.dict_to_dataset(values, attrs=attrs, library=pyro, dims=dims,
                                coords={k: v for k, v in coords.items() if k in used},
                                default_dims=None if sampled else [])
        ds.attrs.pop("created_at", None)  # ArviZ's wall-clock stamp: without it, one seed writes the same .nc bytes
        return ds

    sample_stats = group({"log_p": draws.log_p, "log_q": draws.log_q}, {"log_p": ["point"], "log_q": ["point"]})
    sample_stats["pareto_k"] = ("point", pareto_k.numpy())
    for name, (raw, corrected) in psis_means(draws, smoothed, pareto_k).items():
        dims = draws.dims[name]
        for suffix, values in (("raw", raw), ("psis", corrected)):
            sample_stats[f"{name}_mean_{suffix}"] = (dims, values)
    sample_stats = sample_stats.assign_coords({k: coords[k] for k in sample_stats.dims
                                               if k in coords and k not in sample_stats.coords})
    return az.InferenceData(
        posterior=group(draws.posterior, draws.dims),
        posterior_predictive=group({"x": draws.x_rep}, {"x": ["point", "feature"]}),
        log_likelihood=group({"x": draws.log_lik}, {"x": ["point"]}),
        sample_stats=sample_stats,
        observed_data=group({"x": _np(xp)}, {"x": ["point", "feature"]}, sampled=False),
    )


def psis_means(draws: Draws, smoothed: torch.Tensor,
               pareto_k: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    r"""(raw mean, PSIS-corrected mean) over the draws of every continuous local latent of ``draws``.

    ``smoothed`` (S, P) are the Pareto-smoothed log-weights and ``pareto_k`` (P,) their k̂, from
    :func:`pyro_lvm.evaluate.psis`. Raw: (1/S) Σ_s v_s; corrected: Σ_s w̃_s v_s with w̃ = softmax over the
    draws of the smoothed log-weights, NaN for points whose k̂ is above
    :data:`~pyro_lvm.evaluate.PARETO_K_THRESHOLD` or not estimated (NaN). Both (P, ...) in the draws' dtype.
    A latent is *continuous local* when its dims start with ``point`` and its values are floating point
    (the mixture's assignment ``c`` is neither averaged nor corrected).
    """
    weights = torch.softmax(smoothed, 0).numpy()  # (S, P), float64, each column sums to 1
    untrusted = ~(pareto_k.numpy() <= PARETO_K_THRESHOLD)  # k̂ > 0.7, or NaN (no tail fit: not judged)
    out = {}
    for name, values in draws.posterior.items():
        dims = draws.dims[name]
        if not dims or dims[0] != "point" or not np.issubdtype(values.dtype, np.floating):
            continue
        raw = values.mean(0)
        corrected = np.einsum("sp,sp...->p...", weights, values.astype(np.float64))
        corrected[untrusted] = np.nan
        out[name] = (raw, corrected.astype(values.dtype))
    return out


def _replicate(model_tr: Any, shape: tuple[int, int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One draw from the model's observed site's distribution p(x | z) in a trace, shape (S, N, D), and the values
    of the discrete sites summed out in the model that it was drawn at (each (S, N); none for most models)."""
    observed = [site for site in model_tr.nodes.values() if site["type"] == "sample" and site["is_observed"]
                and not site["infer"].get("pyro_lvm_local", False)  # a wrapped function's latents: not data
                and in_data_plate(site)]  # a global held at a draw: not data
    if len(observed) != 1:
        raise ValueError(f"to_inference_data: expected one observed site, found {[s['name'] for s in observed]}")
    fn = observed[0]["fn"]
    value, sites = fn.sample_with_sites() if hasattr(fn, "sample_with_sites") else (fn.sample(), {})
    sites = {k: _draws_by_points(v, 0).expand(shape[:2]) for k, v in sites.items()}
    return (value.reshape(value.shape[:1] + value.shape[-2:]).expand(shape) if value.dim() > 3
            else value.expand(shape)), sites


@contextlib.contextmanager
def _eval_mode(model: Any, guide: Any) -> Iterator[None]:
    """Model and guide in eval mode for a block, their training flags restored afterwards (as evaluation)."""
    modules = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
    before = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, before, strict=True):
            m.train(flag)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _numpy_dtype(x: torch.Tensor) -> np.dtype:
    return np.dtype(str(x.dtype).removeprefix("torch."))


def _positive_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    return int(v)


def _point_indices(points: object, n: int, max_points: int) -> np.ndarray:
    if points is None:
        return np.arange(min(n, max_points))
    index = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points)
    if index.ndim != 1 or index.size == 0 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"points: expected a non-empty 1-D sequence of integer indices, got {points!r}")
    if index.min() < 0 or index.max() >= n:
        raise ValueError(f"points: indices must be in [0, {n}), got {int(index.min())}..{int(index.max())}")
    if len(np.unique(index)) != len(index):
        raise ValueError("points: indices must be distinct (they become the 'point' coordinate)")
    return index.astype(np.int64)


def _feature_coords(names: Sequence[str] | None, d: int) -> np.ndarray:
    if names is None:
        return np.arange(d)
    names = [str(v) for v in names]
    if len(names) != d or len(set(names)) != d:
        raise ValueError(f"feature_names: expected {d} distinct names, got {len(names)} ({len(set(names))} distinct)")
    return np.asarray(names)


__all__ = ["INSPECTORS", "MAX_VALUES", "Draws", "local_latent_draws", "mixture_draws", "psis_means",
           "to_inference_data"]
