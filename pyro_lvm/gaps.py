r"""The inference gap split in two (Cremer, Li & Duvenaud 2018, "Inference Suboptimality in Variational
Autoencoders").

For a fitted model with a per-point latent z and a guide of family Q, on held-out points x:

.. math::
    \log p(x) - \mathrm{ELBO}(q_\phi(\cdot|x))
      = \underbrace{\log p(x) - \max_{q \in Q} \mathrm{ELBO}(q)}_{\text{approximation gap}}
      + \underbrace{\max_{q \in Q} \mathrm{ELBO}(q) - \mathrm{ELBO}(q_\phi(\cdot|x))}_{\text{amortization gap}}

The approximation gap, KL(q* ‖ p(z|x)), is what the family Q cannot represent; the amortization gap is what the
encoder loses by sharing one network across points. ``max_{q ∈ Q}`` is found per point: each point gets its own
copy of the guide's per-point parameters (``guide.local_parameters(x)``, the amortized q as the start) and
Adam maximises its ELBO with the model and the guide's networks held fixed (``guide.distribution_from(params)``
turns them back into a q in the same family). With the model fixed, the per-point optimum of a diagonal
Gaussian is the mean-field optimum, so for factor analysis the approximation gap of the diagonal family is the
closed form ``FactorAnalysis.mean_field_gap()`` (tested).

log p(x) is exact where the model has it (``model.log_likelihood(x)``); otherwise it is IWAE-K with the
per-point optimised q as the proposal (the member of Q closest to p(z|x) at each point, so usually the
tightest of the family's IWAE bounds). IWAE-K is a stochastic *lower* bound, so the approximation gap is then
underestimated, by at most log p(x) − E[IWAE-K] (which shrinks as K grows); the amortization gap does not use
it.

Monte Carlo error. The final ELBOs are means of S log-weights log w = log p(x, z) − log q(z|x), z ~ q, per
point; each point's standard error is sd(log w)/√S, and that of a mean over N points is
√(Σᵢ seᵢ²)/N (reported as ``*_mc_error``, beside the spread over points, ``*_se`` = sd over points/√N). The
IWAE estimate's error is the delta-method √(Σₖwₖ²/(Σₖwₖ)² − 1/K) per point. A gap's MC error adds its two
terms' in quadrature (for the approximation gap with IWAE-K from the same draws as the best ELBO this is
conservative: the two estimates are positively correlated).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.distributions import Distribution

from pyro_lvm.config import ReadableConfig, check_config
from pyro_lvm.evaluate import log_weight_terms, release_freed_memory
from pyro_lvm.models.base import LatentModel, data_plate
from pyro_lvm.runtime import local_params, seeded


@dataclass
class GapConfig(ReadableConfig):
    #: most Adam steps of the per-point optimisation
    num_steps: int = 3000
    #: Adam's learning rate for the per-point parameters (cut by lr_decay at each plateau)
    lr: float = 0.01
    #: draws per point per step for the optimisation's reparameterized ELBO gradient
    elbo_particles: int = 16
    #: draws per point for the final ELBO estimates of the amortized and the per-point q
    eval_particles: int = 1000
    #: importance samples per point for IWAE-K, the log p(x) estimate of models without an exact one
    iwae_k: int = 5000
    #: steps per convergence check: the optimisation's mean ELBO is averaged over each window of this many steps
    check_every: int = 50
    #: a window whose mean ELBO beats the best window so far by less than this (nats per point) is no improvement
    tol: float = 0.01
    #: windows without improvement that make a plateau
    patience: int = 2
    #: the learning rate is multiplied by this at each plateau
    lr_decay: float = 0.3
    #: plateaus that cut the learning rate; the next one ends the optimisation (converged)
    lr_cuts: int = 3
    #: largest points x draws scored at once; bounds peak memory
    max_rows: int = 25_000
    #: fixes every draw without touching the caller's RNG (``None``: draw from the caller's RNG)
    seed: int | None = None

    def __post_init__(self) -> None:
        check_config(self, positive_int=("num_steps", "elbo_particles", "eval_particles", "iwae_k", "check_every",
                                         "patience", "max_rows"),
                     nonneg_int=("lr_cuts",), positive=("lr",), nonneg=("tol",), unit=("lr_decay",))


class FixedPosterior:
    """A guide callable ``g(x, total_size=None)`` that samples the model's local site from a given q (batch
    shape (N,)) inside the shared data plate, so :func:`~pyro_lvm.evaluate.log_weight_terms` scores any q."""

    def __init__(self, site: str, q: Distribution) -> None:
        self.site, self.q = site, q

    def __call__(self, x: torch.Tensor, total_size: int | None = None) -> None:
        with data_plate(x.shape[0], total_size, x.device):
            pyro.sample(self.site, self.q)


@contextmanager
def frozen(*modules: object) -> Iterator[None]:
    """Every parameter of ``modules`` with ``requires_grad=False`` for a block (no gradient reaches them, none of
    their ``.grad`` changes); each parameter's own setting is restored afterwards."""
    params: dict[int, torch.nn.Parameter] = {}
    for m in modules:
        if isinstance(m, torch.nn.Module):
            params.update((id(p), p) for p in m.parameters())
    flags = [(p, p.requires_grad) for p in params.values()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _eval_mode(*modules: object) -> Iterator[None]:
    modes = [(m, m.training) for m in modules if isinstance(m, torch.nn.Module)]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def weight_statistics(model: LatentModel, q_of: Callable[[slice], Distribution], x: torch.Tensor,
                      num_samples: int, max_rows: int = 25_000) -> dict[str, torch.Tensor]:
    r"""Per point of ``x``, from ``num_samples`` draws z ~ q (``q_of(rows)`` is q for the points ``x[rows]``):

    * ``elbo`` = mean of log w, ``elbo_mc_se`` = sd(log w)/√S (its Monte Carlo standard error);
    * ``iwae`` = log (1/S) Σ w, ``iwae_mc_se`` = √(Σw²/(Σw)² − 1/S), the delta-method standard error of the
      mean weight's log.

    All float64 on the CPU, shape (N,). Draws come in chunks of at most ``max_rows`` points x samples.
    """
    n = x.shape[0]
    points = max(1, min(n, max_rows // num_samples))
    samples = max(1, min(num_samples, max_rows // points))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("elbo", "elbo_mc_se", "iwae", "iwae_mc_se")}
    for rows in _chunks(n, points):
        guide = FixedPosterior(model.local_site, q_of(rows))
        total = total_sq = 0.0
        ref: torch.Tensor | None = None  # (P,) each point's first log-weight: sums of squares about it do not cancel
        lse, lse2 = [], []
        for s0 in range(0, num_samples, samples):
            t = log_weight_terms(model, guide, x[rows], min(samples, num_samples - s0))
            log_w = (t["log_lik"] + t["log_prior"] - t["log_q"]).double().cpu()  # (s, P)
            ref = log_w[0].clone() if ref is None else ref
            total, total_sq = total + (log_w - ref).sum(0), total_sq + (log_w - ref).square().sum(0)
            lse.append(torch.logsumexp(log_w, 0))
            lse2.append(torch.logsumexp(2 * log_w, 0))
            del t, log_w
        shift = total / num_samples
        mean = ref + shift
        var = ((total_sq - num_samples * shift.square()) / max(num_samples - 1, 1)).clamp_min(0.0)
        lse_all, lse2_all = torch.logsumexp(torch.stack(lse), 0), torch.logsumexp(torch.stack(lse2), 0)
        out["elbo"].append(mean)
        out["elbo_mc_se"].append((var / num_samples).sqrt())
        out["iwae"].append(lse_all - math.log(num_samples))
        out["iwae_mc_se"].append((torch.exp(lse2_all - 2 * lse_all) - 1.0 / num_samples).clamp_min(0.0).sqrt())
        release_freed_memory()
    return {k: torch.cat(v) for k, v in out.items()}


def optimise_local_parameters(model: LatentModel, guide: Any, x: torch.Tensor, params: dict[str, torch.Tensor],
                              config: GapConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    r"""Maximise each point's ELBO over its own copy of ``params`` (the points on dim 0), model and guide fixed.

    All points move at once, as one batched tensor per entry, under one Adam: the objective is Σᵢ ELBOᵢ, whose
    gradient with respect to point i's parameters is that of ELBOᵢ alone, so each point is optimised as if on its
    own (Adam's steps are per element). Each step's ELBOᵢ is the mean of ``elbo_particles`` reparameterized
    log-weights; points are scored in chunks of ``max_rows // elbo_particles``.

    Convergence: the mean over points of those per-step estimates is averaged over windows of ``check_every``
    steps; a window that beats the best one so far by less than ``tol`` nats per point is no improvement, and
    ``patience`` such windows in a row are a plateau. At a plateau the learning rate is multiplied by
    ``lr_decay`` (at most ``lr_cuts`` times, so the noise of Adam's steps shrinks onto the optimum); the plateau
    after the last cut ends the run, ``converged`` True. ``num_steps`` reached first: ``converged`` False.

    A plateau of the *mean* is judged, so points still drifting slowly are not waited for: on an ill-conditioned
    posterior (strongly correlated, for a diagonal family) from a start far away, Adam's diagonal steps leave
    some points short of their optimum when the mean stalls (a fixed rotated factor-analysis model of
    breast_cancer, 5 factors, from an encoder 300 nats off: the mean stalled after 3,500 steps 0.27 nats per
    point above the analytic optimum of 9.42, a tenth of the points more than 0.8 above). A run stopped short
    can only *underestimate* the best ELBO, so the approximation gap it reports errs high and the amortization
    gap low; ``num_steps``, ``tol`` and ``lr`` trade time for that.

    Returns the optimised parameters (detached) and ``{"steps", "converged", "final_lr", "history"}``, the history
    holding each window's step, mean ELBO and learning rate. Run it inside ``local_params(model, guide)``.
    """
    free = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(free.values()), lr=config.lr)
    n, lr = x.shape[0], config.lr
    rows_per_chunk = max(1, config.max_rows // config.elbo_particles)
    window: list[float] = []
    history: list[dict[str, float]] = []
    best, bad, cuts, converged, step = -math.inf, 0, 0, False, 0
    with frozen(model, guide):
        for step in range(1, config.num_steps + 1):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for rows in _chunks(n, rows_per_chunk):
                q = guide.distribution_from({k: v[rows] for k, v in free.items()})
                t = log_weight_terms(model, FixedPosterior(model.local_site, q), x[rows], config.elbo_particles)
                elbo = (t["log_lik"] + t["log_prior"] - t["log_q"]).mean(0)  # (P,) each point's ELBO estimate
                (-elbo.sum()).backward()
                total += float(elbo.detach().sum())
            opt.step()
            window.append(total / n)
            if step % config.check_every:
                continue
            mean = sum(window) / len(window)
            window = []
            history.append({"step": step, "elbo": mean, "lr": lr})
            if mean > best + config.tol:
                best, bad = mean, 0
                continue
            bad += 1
            if bad < config.patience:
                continue
            if cuts == config.lr_cuts:
                converged = True
                break
            cuts, bad, lr = cuts + 1, 0, lr * config.lr_decay
            for group in opt.param_groups:
                group["lr"] = lr
    info = {"steps": step, "converged": converged, "final_lr": lr, "history": history}
    return {k: v.detach() for k, v in free.items()}, info


def _mean_and_errors(values: torch.Tensor, mc_se: torch.Tensor | None) -> tuple[float, float, float]:
    """(mean over points, its standard error over points, its Monte Carlo standard error √(Σ seᵢ²)/N)."""
    n = values.shape[0]
    spread = float(values.std() / math.sqrt(n)) if n > 1 else math.nan
    mc = 0.0 if mc_se is None else float(mc_se.square().sum().sqrt() / n)
    return float(values.mean()), spread, mc


def inference_gaps(model: LatentModel, guide: Any, x: object, config: GapConfig | None = None,
                   **overrides: Any) -> dict[str, Any]:
    r"""log p(x), the amortized ELBO, the best per-point ELBO in the guide's family, and the two gaps.

    ``x``: held-out points (array, tensor or DataFrame (N, D)); ``guide``: a local guide with
    ``local_parameters``/``distribution_from`` (every amortized guide and flow; the ``exact`` guide has no
    per-point parameters, so its per-point q is its amortized q = p(z|x) and the optimisation is skipped).
    ``overrides`` replace fields of ``config`` (``inference_gaps(m, g, x, num_steps=500, seed=0)``).

    * ``log_px``: exact, or IWAE-K (``iwae_k``) with the per-point q as proposal (``log_px_method`` says which);
    * ``amortized_elbo``: ELBO of q_φ(z|x), the guide as fitted, from ``eval_particles`` draws per point;
    * ``best_elbo``: ELBO of the per-point optimum (:func:`optimise_local_parameters`), from
      ``max(eval_particles, iwae_k)`` draws where IWAE-K is needed (the same draws), else ``eval_particles``;
    * ``approximation_gap`` = log_px − best_elbo, ``amortization_gap`` = best_elbo − amortized_elbo.

    Each is reported as its mean over points (nats per point) with ``*_se`` (standard error over points) and
    ``*_mc_error`` (Monte Carlo standard error of that mean); ``per_point`` holds the (N,) float64 tensors,
    with each point's Monte Carlo standard errors (``*_mc_se``); ``optimisation`` says how the per-point
    optimisation ended. Model and guide parameters are frozen while it runs (``requires_grad`` restored after),
    both are put in eval mode (restored after), everything runs with module-local Pyro parameters, and ``seed``
    fixes every draw and restores the caller's RNG state.
    """
    config = config or GapConfig()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GapConfig)})
        if unknown:
            raise ValueError(f"inference_gaps: unknown setting(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(f.name for f in dataclasses.fields(GapConfig))}")
        config = dataclasses.replace(config, **overrides)
    from pyro_lvm.wrap import model_for

    model = model_for(model, guide)
    if getattr(model, "local_site", None) is None or not hasattr(guide, "local_parameters"):
        raise ValueError("guide: inference gaps need a model with a per-point latent and a local guide (one with "
                         f"local_parameters and distribution_from); got {type(model).__name__} with "
                         f"{type(guide).__name__}")
    x = model.validate(x, name="x")
    n = x.shape[0]
    started = time.perf_counter()
    with local_params(model, guide), seeded(config.seed), _eval_mode(model, guide):
        with torch.no_grad():
            exact = model.log_likelihood(x)
            start = guide.local_parameters(x)
        wrong = {k: tuple(v.shape) for k, v in start.items() if v.shape[:1] != (n,)}
        if wrong:
            raise ValueError(f"guide: local_parameters(x) must put the {n} points on dim 0; got shapes {wrong}")
        amortized = weight_statistics(model, lambda rows: guide.distribution(x[rows]), x, config.eval_particles,
                                      config.max_rows)
        if start:
            params, info = optimise_local_parameters(model, guide, x, start, config)
            draws = config.eval_particles if exact is not None else max(config.eval_particles, config.iwae_k)
            best = weight_statistics(
                model, lambda rows: guide.distribution_from({k: v[rows] for k, v in params.items()}), x, draws,
                config.max_rows)
        else:  # no per-point parameters (the exact guide): the family's best q at each point is the guide's own
            info = {"steps": 0, "converged": True, "final_lr": None, "history": []}
            draws = config.eval_particles
            best = amortized
            if exact is None:
                draws = config.iwae_k
                best = weight_statistics(model, lambda rows: guide.distribution(x[rows]), x, draws, config.max_rows)
    if exact is not None:
        log_px, log_px_se, method = exact.detach().double().cpu(), torch.zeros(n, dtype=torch.float64), "exact"
    else:
        log_px, log_px_se, method = best["iwae"], best["iwae_mc_se"], f"iwae-{draws}"
    per_point = {
        "log_px": log_px, "log_px_mc_se": log_px_se,
        "amortized_elbo": amortized["elbo"], "amortized_elbo_mc_se": amortized["elbo_mc_se"],
        "best_elbo": best["elbo"], "best_elbo_mc_se": best["elbo_mc_se"],
        "approximation_gap": log_px - best["elbo"],
        "approximation_gap_mc_se": (log_px_se.square() + best["elbo_mc_se"].square()).sqrt(),
        "amortization_gap": best["elbo"] - amortized["elbo"],
        "amortization_gap_mc_se": (best["elbo_mc_se"].square() + amortized["elbo_mc_se"].square()).sqrt(),
    }
    out: dict[str, Any] = {"num_points": n, "log_px_method": method}
    for key in ("log_px", "amortized_elbo", "best_elbo", "approximation_gap", "amortization_gap"):
        out[key], out[f"{key}_se"], out[f"{key}_mc_error"] = _mean_and_errors(per_point[key], per_point[f"{key}_mc_se"])
    out.update(amortized_particles=config.eval_particles, best_particles=draws, elbo_particles=config.elbo_particles,
               optimisation=info, seconds=time.perf_counter() - started, per_point=per_point)
    return out
