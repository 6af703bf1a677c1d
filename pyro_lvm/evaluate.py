r"""Held-out evidence bounds, per data point, in nats.

For each point the guide draws K samples z_k ~ q(z|x) and the model scores them; with
log w_k = log p(x, z_k) − log q(z_k|x):

* ELBO   = (1/K) Σ_k log w_k                      (unbiased estimate of E_q[log w])
* IWAE-K = log (1/K) Σ_k w_k                      (Burda et al. 2016; rises to log p(x) as K grows)
* reconstruction = (1/K) Σ_k log p(x|z_k),   KL = (1/K) Σ_k [log q(z_k|x) − log p(z_k)]
* exact log p(x) wherever the model has it, and the gaps log p(x) − ELBO, log p(x) − IWAE.

Samples are drawn in chunks of at most ``max_rows`` (points × samples) so memory stays bounded for any K.

Each point's K log-weights are also Pareto-smoothed (PSIS, Vehtari et al. 2024, by ArviZ's ``psislw``): the
shape k̂ of the generalized Pareto fit to the largest weights says whether the importance-sampling
estimates can be trusted (k̂ < 0.5: finite variance; 0.5-0.7: usable; > 0.7: too heavy-tailed, the
proposal q(z|x) misses mass of p(z|x)), and the smoothed weights give a PSIS-corrected posterior mean.

How the bounds are computed is the model's choice (``model.evaluator``, a name in :data:`EVALUATORS`):
``importance`` samples a continuous local latent as above; ``mixture`` handles a discrete assignment
and global latents (see :func:`mixture_bounds`).

For models whose globals θ are latent and guided by q(θ), :func:`global_pareto_k` asks the same question
of q(θ) on the training data: the Pareto k̂ of log w_s = log p(θ_s, x) − log q(θ_s), θ_s ~ q(θ), with any
discrete local summed out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoDelta
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.runtime import am_i_wrapped
from pyro.poutine.subsample_messenger import _Subsample

from pyro_lvm.config import ConfigError, ReadableConfig, check_config
from pyro_lvm.models.base import LatentModel, in_data_plate
from pyro_lvm.registry import Registry
from pyro_lvm.runtime import local_params, seeded, threads


@dataclass
class EvalConfig(ReadableConfig):
    #: importance samples per point for the ELBO and IWAE-K estimates
    iwae_k: int = 1000
    #: largest points × samples evaluated at once; bounds peak memory
    max_rows: int = 25_000
    #: a latent unit is active when Var_x(E_q[z_j|x]) exceeds this (Burda et al. 2016)
    active_threshold: float = 0.01
    #: draws θ ~ q(θ) of global latents, for models that have them (posterior predictive, expected bounds)
    posterior_samples: int = 100
    #: draws θ_s ~ q(θ) over which a model with per-point and global latents averages its per-point bounds
    #: (each draw costs one importance pass over the points; 1 for a point mass)
    global_draws: int = 10
    #: fixes the evaluation's samples without touching the caller's RNG (``None``: draw from the caller's RNG)
    seed: int | None = None
    #: torch threads during evaluation (``None``: leave the caller's setting)
    threads: int | None = None
    #: draw and score through the model's fused importance pass where it has one (:func:`fused_sampler`: the
    #: VAE's, without Pyro traces); ``False``: Pyro traces for every model. The same draws either way
    fused: bool = True

    def __post_init__(self) -> None:
        check_config(self, positive_int=("iwae_k", "max_rows", "posterior_samples", "global_draws", "threads"),
                     nonneg=("active_threshold",))
        if not isinstance(self.fused, bool):
            raise ConfigError("fused", f"must be True or False, got {self.fused!r}")


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


def importance_traces(model: LatentModel, guide: Any, x: torch.Tensor, num_samples: int) -> tuple[Any, Any]:
    """(guide trace, model trace) for ``num_samples`` draws z ~ q(z|x) per point, the model replayed on them.

    The draws sit in a particle plate at dim -2, left of the shared data plate (dim -1), so every site
    has batch shape (S, N). Run it with the model's and guide's parameters local (as :func:`log_weight_terms`).
    """
    # left of every plate of the model (a global site's own plates included), so draws never collide with them
    with pyro.plate("particles", num_samples, dim=-1 - getattr(model, "max_plate_nesting", 1)):
        guide_tr = poutine.trace(guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
    return guide_tr, model_tr


def log_weight_terms(
    model: LatentModel, guide: Any, x: torch.Tensor, num_samples: int
) -> dict[str, torch.Tensor]:
    """Per-point terms of log w for ``num_samples`` draws from the guide, each of shape (S, N).

    Returns ``log_lik`` = log p(x|z), ``log_prior`` = log p(z), ``log_q`` = log q(z|x) and the drawn
    local latents ``z`` (S, N, k). Uses Pyro traces under a particle plate at dim -2, so any model and
    guide that share the data plate at dim -1 are scored the same way the ELBO sees them.
    """
    with local_params(model, guide):
        guide_tr, model_tr = importance_traces(model, guide, x, num_samples)
    return trace_terms(model, guide_tr, model_tr, (num_samples, x.shape[0]))


def fused_sampler(model: LatentModel, guide: Any, x: torch.Tensor) -> Callable[[int], dict[str, torch.Tensor]] | None:
    """The model's fused importance pass for the points ``x``, or ``None`` where Pyro traces must score them.

    A model may offer ``importance_sampler(guide, x)``: a function of S returning what :func:`log_weight_terms`
    returns for S draws per point, from the same random numbers, or ``None`` for a guide it cannot score so (the
    VAE's: :meth:`pyro_lvm.models.VAE.importance_sampler`). Wrapped functions and every other model have none and
    go through traces. So does any call under an active Pyro handler (``poutine.condition``, ``scale``, ``mask``):
    only a trace sees what the handler does."""
    make = getattr(model, "importance_sampler", None)
    if make is None or am_i_wrapped():
        return None
    with local_params(model, guide):
        return make(guide, x)


def trace_terms(model: LatentModel, guide_tr: Any, model_tr: Any, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """:func:`log_weight_terms` from traces made by :func:`importance_traces` (``shape`` = (S, N))."""
    out = {k: guide_tr.nodes[model.local_site]["value"].new_zeros(shape) for k in ("log_lik", "log_prior", "log_q")}
    for tr, observed_key, latent_key in ((model_tr, "log_lik", "log_prior"), (guide_tr, None, "log_q")):
        for site in tr.nodes.values():
            if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
                continue
            if not in_data_plate(site):
                # not a per-point term: a global held at a draw of q(θ) (conditioned: observed) is the same for
                # every point, and a global latent drawn here would be counted once per point (its prior N times)
                if site["is_observed"]:
                    continue
                raise ValueError(f"site {site['name']!r} is a global latent (outside the data plate): per-point "
                                 "bounds hold it at draws of q(θ) (importance_bounds), not at draws per point")
            lp = site["fn"].log_prob(site["value"])
            # a wrapped function's local sites are scored as observed (z = T(u)) but are latents: log p(z)
            local = site["infer"].get("pyro_lvm_local", False)
            key = observed_key if site["is_observed"] and not local else latent_key
            if key is None:
                raise ValueError(f"guide has an observed site {site['name']!r}")
            out[key] = out[key] + _draws_by_points(lp, 0).expand(shape)
    out["z"] = _draws_by_points(guide_tr.nodes[model.local_site]["value"], 1).expand(shape + (model.latent_dim,))
    return out


def _draws_by_points(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    """(S, 1, ..., 1, N, *event) -> (S, N, *event): the size-1 dims of plates between the particle plate and the
    data plate (a model whose globals sit in plates of their own) dropped."""
    batch = t.dim() - event_dims
    if batch <= 2:
        return t
    return t.reshape(t.shape[:1] + t.shape[batch - 1:])


#: fewest importance samples per point for a Pareto k̂: ArviZ fits the tail to the largest
#: ceil(min(K/5, 3√K)) weights and needs at least 5 of them (K ≥ 21); with fewer it returns k̂ = inf
MIN_PSIS_SAMPLES = 21

#: k̂ above which PSIS estimates are unreliable (Vehtari et al. 2024, for sample sizes above ~2,000)
PARETO_K_THRESHOLD = 0.7


def psis_tail_size(num_samples: int) -> int:
    """How many of the largest of K weights ArviZ's ``psislw`` (``reff=1``) may smooth: ceil(min(K/5, 3√K))."""
    return min(num_samples, math.ceil(min(num_samples / 5.0, 3.0 * math.sqrt(num_samples))))


#: c in the rounding tolerance of :func:`psis`: a column of log-weights whose spread is at most
#: c · eps · max(1, M) (eps: the resolution of the dtype its terms were computed in; M: the largest Σ |term| of
#: its draws) is constant to within rounding. Why 2¹⁰: each term log p(x|z), log p(z), log q(z|x) comes out of
#: its own float arithmetic with an absolute error of κ · eps · |intermediates|, and the intermediates exceed the
#: term where the arithmetic cancels (x − (μ + W z) for data far from 0 in units of the noise scale, z − m for a
#: narrow posterior), so κ is not 1. Measured with the exact guide of factor analysis (the log-weights then equal
#: log p(x) for every draw, so their whole spread is rounding), spread / (eps · M): at most 90 on standardized
#: data (diabetes, digits, synthetic; float32 and float64 alike) and 480 on raw, unstandardized wine (proline in
#: the thousands). 2¹⁰ covers both with room to spare while staying far below any real tail: in float32 it is
#: 1.2e-4 · M, 0.005 nats for the diabetes model's M ≈ 40 and 0.04 nats for digits' M ≈ 300, so the weights of
#: a column it calls constant differ by well under 5 % — bounded weights, whose Pareto tail is empty (k̂ < 0 in
#: truth) — whereas a guide that misses posterior mass leaves a spread of nats
PSIS_ROUNDING_FACTOR = 1024.0


def psis(log_w: torch.Tensor, *, magnitude: torch.Tensor | None = None,
         resolution: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Pareto-smoothed log importance weights and the Pareto shape k̂ of each column of ``log_w`` (K, P).

    ArviZ's ``az.psislw(·, reff=1.0, normalize=False)`` over the K draws of each of the P points (the draws
    are independent, so the relative efficiency is 1). Returns the smoothed, *unnormalised* log-weights on
    the input's scale (K, P) in float64 — only the largest :func:`psis_tail_size` of each column can change —
    and k̂ (P,) in float64. Two cases get no Pareto fit and keep their raw weights:

    * K < :data:`MIN_PSIS_SAMPLES`: too few draws for a tail fit; k̂ = NaN (not estimated).
    * a column whose weights are equal to within rounding, as for the exact posterior: the weights are
      constant, the tail has no shape, and the fit would see only rounding noise (a few tied values, or
      float32 noise on a constant, from which ArviZ returns anything from −2 to inf); k̂ = −inf, the limit of a
      generalized Pareto tail collapsing onto its end point. "Within rounding" is max − min ≤ either
      √eps · max(1, |max|) in ``log_w``'s own dtype (rounding of the weights as given), or
      :data:`PSIS_ROUNDING_FACTOR` · ``resolution`` · max(1, ``magnitude``) (rounding of the terms the weights
      were computed from). ``magnitude`` (P,) is each column's largest Σ |log-density term| over its draws
      (default: the largest |log w|) and ``resolution`` the machine epsilon of the dtype those terms were
      computed in (default: ``log_w``'s); a float32 model's terms summed in float64 pass float32's epsilon here,
      since their float64 sum still carries the float32 rounding of each term.
    """
    lw = log_w.detach().to(device="cpu", dtype=torch.float64).clone()
    k_hat = torch.full(lw.shape[1:], math.nan, dtype=torch.float64)
    if lw.shape[0] < MIN_PSIS_SAMPLES:
        return lw, k_hat
    top = lw.max(0).values
    own_eps = torch.finfo(log_w.dtype).eps
    mag = lw.abs().max(0).values if magnitude is None else magnitude.detach().to(device="cpu", dtype=torch.float64)
    eps = own_eps if resolution is None else float(resolution)
    tol = torch.maximum(math.sqrt(own_eps) * top.abs().clamp_min(1.0),
                        PSIS_ROUNDING_FACTOR * eps * mag.clamp_min(1.0))
    constant = (top - lw.min(0).values) <= tol
    k_hat[constant] = -math.inf
    fit = ~constant
    if bool(fit.any()):
        import arviz as az  # imported here: importing ArviZ takes seconds and pulls in matplotlib

        with np.errstate(all="ignore"):  # a failed GPD fit (k̂ = inf) divides by zero on the way
            smoothed, k = az.psislw(lw[:, fit].T.numpy(), reff=1.0, normalize=False)
        lw[:, fit] = torch.from_numpy(np.ascontiguousarray(smoothed.T))
        k_hat[fit] = torch.from_numpy(np.atleast_1d(np.asarray(k, dtype=np.float64)))
    return lw, k_hat


class PsisAccumulator:
    r"""PSIS diagnostics of one chunk of P points whose K draws arrive in chunks of samples.

    :meth:`add` takes each chunk's log-weights (s, P) and draws z (s, P, k); :meth:`finish` returns k̂ (P,)
    and the PSIS-corrected posterior mean Σ_k w̃_k z_k (P, k), with w̃ the smoothed, normalised weights.
    The K log-weights of the P points are kept (PSIS needs them all), but of the draws only the
    :func:`psis_tail_size` largest-weight ones per point, the only ones smoothing can reweight; every other
    draw is folded into a running sum Σ exp(log w − ref) z as it arrives (``ref``: the running maximum
    log-weight). So memory stays K × P + (tail + 1) × P × k, whether K fits one chunk or many.

    Each chunk may also bring ``magnitude`` (s, P), the Σ |log-density term| behind each log-weight, and the
    ``resolution`` (machine epsilon) of the dtype the terms were computed in: :func:`psis` then calls a point's
    weights constant by the rounding those terms carry (its largest magnitude over all chunks).
    """

    def __init__(self, num_samples: int) -> None:
        self.num_samples, self.tail = num_samples, psis_tail_size(num_samples)
        self.log_w: list[torch.Tensor] = []
        self.seen = 0
        self.cand_lw: torch.Tensor | None = None  # (m, P) the largest log-weights so far
        self.cand_z: torch.Tensor | None = None  # (m, P, k) their draws
        self.cand_idx: torch.Tensor | None = None  # (m, P) their sample indices
        self.body: torch.Tensor | None = None  # (P, k) Σ exp(log w − ref) z over every other draw
        self.ref: torch.Tensor | None = None  # (P,)
        self.magnitude: torch.Tensor | None = None  # (P,) the largest Σ |term| behind any log-weight so far
        self.resolution: float | None = None  # epsilon of the coarsest dtype the terms came in

    def add(self, log_w: torch.Tensor, z: torch.Tensor, magnitude: torch.Tensor | None = None,
            resolution: float | None = None) -> None:
        s, p = log_w.shape
        if magnitude is not None:
            m = magnitude.detach().double().max(0).values
            self.magnitude = m if self.magnitude is None else torch.maximum(self.magnitude, m)
        if resolution is not None:
            self.resolution = max(resolution, self.resolution or 0.0)
        log_w, z = log_w.detach().double(), z.detach().double()
        idx = torch.arange(self.seen, self.seen + s, device=log_w.device).unsqueeze(-1).expand(s, p)
        self.seen += s
        self.log_w.append(log_w)
        if self.cand_lw is None:
            self.body = z.new_zeros(z.shape[1:])
            self.ref = log_w.max(0).values
            all_lw, all_z, all_idx = log_w, z, idx
        else:
            all_lw = torch.cat([self.cand_lw, log_w])
            all_z, all_idx = torch.cat([self.cand_z, z]), torch.cat([self.cand_idx, idx])
            ref = torch.maximum(self.ref, log_w.max(0).values)
            self.body = self.body * torch.exp(self.ref - ref).nan_to_num(0.0).unsqueeze(-1)
            self.ref = ref
        keep = all_lw.topk(min(self.tail, all_lw.shape[0]), dim=0).indices  # (m, P)
        rest = torch.ones_like(all_lw, dtype=torch.bool).scatter_(0, keep, False)
        w_rest = torch.where(rest, torch.exp(all_lw - self.ref), torch.zeros_like(all_lw))
        self.body = self.body + torch.einsum("sp,spk->pk", w_rest, all_z)
        self.cand_lw, self.cand_idx = all_lw.gather(0, keep), all_idx.gather(0, keep)
        self.cand_z = all_z.gather(0, keep.unsqueeze(-1).expand(keep.shape + all_z.shape[-1:]))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k̂ (P,), PSIS-corrected posterior mean (P, k)), both float64."""
        if self.seen != self.num_samples:
            raise ValueError(f"PsisAccumulator: expected {self.num_samples} draws per point, got {self.seen}")
        smoothed, k_hat = psis(torch.cat(self.log_w), magnitude=self.magnitude, resolution=self.resolution)
        smoothed = smoothed.to(self.body.device)
        log_z = torch.logsumexp(smoothed, 0)  # (P,) normaliser of the smoothed weights
        w_cand = torch.exp(smoothed.gather(0, self.cand_idx) - log_z)  # (m, P)
        mean = self.body * torch.exp(self.ref - log_z).unsqueeze(-1) + torch.einsum("mp,mpk->pk", w_cand, self.cand_z)
        return k_hat, mean


@torch.no_grad()
def per_point_bounds(
    model: LatentModel, guide: Any, x: torch.Tensor, num_samples: int, max_rows: int = 25_000, fused: bool = True
) -> dict[str, torch.Tensor]:
    """ELBO, IWAE-K, reconstruction, KL, posterior means and PSIS diagnostics for every point of ``x``.

    Returns tensors with the points on dim 0: ``elbo``, ``iwae``, ``reconstruction``, ``kl``, ``z_mean``
    (the guide's Monte Carlo mean of z, (N, k)), ``pareto_k`` (the Pareto k̂ of each point's K log-weights,
    float64; NaN when K < :data:`MIN_PSIS_SAMPLES`, −inf where the weights are constant: see :func:`psis`)
    and ``z_mean_psis`` (Σ_k w̃_k z_k with the smoothed, normalised weights w̃; the self-normalised
    importance-sampling mean where no Pareto fit is made). The PSIS step draws no random numbers, so the
    bounds for a given seed are those computed without it.

    Each chunk of points is scored by the model's fused importance pass where it has one and ``fused`` is true
    (:func:`fused_sampler`: the VAE's, which runs the encoder once per chunk of points and the decoder in
    cache-sized row blocks), else by Pyro traces (:func:`log_weight_terms`); both draw the same z from the same
    random numbers. Peak memory: O(``max_rows`` × (latent_dim + data_dim)) for the traces (the decoder's output
    for a whole chunk), O(``max_rows`` × latent_dim) plus one row block for the fused pass.
    """
    n = x.shape[0]
    points = max(1, min(n, max_rows // num_samples))
    samples = max(1, min(num_samples, max_rows // points))
    keys = ("elbo", "iwae", "reconstruction", "kl", "z_mean", "pareto_k", "z_mean_psis")
    result: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for start in range(0, n, points):
        xb = x[start:start + points]
        lse, sums = [], {"elbo": 0.0, "reconstruction": 0.0, "kl": 0.0, "z_mean": 0.0}
        acc = PsisAccumulator(num_samples)
        draw = fused_sampler(model, guide, xb) if fused else None
        for s0 in range(0, num_samples, samples):
            s = min(samples, num_samples - s0)
            if draw is None:
                t = log_weight_terms(model, guide, xb, s)
            else:
                with local_params(model, guide):
                    t = draw(s)
            dtype = t["log_lik"].dtype
            resolution = max(torch.finfo(t[k].dtype).eps for k in ("log_lik", "log_prior", "log_q"))
            # log w in float64: each term carries its own dtype's rounding, but the difference log p − log q
            # of two nearly equal float32 numbers would lose the rest (for the exact guide it is all there is)
            ll, lp, lq = (t[k].double() for k in ("log_lik", "log_prior", "log_q"))
            log_w = ll + lp - lq
            lse.append(torch.logsumexp(log_w, 0))
            sums["elbo"] = sums["elbo"] + log_w.sum(0)
            sums["reconstruction"] = sums["reconstruction"] + ll.sum(0)
            sums["kl"] = sums["kl"] + (lq - lp).sum(0)
            sums["z_mean"] = sums["z_mean"] + t["z"].sum(0)
            acc.add(log_w, t["z"], magnitude=ll.abs() + lp.abs() + lq.abs(), resolution=resolution)
            del t, log_w, ll, lp, lq
        # the bounds in the terms' dtype, as before: only their accumulation ran in float64
        result["iwae"].append((torch.logsumexp(torch.stack(lse), 0) - math.log(num_samples)).to(dtype))
        for k, v in sums.items():
            result[k].append(v / num_samples if k == "z_mean" else (v / num_samples).to(dtype))
        k_hat, z_psis = acc.finish()
        result["pareto_k"].append(k_hat.to(x.device))
        result["z_mean_psis"].append(z_psis.to(device=x.device, dtype=result["z_mean"][-1].dtype))
        del acc
        release_freed_memory()
    return {k: torch.cat(v) for k, v in result.items()}


def pareto_k_summary(pareto_k: torch.Tensor | None, num_samples: int) -> dict[str, float | None]:
    """``pareto_k_mean``, ``pareto_k_max`` and ``pareto_k_frac_above_0.7`` of per-point k̂.

    All ``None`` when ``num_samples`` < :data:`MIN_PSIS_SAMPLES`: a tail fit to fewer than 5 of a point's
    largest weights says nothing (ArviZ returns k̂ = inf there), and even at a few dozen draws k̂ is noisy.
    Points with constant weights (k̂ = −inf, the exact posterior) count as below the threshold; the mean
    is then −inf when every point has them.
    """
    keys = ("pareto_k_mean", "pareto_k_max", f"pareto_k_frac_above_{PARETO_K_THRESHOLD}")
    if pareto_k is None or num_samples < MIN_PSIS_SAMPLES or pareto_k.numel() == 0:
        return dict.fromkeys(keys)
    k = pareto_k.double()
    return dict(zip(keys, (k.mean().item(), k.max().item(), (k > PARETO_K_THRESHOLD).double().mean().item()),
                    strict=True))


@EVALUATORS.register("importance")
def importance_bounds(model: LatentModel, guide: Any, x: torch.Tensor, config: EvalConfig) -> dict[str, torch.Tensor]:
    r""":func:`per_point_bounds`; for a model that also has global latent sites θ (guided by a ``LOCAL+GLOBAL``
    pair), bounds on log p(x_n | θ_s) averaged over S = ``global_draws`` draws θ_s ~ q(θ) (one for a point mass):
    ELBO_n = (1/S) Σ_s E_q(z|x_n)[log p(x_n, z | θ_s) − log q(z|x_n)], IWAE-K likewise. Their target is
    (1/S) Σ_s log p(x_n | θ_s); the prior log p(θ) is no per-point term. Each point's k̂ is its largest over the
    draws (the local guide is trusted at a point only if it is under every θ_s)."""
    global_sites = tuple(getattr(model, "global_sites", ()))
    if not global_sites or getattr(model, "evaluator", "importance") != "importance":
        return per_point_bounds(model, guide, x, config.iwae_k, config.max_rows, config.fused)
    local = getattr(guide, "local", guide)
    runs = []
    for _ in range(1 if guide.is_point_mass else config.global_draws):
        theta = guide.sample_globals(x)
        with poutine.condition(data=theta):
            runs.append(per_point_bounds(model, local, x, config.iwae_k, config.max_rows, config.fused))
    out = {k: torch.stack([r[k] for r in runs]).mean(0) for k in runs[0] if k != "pareto_k"}
    out["pareto_k"] = torch.stack([r["pareto_k"] for r in runs]).amax(0)
    return out


@EVALUATORS.register("mixture")
@torch.no_grad()
def mixture_bounds(model: Any, guide: Any, x: torch.Tensor, config: EvalConfig) -> dict[str, torch.Tensor]:
    r"""Held-out bounds for a mixture with global latents θ and a discrete assignment c, per point.

    With θ_s ~ q(θ) (one draw for a point mass) and q(c|x) the amortized guide (or the exact
    p(c|x, θ) when c is summed out or enumerated). Each bound is named with its own target:

    * ``elbo`` = mean_s Σ_k q(k|x) [log p(x, c=k | θ_s) − log q(k|x)]  (exact over c: K terms) and
      ``iwae`` = mean_s log (1/K') Σ_j p(x, c_j | θ_s) / q(c_j|x), c_j ~ q(c|x), K' = ``iwae_k``: bounds
      over the assignments on log p(x | θ_s), averaged over θ_s. Their target is therefore
    * ``expected_log_likelihood`` = mean_s log p(x | θ_s), and the gaps the assignment guide leaves are
      ``assignment_gap`` = it − ``elbo`` = mean_s KL(q(c|x) ‖ p(c|x, θ_s)) and ``assignment_gap_iwae`` =
      it − ``iwae`` (both 0 when c is summed out or enumerated: q(c|x) is then the exact posterior).
    * ``predictive_log_likelihood`` = log (1/S) Σ_s p(x | θ_s), the posterior predictive under q(θ) (at least
      ``expected_log_likelihood``, by Jensen; the two are equal for a point mass).
    * ``log_lik_at_point_estimate`` = log p(x | θ̂) at the guide's point estimate θ̂ (the MAP for ``map``, the
      image of the base median for the others): a plug-in score, not the model's log p(x).

    No exact log p(x) is reported: with latent globals the held-out target is the posterior predictive
    log p(x | x_train), which needs p(θ | x_train). How far q(θ) is from it is :func:`global_pareto_k`'s
    question, asked on the training data.
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
    out["assignment_gap_iwae"] = out["expected_log_likelihood"] - out["iwae"]
    out["predictive_log_likelihood"] = torch.logsumexp(torch.stack(log_px), 0) - math.log(samples)
    out["log_lik_at_point_estimate"] = model.log_likelihood_at(x, guide.point_estimate(x))
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

    Evaluators that importance-sample a local latent (``importance``) also report the PSIS diagnostics of
    the per-point weights (:func:`pareto_k_summary`: ``pareto_k_mean``, ``pareto_k_max``,
    ``pareto_k_frac_above_0.7``; ``None`` when ``iwae_k`` < :data:`MIN_PSIS_SAMPLES`) and keep each point's
    k̂ in ``per_point["pareto_k"]``. The ``mixture`` evaluator reports none: its weights over θ draws need
    the training data and log q(θ) (:func:`global_pareto_k` computes that k̂ there; see
    :func:`pyro_lvm.to_inference_data` for per-point k̂ and PSIS-LOO).

    ``exact_log_likelihood`` is the model's exact log p(x) (:meth:`LatentModel.log_likelihood`), ``None``
    where it has none; ``gap_elbo`` = it − ELBO and ``gap_iwae`` = it − IWAE-K are reported only beside it.
    """
    config = config or EvalConfig()
    config = dataclasses.replace(config, **overrides) if overrides else config
    from pyro_lvm.guides import check_guide_belongs
    from pyro_lvm.wrap import model_for

    model = model_for(model, guide)
    check_guide_belongs(model, guide)
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
    b.pop("z_mean_psis", None)
    pareto_k = b.pop("pareto_k", None)
    out: dict[str, Any] = {"elbo": b["elbo"].mean().item(), "iwae": b["iwae"].mean().item(), "iwae_k": config.iwae_k}
    out.update({k: v.mean().item() for k, v in b.items() if k not in out})
    if z_mean is not None:
        out["active_units"] = active_units(z_mean, config.active_threshold)
    if pareto_k is not None:
        out.update(pareto_k_summary(pareto_k, config.iwae_k))
    out["exact_log_likelihood"] = None
    out["num_points"] = x.shape[0]
    per_point = {"elbo": b["elbo"], "iwae": b["iwae"]}
    if pareto_k is not None:
        per_point["pareto_k"] = pareto_k
    if exact is not None:
        out["exact_log_likelihood"] = exact.mean().item()
        out["gap_elbo"] = out["exact_log_likelihood"] - out["elbo"]
        out["gap_iwae"] = out["exact_log_likelihood"] - out["iwae"]
        per_point["exact_log_likelihood"] = exact
    out["per_point"] = per_point
    return out


#: name of the plate that holds the draws θ_s in :func:`global_log_weights` (left of every model plate)
GLOBAL_DRAWS_PLATE = "_global_draws"

#: largest draws × points scored at once by :func:`global_log_weights` (as :attr:`EvalConfig.max_rows`)
GLOBAL_MAX_ROWS = 25_000

#: why a point-mass q(θ) gets no k̂
POINT_MASS_NOTE = ("q(θ) is a point mass (AutoDelta, the map guide): it has no density, so the importance weights "
                   "p(θ, x) / q(θ) are undefined and no k̂ is estimated")


def _plate_nesting(*traces: Any) -> int:
    """How many plate dims the sites of ``traces`` use (the innermost plate's dim counted from the right)."""
    return max((-f.dim for tr in traces for site in tr.nodes.values() if site["type"] == "sample"
                for f in site["cond_indep_stack"] if f.vectorized), default=0)


def _log_density_per_draw(trace: Any, num_draws: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Σ of every site's log-density in ``trace`` per draw of :data:`GLOBAL_DRAWS_PLATE`, shape (S,), with the
    enumerated dims summed out (log-sum-exp) and every other plate multiplied out (summed in log space) — the
    tensor-variable elimination ``TraceEnum_ELBO`` does, stopped at the draws' plate instead of summing it too.

    Contracted in float64 (each site's log-density cast first), so the N per-point terms add up without the
    float32 rounding of a long sum. Also returns, per draw, the size of what was summed — Σ over sites and plates
    of |log-density|, its largest value over enumerated dims (S,) float64 — and the machine epsilon of the
    coarsest dtype among the sites' log-densities: with them :func:`psis` knows the rounding the sum carries."""
    trace.compute_log_prob()  # scale and mask applied
    trace.pack_tensors()
    draws = trace.plate_to_symbol[GLOBAL_DRAWS_PLATE]
    sum_dims = set(trace.symbol_to_dim) - set(trace.plate_to_symbol.values())
    tree: OrderedDict[frozenset[str], list[torch.Tensor]] = OrderedDict()
    magnitude = torch.zeros((), dtype=torch.float64)
    resolution = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and not isinstance(site["fn"], _Subsample):
            ordinal = frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
            packed = site["packed"]["log_prob"]
            resolution = max(resolution, torch.finfo(packed.dtype).eps)
            term = packed.double()
            term._pyro_dims = packed._pyro_dims
            tree.setdefault(ordinal, []).append(term)
            size = term.detach().abs()
            enum = [i for i, d in enumerate(term._pyro_dims) if d in sum_dims]
            kept = [d for d in term._pyro_dims if d not in sum_dims]
            size = size.amax(enum) if enum else size
            other = [i for i, d in enumerate(kept) if d != draws]
            magnitude = magnitude + (size.sum(other) if other else size).cpu()
    # packing drops size-1 dims, so with one draw no term carries the draws' dim
    has_draws = any(draws in t._pyro_dims for terms in tree.values() for t in terms)
    out = contract_to_tensor(tree, sum_dims, target_ordinal=frozenset({draws} if has_draws else ()))
    return out.reshape(-1).expand(num_draws), magnitude.reshape(-1).expand(num_draws), resolution


@torch.no_grad()
def global_log_weights(model: Any, guide: Any, x: torch.Tensor, num_samples: int,
                       max_rows: int = GLOBAL_MAX_ROWS) -> torch.Tensor:
    r"""log w_s = log p(θ_s) + Σ_n log p(x_n | θ_s) − log q(θ_s) for S = ``num_samples`` draws θ_s ~ q(θ), shape (S,),
    in float64 (summed from the model's and guide's log-densities cast to float64, so log p − log q keeps what
    the terms hold).

    q(θ) is ``guide.globals`` (a :class:`~pyro_lvm.guides.GlobalGuide`) or ``guide`` itself (an autoguide over
    the model's globals). Generic over models, by Pyro traces: the draws sit in a plate left of every model plate;
    the model is replayed on them over all of ``x`` (no subsampling, so no rescaling), with every unobserved
    discrete site enumerated in parallel and summed out (a mixture's ``c`` under any assignment scheme: an amortized
    q(c|x) is not used; a collapsed model has none); log q(θ) is the guide trace's log-density, Jacobians of its
    transforms included. So each log w_s is −``TraceEnum_ELBO``'s loss for one particle with q(θ) alone as guide.
    Run it with the model's and guide's parameters local (:func:`pyro_lvm.runtime.local_params`); draws come from
    the caller's RNG, in chunks of at most ``max_rows`` draws × points.
    """
    return _global_log_weights(model, guide, x, num_samples, max_rows)[0]


def _global_log_weights(model: Any, guide: Any, x: torch.Tensor, num_samples: int,
                        max_rows: int = GLOBAL_MAX_ROWS) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`global_log_weights`, with the Σ |log-density| behind each weight (S,) and the terms' epsilon."""
    q = getattr(guide, "globals", guide)
    state = torch.get_rng_state()  # a probe trace learns the plate nesting without using up random numbers
    try:
        probe_q = poutine.trace(q).get_trace(x)
        probe_p = poutine.trace(poutine.replay(model, trace=probe_q)).get_trace(x)
    finally:
        torch.set_rng_state(state)
    nesting = _plate_nesting(probe_q, probe_p)
    enumerable = config_enumerate(model, "parallel")
    step = max(1, max_rows // max(1, x.shape[0]))
    parts, sizes, resolution = [], [], 0.0
    for s0 in range(0, num_samples, step):
        s = min(step, num_samples - s0)
        with pyro.plate(GLOBAL_DRAWS_PLATE, s, dim=-(nesting + 1)):
            guide_tr = poutine.trace(q).get_trace(x)
            replayed = poutine.enum(poutine.replay(enumerable, trace=guide_tr), first_available_dim=-(nesting + 2))
            model_tr = poutine.trace(replayed).get_trace(x)
        log_p, size_p, eps_p = _log_density_per_draw(model_tr, s)
        log_q, size_q, eps_q = _log_density_per_draw(guide_tr, s)
        parts.append(log_p - log_q)
        sizes.append(size_p + size_q.to(size_p.device))
        resolution = max(resolution, eps_p, eps_q)
    return torch.cat(parts), torch.cat(sizes), resolution


def global_pareto_k(model: Any, guide: Any, x: object, *, num_samples: int = 1000,
                    seed: int | None = None) -> dict[str, Any]:
    r"""Can q(θ) stand in for p(θ | x)? The Pareto k̂ of S importance weights over the global latents.

    For S draws θ_s ~ q(θ): log w_s = log p(θ_s) + Σ_n log p(x_n | θ_s) − log q(θ_s) over the whole of ``x``
    (:func:`global_log_weights`: any discrete local summed out). Pass the data the guide was fitted to (the
    training split): q(θ) approximates p(θ | x_train), and the weights are p(θ | x) / q(θ) up to p(x).
    PSIS (:func:`psis`, ArviZ's ``psislw``) smooths them; returns

    * ``pareto_k_theta``: k̂ (< 0.5: finite variance; > 0.7: q(θ) misses mass of p(θ|x); −inf: constant
      weights, q(θ) is the posterior), and ``ess_theta`` = 1 / Σ_s w̃_s², the importance-sampling effective
      sample size of the smoothed, normalised weights w̃ (from 1 to S);
    * ``elbo_theta`` = (1/S) Σ_s log w_s and ``iwae_theta`` = log (1/S) Σ_s w_s, total nats over ``x``:
      E[elbo_theta] = log p(x) − KL(q(θ) ‖ p(θ|x)) and E[iwae_theta] ≤ log p(x), so iwae_theta − elbo_theta
      estimates a lower bound on that KL (tight only where k̂ is small);
    * ``num_samples`` = S, ``num_points`` = N, and ``note`` (why k̂ is missing, else ``None``).

    A point-mass q(θ) (the ``map`` guide's AutoDelta) has no density, so no weights: every estimate is ``None``
    and ``note`` says why. Runs in eval mode with module-local Pyro parameters, without gradients; ``seed``
    fixes the draws without touching the caller's RNG (``None``: draw from it). Raises ``ValueError`` naming
    ``num_samples`` below :data:`MIN_PSIS_SAMPLES`, the fewest draws a Pareto tail fit takes.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < MIN_PSIS_SAMPLES:
        raise ValueError(f"num_samples: must be an integer >= {MIN_PSIS_SAMPLES}, the fewest draws PSIS fits a "
                         f"Pareto tail to, got {num_samples!r}")
    x = model.validate(x, name="x") if hasattr(model, "validate") else torch.as_tensor(x)
    out: dict[str, Any] = {"pareto_k_theta": None, "ess_theta": None, "elbo_theta": None, "iwae_theta": None,
                           "num_samples": num_samples, "num_points": int(x.shape[0]), "note": None}
    if getattr(guide, "is_point_mass", False) or isinstance(getattr(guide, "globals", guide), AutoDelta):
        out["note"] = POINT_MASS_NOTE
        return out
    modules = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with local_params(model, guide), seeded(seed), torch.no_grad():
            log_w, size, resolution = _global_log_weights(model, guide, x, num_samples)
    finally:
        for m, mode in zip(modules, was_training, strict=True):
            m.train(mode)
    log_w = log_w.double()
    smoothed, k_hat = psis(log_w.unsqueeze(-1), magnitude=size.max().reshape(1), resolution=resolution)
    w = torch.softmax(smoothed[:, 0], 0)
    out.update(pareto_k_theta=k_hat.item(), ess_theta=(1.0 / (w * w).sum()).item(), elbo_theta=log_w.mean().item(),
               iwae_theta=(torch.logsumexp(log_w, 0) - math.log(num_samples)).item())
    return out


def public(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without the per-point arrays, for JSON."""
    return {k: v for k, v in metrics.items() if k != "per_point"}
