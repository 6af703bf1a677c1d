r"""Held-out evidence bounds, per data point, in nats.

For each point the guide draws K samples z_k ~ q(z|x) and the model scores them; with
log w_k = log p(x, z_k) − log q(z_k|x):

* ELBO   = (1/K) Σ_k log w_k                      (unbiased estimate of E_q[log w])
* IWAE-K = log (1/K) Σ_k w_k                      (Burda et al. 2016; rises to log p(x) as K grows)
* reconstruction = (1/K) Σ_k log p(x|z_k),   KL = (1/K) Σ_k [log q(z_k|x) − log p(z_k)]
* exact log p(x) wherever the model has it, and the gaps log p(x) − ELBO, log p(x) − IWAE.

Samples are drawn in chunks of at most ``max_rows`` (points × samples) so memory stays bounded for any K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine

from models.base import LatentModel


@dataclass
class EvalConfig:
    #: importance samples per point for the ELBO and IWAE-K estimates
    iwae_k: int = 1000
    #: largest points × samples evaluated at once; bounds peak memory
    max_rows: int = 25_000
    #: a latent unit is active when Var_x(E_q[z_j|x]) exceeds this (Burda et al. 2016)
    active_threshold: float = 0.01


def log_weight_terms(
    model: LatentModel, guide: Any, x: torch.Tensor, num_samples: int
) -> dict[str, torch.Tensor]:
    """Per-point terms of log w for ``num_samples`` draws from the guide, each of shape (S, N).

    Returns ``log_lik`` = log p(x|z), ``log_prior`` = log p(z), ``log_q`` = log q(z|x) and the drawn
    local latents ``z`` (S, N, k). Uses Pyro traces under a particle plate at dim -2, so any model and
    guide that share the data plate at dim -1 are scored the same way the ELBO sees them.
    """
    with pyro.plate("particles", num_samples, dim=-2):
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
    return {k: torch.cat(v) for k, v in result.items()}


def active_units(z_mean: torch.Tensor, threshold: float = 0.01) -> int:
    """Number of latent dimensions whose posterior mean varies across data: Var_x E[z_j|x] > threshold."""
    if z_mean.shape[0] < 2:
        return 0
    return int((z_mean.var(0) > threshold).sum())


def evaluate(
    model: LatentModel, guide: Any, x: torch.Tensor, config: EvalConfig | None = None
) -> dict[str, Any]:
    """Held-out bounds in mean nats per point (plus the per-point arrays under ``per_point``)."""
    config = config or EvalConfig()
    if config.iwae_k < 1:
        raise ValueError(f"iwae_k must be >= 1, got {config.iwae_k}")
    x = model.validate(x, name="evaluation data")
    was_training = model.training, getattr(guide, "training", False)
    model.eval()
    if hasattr(guide, "eval"):
        guide.eval()
    try:
        b = per_point_bounds(model, guide, x, config.iwae_k, config.max_rows)
        with torch.no_grad():
            exact = model.log_likelihood(x)
    finally:
        model.train(was_training[0])
        if hasattr(guide, "train"):
            guide.train(was_training[1])
    out: dict[str, Any] = {
        "elbo": b["elbo"].mean().item(),
        "iwae": b["iwae"].mean().item(),
        "iwae_k": config.iwae_k,
        "reconstruction": b["reconstruction"].mean().item(),
        "kl": b["kl"].mean().item(),
        "active_units": active_units(b["z_mean"], config.active_threshold),
        "exact_log_likelihood": None,
        "num_points": x.shape[0],
    }
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
