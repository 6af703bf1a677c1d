r"""Held-out evidence bounds, per data point, in nats.

For each point the guide draws K samples z_k ~ q(z|x) and the model scores them; with
log w_k = log p(x, z_k) − log q(z_k|x):

* ELBO   = (1/K) Σ_k log w_k                      (unbiased estimate of E_q[log w])
* IWAE-K = log (1/K) Σ_k w_k                      (Burda et al. 2016; rises to log p(x) as K grows)
* reconstruction = (1/K) Σ_k log p(x|z_k),   KL = (1/K) Σ_k [log q(z_k|x) − log p(z_k)]
* exact log p(x) wherever the model has it, and the gaps log p(x) − ELBO, log p(x) − IWAE.

Samples are drawn in chunks of at most ``max_rows`` (points × samples) so memory stays bounded for any K.

How the bounds are computed is the model's choice (``model.evaluator``, a name in :data:`EVALUATORS`):
``importance`` samples a continuous local latent as above; ``mixture`` handles a discrete assignment
and global latents (see :func:`mixture_bounds`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine

from pyro_lvm.config import check_config
from pyro_lvm.models.base import LatentModel
from pyro_lvm.registry import Registry
from pyro_lvm.runtime import local_params, seeded, threads


@dataclass
class EvalConfig:
    #: importance samples per point for the ELBO and IWAE-K estimates
    iwae_k: int = 1000
    #: largest points × samples evaluated at once; bounds peak memory
    max_rows: int = 25_000
    #: a latent unit is active when Var_x(E_q[z_j|x]) exceeds this (Burda et al. 2016)
    active_threshold: float = 0.01
    #: draws θ ~ q(θ) of global latents, for models that have them (posterior predictive, expected bounds)
    posterior_samples: int = 100
    #: fixes the evaluation's samples without touching the caller's RNG (``None``: draw from the caller's RNG)
    seed: int | None = None
    #: torch threads during evaluation (``None``: leave the caller's setting)
    threads: int | None = None

    def __post_init__(self) -> None:
        check_config(self, positive_int=("iwae_k", "max_rows", "posterior_samples", "threads"),
                     nonneg=("active_threshold",))


Evaluator = Callable[[LatentModel, Any, torch.Tensor, EvalConfig], dict[str, torch.Tensor]]
#: model.evaluator -> per-point bounds; each value is a tensor with the points on dim 0
EVALUATORS: Registry[Evaluator] = Registry("evaluator")


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold each time a large buffer is freed, so later tensor buffers of tens
    of MB land on the heap, where chunk after chunk of differently sized buffers fragments it: IWAE-5000
    over the 10,000 MNIST test images grew past 24 GB of resident memory without this (measured), and
    stays flat at ~0.6 GB with it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def log_weight_terms(
    model: LatentModel, guide: Any, x: torch.Tensor, num_samples: int
) -> dict[str, torch.Tensor]:
    """Per-point terms of log w for ``num_samples`` draws from the guide, each of shape (S, N).

    Returns ``log_lik`` = log p(x|z), ``log_prior`` = log p(z), ``log_q`` = log q(z|x) and the drawn
    local latents ``z`` (S, N, k). Uses Pyro traces under a particle plate at dim -2, so any model and
    guide that share the data plate at dim -1 are scored the same way the ELBO sees them.
    """
    with local_params(model, guide), pyro.plate("particles", num_samples, dim=-2):
        guide_tr = poutine.trace(guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
    shape = (num_samples, x.shape[0])
    out = {k: x.new_zeros(shape) for k in ("log_lik", "log_prior", "log_q")}
    for tr, observed_key, latent_key in ((model_tr, "log_lik", "log_prior"), (guide_tr, None, "log_q")):
        for site in tr.nodes.values():
            if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
                continue
            lp = site["fn"].log_prob(site["value"])
            key = observed_key if site["is_observed"] else latent_key
            if key is None:
                raise ValueError(f"guide has an observed site {site['name']!r}")
            out[key] = out[key] + lp.expand(shape)
    out["z"] = guide_tr.nodes[model.local_site]["value"].expand(shape + (model.latent_dim,))
    return out


@torch.no_grad()
def per_point_bounds(
    model: LatentModel, guide: Any, x: torch.Tensor, num_samples: int, max_rows: int = 25_000
) -> dict[str, torch.Tensor]:
    """ELBO, IWAE-K, reconstruction, KL and posterior-mean estimates for every point of ``x``."""
    n = x.shape[0]
    points = max(1, min(n, max_rows // num_samples))
    samples = max(1, min(num_samples, max_rows // points))
    result: dict[str, list[torch.Tensor]] = {k: [] for k in ("elbo", "iwae", "reconstruction", "kl", "z_mean")}
    for start in range(0, n, points):
        xb = x[start:start + points]
        lse, sums = [], {"elbo": 0.0, "reconstruction": 0.0, "kl": 0.0, "z_mean": 0.0}
        for s0 in range(0, num_samples, samples):
            s = min(samples, num_samples - s0)
            t = log_weight_terms(model, guide, xb, s)
            log_w = t["log_lik"] + t["log_prior"] - t["log_q"]
            lse.append(torch.logsumexp(log_w, 0))
            sums["elbo"] = sums["elbo"] + log_w.sum(0)
            sums["reconstruction"] = sums["reconstruction"] + t["log_lik"].sum(0)
            sums["kl"] = sums["kl"] + (t["log_q"] - t["log_prior"]).sum(0)
            sums["z_mean"] = sums["z_mean"] + t["z"].sum(0)
        result["iwae"].append(torch.logsumexp(torch.stack(lse), 0) - math.log(num_samples))
        for k, v in sums.items():
            result[k].append(v / num_samples)
        release_freed_memory()
    return {k: torch.cat(v) for k, v in result.items()}


@EVALUATORS.register("importance")
def importance_bounds(model: LatentModel, guide: Any, x: torch.Tensor, config: EvalConfig) -> dict[str, torch.Tensor]:
    return per_point_bounds(model, guide, x, config.iwae_k, config.max_rows)


@EVALUATORS.register("mixture")
@torch.no_grad()
def mixture_bounds(model: Any, guide: Any, x: torch.Tensor, config: EvalConfig) -> dict[str, torch.Tensor]:
    r"""Held-out bounds for a mixture with global latents θ and a discrete assignment c, per point.

    With θ_s ~ q(θ) (one draw for a point mass) and q(c|x) the amortized guide (or the exact
    p(c|x, θ) when c is summed out or enumerated):

    * ``elbo`` = mean_s Σ_k q(k|x) [log p(x, c=k | θ_s) − log q(k|x)]  (exact over c: K terms)
    * ``iwae`` = mean_s log (1/K') Σ_j p(x, c_j | θ_s) / q(c_j|x),  c_j ~ q(c|x), K' = ``iwae_k``
    * ``expected_log_likelihood`` = mean_s log p(x | θ_s); ``assignment_gap`` = it − ``elbo``
      = mean_s KL(q(c|x) ‖ p(c|x, θ_s)), the gap the assignment guide leaves
    * ``predictive_log_likelihood`` = log (1/S) Σ_s p(x | θ_s), the posterior predictive
    * ``exact_log_likelihood`` = log p(x | θ̂) at the guide's point estimate (the MAP for ``map``)
    """
    samples = 1 if guide.is_point_mass else config.posterior_samples
    log_q = guide.assignments.distribution(x).logits if guide.assignments is not None else None  # (N, K)
    sums = {k: x.new_zeros(x.shape[0]) for k in ("elbo", "iwae", "expected_log_likelihood")}
    log_px = []
    for _ in range(samples):
        lj = model.log_joint(x, guide.sample_globals(x))  # (N, K)
        lp = torch.logsumexp(lj, -1)
        log_px.append(lp)
        sums["expected_log_likelihood"] += lp
        if log_q is None:  # the assignments are exact: both bounds are tight
            sums["elbo"] += lp
            sums["iwae"] += lp
            continue
        sums["elbo"] += (log_q.exp() * (lj - log_q)).sum(-1)
        sums["iwae"] += _categorical_iwae(lj, log_q, config.iwae_k, config.max_rows)
    out = {k: v / samples for k, v in sums.items()}
    out["assignment_gap"] = out["expected_log_likelihood"] - out["elbo"]
    out["predictive_log_likelihood"] = torch.logsumexp(torch.stack(log_px), 0) - math.log(samples)
    out["exact_log_likelihood"] = model.log_likelihood_at(x, guide.point_estimate(x))
    return out


def _categorical_iwae(log_joint: torch.Tensor, log_q: torch.Tensor, k: int, max_rows: int) -> torch.Tensor:
    """log (1/k) Σ_j exp(log_joint[c_j] − log_q[c_j]) with c_j ~ Categorical(log_q), per row, in chunks."""
    log_w_all = log_joint - log_q  # (N, K): the weight of every category
    step = max(1, max_rows // max(1, log_q.shape[0]))
    parts = []
    for s0 in range(0, k, step):
        c = torch.distributions.Categorical(logits=log_q).sample((min(step, k - s0),))  # (s, N)
        parts.append(torch.logsumexp(log_w_all.gather(-1, c.T), -1))  # (N,)
    return torch.logsumexp(torch.stack(parts), 0) - math.log(k)


def bounds(
    model: LatentModel, guide: Any, x: torch.Tensor, config: EvalConfig | None = None
) -> dict[str, torch.Tensor]:
    """Per-point bounds by the model's evaluator (no validation, no mode switching: see :func:`evaluate`)."""
    with local_params(model, guide):
        return EVALUATORS[model.evaluator](model, guide, x, config or EvalConfig())


def active_units(z_mean: torch.Tensor, threshold: float = 0.01) -> int:
    """Number of latent dimensions whose posterior mean varies across data: Var_x E[z_j|x] > threshold."""
    if z_mean.shape[0] < 2:
        return 0
    return int((z_mean.var(0) > threshold).sum())


def evaluate(
    model: LatentModel, guide: Any, x: object, config: EvalConfig | None = None, **overrides: Any
) -> dict[str, Any]:
    """Held-out bounds in mean nats per point (plus the per-point arrays under ``per_point``).

    ``x`` is an array, tensor or DataFrame (points, features) of any float dtype; it is checked and moved
    to the model's dtype and device. ``overrides`` replace fields of ``config`` (``evaluate(m, g, x,
    iwae_k=100, seed=0)``). Runs with module-local Pyro parameters and restores every setting it touches.
    """
    config = config or EvalConfig()
    config = dataclasses.replace(config, **overrides) if overrides else config
    x = model.validate(x, name="evaluation data")
    was_training = model.training, getattr(guide, "training", False)
    model.eval()
    if hasattr(guide, "eval"):
        guide.eval()
    try:
        with local_params(model, guide), seeded(config.seed), threads(config.threads):
            b = bounds(model, guide, x, config)
            exact = b.pop("exact_log_likelihood", None)
            if exact is None:
                with torch.no_grad():
                    exact = model.log_likelihood(x)
    finally:
        model.train(was_training[0])
        if hasattr(guide, "train"):
            guide.train(was_training[1])
    z_mean = b.pop("z_mean", None)
    out: dict[str, Any] = {"elbo": b["elbo"].mean().item(), "iwae": b["iwae"].mean().item(), "iwae_k": config.iwae_k}
    out.update({k: v.mean().item() for k, v in b.items() if k not in out})
    if z_mean is not None:
        out["active_units"] = active_units(z_mean, config.active_threshold)
    out["exact_log_likelihood"] = None
    out["num_points"] = x.shape[0]
    per_point = {"elbo": b["elbo"], "iwae": b["iwae"]}
    if exact is not None:
        out["exact_log_likelihood"] = exact.mean().item()
        out["gap_elbo"] = out["exact_log_likelihood"] - out["elbo"]
        out["gap_iwae"] = out["exact_log_likelihood"] - out["iwae"]
        per_point["exact_log_likelihood"] = exact
    out["per_point"] = per_point
    return out


def public(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without the per-point arrays, for JSON."""
    return {k: v for k, v in metrics.items() if k != "per_point"}
