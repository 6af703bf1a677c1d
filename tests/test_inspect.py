"""Every fit as ArviZ InferenceData (``pyro_lvm.to_inference_data``), and the PSIS diagnostics of evaluation.

Statistical checks run in float64 on factor analysis, whose posterior p(z|x) = N(m(x), G) is known: for a
diagonal Gaussian q = N(m, D) the weights p/q have a Pareto tail of shape k = 1 − 1/λ_max(D⁻¹G) (the
direction where q is narrowest relative to p), which for the best diagonal Gaussian (precisions diag G⁻¹)
in two dimensions is |ρ|, the posterior correlation, and for the same q with its scales halved is
1 − (1 − |ρ|)/4. Monte Carlo tolerances are a few standard errors computed from the same draws.
"""

from __future__ import annotations

import math
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch

import pyro_lvm
from pyro_lvm import GUIDES, MODELS, build_guide, evaluate, fit, to_inference_data
from pyro_lvm.data import make_factor_analysis_data
from pyro_lvm.evaluate import MIN_PSIS_SAMPLES, PsisAccumulator, log_weight_terms, per_point_bounds, psis
from pyro_lvm.guides import GuideConfig
from pyro_lvm.models import FactorAnalysis, FactorAnalysisConfig
from pyro_lvm.models.gaussian_mixture import GaussianMixture, GaussianMixtureConfig, component_order
from pyro_lvm.posterior_report import FOCUS_LATENTS, FOCUS_POINTS, GLOBAL_BUDGET, focus_of, write_netcdf
from pyro_lvm.runtime import seeded
from pyro_lvm.saving import materialize

SMALL = GuideConfig(hidden=(8,), flow_hidden=(8,))
PAIRS = [(m, g) for m in MODELS.names() for g in GUIDES.names()
         if GUIDES[g].requires(MODELS[m].example()[0].traits) is None]
GROUPS = ("posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data")


def _fitted(model_name: str, guide_name: str) -> tuple[pyro_lvm.LatentModel, object, torch.Tensor]:
    with seeded(0):
        model, x = MODELS[model_name].example(seed=0)
        guide = build_guide(guide_name, model, SMALL)
    fit(model, guide, x, None, epochs=2, batch_size=None, lr=1e-2, seed=0, quiet=True)
    return model, guide, x


def _built(model_name: str, guide_name: str) -> tuple[pyro_lvm.LatentModel, object, torch.Tensor]:
    """An unfitted guide on the model's example, its lazily built parameters made: what is exported and how
    does not depend on the fit (each fit costs ~0.15 s, and there are ~30 pairs)."""
    with seeded(0):
        model, x = MODELS[model_name].example(seed=0)
        guide = build_guide(guide_name, model, SMALL)
    materialize(model, guide)
    return model, guide, x


def rc_snapshot() -> dict[str, object]:
    """matplotlib's rcParams as a plain dict, read without resolving the backend (``rcParams["backend"]``, and so
    ``rcParams == other``, which reads every key, would pick one and import pyplot's choice)."""
    import matplotlib

    return {k: dict.__getitem__(matplotlib.rcParams, k) for k in dict.keys(matplotlib.rcParams)}


def _continuous_local(posterior: object) -> list[str]:
    return [v for v in posterior.data_vars
            if posterior[v].dims[2:3] == ("point",) and np.issubdtype(posterior[v].dtype, np.floating)]


@pytest.mark.parametrize("model_name,guide_name", PAIRS)
def test_every_pair_exports_to_arviz(tmp_path: Path, model_name: str, guide_name: str) -> None:
    """Groups, dims and shapes as documented (read from the draws' dims: no site is assumed); the raw and PSIS
    means of every continuous local latent; az.summary, az.plot_posterior on an Agg figure (no pyplot), a
    netCDF round trip (atomic write) that keeps every array; az.loo for every model with Bayesian globals."""
    from matplotlib.figure import Figure

    model, guide, x = _built(model_name, guide_name)
    points, s = [0, 3, 5], 30
    idata = to_inference_data(model, guide, x, num_samples=s, points=points, seed=0)
    assert set(GROUPS) <= set(idata.groups())
    p, d = len(points), model.data_dim
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "point", "feature")
    assert idata.posterior_predictive["x"].shape == (1, s, p, d)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "point") and idata.log_likelihood["x"].shape == (1, s, p)
    for name in ("log_p", "log_q"):
        assert idata.sample_stats[name].dims == ("chain", "draw", "point")
    assert idata.sample_stats["pareto_k"].dims == ("point",)
    assert idata.observed_data["x"].dims == ("point", "feature") and idata.observed_data["x"].shape == (p, d)
    np.testing.assert_array_equal(idata.observed_data["x"].values, x[points].numpy())
    assert idata.posterior.coords["point"].values.tolist() == points
    assert idata.posterior_predictive.coords["feature"].values.tolist() == list(range(d))
    post = idata.posterior
    for name, array in post.data_vars.items():
        assert array.dims[:2] == ("chain", "draw") and array.shape[:2] == (1, s), name
    if hasattr(model, "sites"):  # a wrapped function: each local site under its own name, in its support
        for name, site in model.sites.items():
            assert post[name].shape == (1, s, p, *site.event_shape), name
            assert bool(site.support.check(torch.as_tensor(post[name].values)).all()), name
    elif model.local_site is not None:
        assert post[model.local_site].dims == ("chain", "draw", "point", "latent")
        assert post[model.local_site].shape == (1, s, p, model.latent_dim)
    if isinstance(model, GaussianMixture):  # its globals, components ordered by weight, and each point's assignment
        k = model.num_components
        assert post["weights"].shape == (1, s, k) and post["locs"].shape == (1, s, k, d)
        assert post["scales"].dims == ("chain", "draw", "component", "feature")
        assert post["corr_chol"].shape == (1, s, k, d, d)  # the example has full covariances
        assert post["c"].shape == (1, s, p) and set(np.unique(post["c"])) <= set(range(k))
    attrs = post.attrs
    assert attrs["model"] == model_name and attrs["guide"] == guide_name and attrs["num_samples"] == s
    for key in ("pyro_lvm_version", "pyro_version", "torch_version", "arviz_version"):
        assert attrs[key]

    # every continuous local latent v gets v_mean_raw (the draws' mean) and v_mean_psis (NaN where k̂ > 0.7)
    k_hat = idata.sample_stats["pareto_k"].values
    local = _continuous_local(post)
    assert {f"{v}_mean_{m}" for v in local for m in ("raw", "psis")} == \
        {n for n in idata.sample_stats.data_vars if "_mean_" in n}
    for v in local:
        raw, corrected = idata.sample_stats[f"{v}_mean_raw"], idata.sample_stats[f"{v}_mean_psis"]
        assert raw.dims == corrected.dims == post[v].dims[2:]
        np.testing.assert_allclose(raw.values, post[v].values[0].mean(0), rtol=1e-6, atol=1e-6)
        untrusted = ~(k_hat <= 0.7)
        assert np.isnan(corrected.values[untrusted]).all() and np.isfinite(corrected.values[~untrusted]).all()

    summary = az.summary(idata, kind="stats")
    assert len(summary) > 0 and np.isfinite(summary["mean"]).all()
    focus = focus_of(post)
    assert focus.local == (not model.traits.global_sites)  # the guides' latents: the globals where there are any
    n = sum(math.prod(v.shape[2:]) for v in focus.select(post).data_vars.values())
    assert 1 <= n <= max(GLOBAL_BUDGET, FOCUS_POINTS * FOCUS_LATENTS)
    shown = focus_of(post, points=1, budget=2).select(post)  # two panels: a plot's cost is its panels
    n = sum(math.prod(v.shape[2:]) for v in shown.data_vars.values())
    before = rc_snapshot()
    fig = Figure()
    az.plot_posterior(shown, ax=fig.subplots(1, n, squeeze=False).ravel(), show=False)
    assert fig.axes[0].has_data() and rc_snapshot() == before

    write_netcdf(idata, tmp_path / "fit.nc")
    loaded = az.from_netcdf(tmp_path / "fit.nc")
    for group in GROUPS:
        for name, array in idata[group].data_vars.items():
            np.testing.assert_array_equal(loaded[group][name].values, array.values, err_msg=f"{group}.{name}")
    assert loaded.posterior.attrs["guide"] == guide_name
    assert [f.name for f in tmp_path.iterdir()] == ["fit.nc"]  # no temporary file left

    if model.traits.global_sites:  # PSIS-LOO over draws θ ~ q(θ); a point mass makes every draw the same θ̂
        loo = az.loo(idata, pointwise=True)
        assert loo.pareto_k.shape == (p,) and math.isfinite(loo.elpd_loo)
        if guide.is_point_mass:  # equal weights: elpd_loo = Σ_n log p(x_n | θ̂) (draws equal to float32 rounding)
            assert loo.elpd_loo == pytest.approx(idata.log_likelihood["x"].values[0, 0].sum(), abs=1e-3)


def test_mixture_draws_are_relabelled_by_weight_and_loo_works() -> None:
    """Components come out ordered by the point estimate's weights (here the reverse of the fit's own labels),
    consistently across θ and c; log_likelihood is log p(x_n | θ_s) at the exported draws, so az.loo works;
    log_q is the amortized q(c|x) of each drawn component."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(6, 2, generator=g) - 3, torch.randn(14, 2, generator=g) + 3])  # a small, a big cluster
    with seeded(0):
        model = GaussianMixture(GaussianMixtureConfig(2, 2, assignments="amortized"))
        model.init_from_data(x, seed=0)
        guide = build_guide("meanfield", model, SMALL)
    fit(model, guide, x, None, epochs=2, batch_size=None, lr=1e-2, seed=0, quiet=True)
    order = component_order(guide.point_estimate(x))
    assert order.tolist() == [1, 0]  # the fit labels the big cluster 1: relabelling has work to do
    idata = to_inference_data(model, guide, x, num_samples=200, seed=0)
    post = idata.posterior
    assert (post["weights"].values[..., 0] > post["weights"].values[..., 1]).all()
    assert (post["locs"].values[..., 0, :] > 0).all() and (post["locs"].values[..., 1, :] < 0).all()  # big one at +3
    c = post["c"].values[0]  # (draw, point)
    assert (c[:, 6:] == 0).mean() > 0.95 and (c[:, :6] == 1).mean() > 0.95

    loo = az.loo(idata, pointwise=True)
    assert math.isfinite(loo.elpd_loo) and loo.pareto_k.shape == (len(x),)
    for s in (0, 117):
        theta = {k: torch.as_tensor(post[k].values[0, s]) for k in model.global_sites}
        torch.testing.assert_close(model.log_likelihood_at(x, theta),
                                   torch.as_tensor(idata.log_likelihood["x"].values[0, s]), rtol=0, atol=1e-4)
    with pyro_lvm.local_params(model, guide), torch.no_grad():
        log_q = torch.log_softmax(guide.assignments.distribution(x).logits, -1)
    fit_labels = order[torch.as_tensor(c[0])]  # the first draw's components under the fit's own labels
    torch.testing.assert_close(log_q.gather(-1, fit_labels.unsqueeze(-1)).squeeze(-1),
                               torch.as_tensor(idata.sample_stats["log_q"].values[0, 0]), rtol=0, atol=1e-5)


def _rotated_fa(n: int = 40, seed: int = 0) -> tuple[FactorAnalysis, torch.Tensor]:
    """FA at its true parameters, W turned so the posterior's axes sit at 45° to the coordinates (|ρ| ≈ 0.41)."""
    x, truth = make_factor_analysis_data(n, 6, 2, seed=seed)
    model = FactorAnalysis(FactorAnalysisConfig(6, 2))
    model.set_parameters(truth["W"], truth["mu"], truth["psi"])
    with torch.no_grad():
        _, eigvecs = torch.linalg.eigh(model.posterior_covariance())
    c = math.sqrt(0.5)
    model.rotate(eigvecs @ torch.tensor([[c, -c], [c, c]]))  # orthogonal: p(x) unchanged, p(z|x) correlated
    return model, x


def _diagonal_guide(model: FactorAnalysis, scale: float = 1.0, shift: float = 0.0) -> object:
    """The diagonal guide at the best diagonal Gaussian (mean of p(z|x), precisions diag G⁻¹), its standard
    deviations times ``scale`` and its mean moved by ``shift`` posterior standard deviations."""
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    with torch.no_grad():
        G = model.posterior_covariance()
        A = G @ (model.W.T / model.noise_variance)  # posterior mean = A (x − μ)
        guide.loc.weight.copy_(A)
        guide.loc.bias.copy_(-A @ model.mu + shift * G.diagonal().sqrt())
        sd = scale * model.posterior_precision().diagonal().rsqrt() - 1e-6  # the head adds 1e-6
        guide.scale.weight.zero_()
        guide.scale.bias.copy_(torch.log(torch.expm1(sd)))  # softplus⁻¹
    return guide


@pytest.mark.usefixtures("float64")
def test_pareto_k_ranks_exact_diagonal_and_too_narrow_guides() -> None:
    """Exact: constant weights, k̂ = −inf < 0.5 everywhere and the PSIS mean is the raw mean. The best diagonal
    Gaussian on a correlated posterior: k̂ ≈ |ρ| (finite variance, k̂ < 0.7). The same with its scales halved:
    a narrow proposal rarely draws where p has mass, so p/q explodes there and the weights are heavy-tailed,
    k̂ ≈ 1 − (1 − |ρ|)/4 > 0.7. The finite-K estimate sits a little below those limits (the Gaussian ratio's
    tail is a Pareto one times a slowly varying factor)."""
    model, x = _rotated_fa()
    with torch.no_grad():
        G = model.posterior_covariance()
        rho = abs((G[0, 1] / (G[0, 0] * G[1, 1]).sqrt()).item())
        post_mean = model.exact_posterior(x).mean
    assert 0.3 < rho < 0.5
    K = 2000
    with seeded(0):  # max_rows < K: every point's draws come in 4 chunks (PsisAccumulator's streaming path)
        exact = per_point_bounds(model, build_guide("exact", model), x, K, max_rows=600)
    with seeded(0):
        diagonal = per_point_bounds(model, _diagonal_guide(model), x, K)
    with seeded(0):
        narrow = per_point_bounds(model, _diagonal_guide(model, scale=0.5), x, K)

    assert (exact["pareto_k"] < 0.5).all() and torch.isneginf(exact["pareto_k"]).all()
    # equal weights: the PSIS mean is the plain mean of the draws, and both are within 4 standard errors
    # (posterior sd / √K) of the exact posterior mean
    torch.testing.assert_close(exact["z_mean_psis"], exact["z_mean"], rtol=0, atol=1e-10)
    se = (G.diagonal() / K).sqrt()
    assert ((exact["z_mean"] - post_mean).abs() < 4 * se).all()

    k_diag, k_narrow = diagonal["pareto_k"].mean().item(), narrow["pareto_k"].mean().item()
    assert k_diag > exact["pareto_k"].mean().item()
    assert abs(k_diag - rho) < 0.1 and diagonal["pareto_k"].max() < 0.7, (k_diag, rho)
    assert k_narrow > k_diag + 0.2 and k_narrow > 0.7, (k_narrow, k_diag)
    assert k_narrow < 1 - (1 - rho) / 4 + 0.05  # at most its limit (plus Monte Carlo error)


@pytest.mark.usefixtures("float64")
def test_the_psis_mean_corrects_a_shifted_proposal() -> None:
    """q wider than p (bounded weights, k̂ < 0) with its mean 0.5 posterior sd off: the raw mean of the draws
    is off by 0.5 sd, the PSIS mean is not. Every point poses the same problem in standardized units, so the
    spread of the errors over points is their Monte Carlo error (4 standard errors of the mean over points)."""
    model, x = _rotated_fa()
    with torch.no_grad():
        sd = model.posterior_covariance().diagonal().sqrt()
        post_mean = model.exact_posterior(x).mean
    with seeded(0):
        b = per_point_bounds(model, _diagonal_guide(model, scale=1.5, shift=0.5), x, 2000)
    assert (b["pareto_k"] < 0).all()
    raw, corrected = (b["z_mean"] - post_mean) / sd, (b["z_mean_psis"] - post_mean) / sd
    n = len(x)
    assert ((raw.mean(0) - 0.5).abs() < 4 * raw.std(0) / math.sqrt(n)).all(), raw.mean(0)
    assert (corrected.mean(0).abs() < 4 * corrected.std(0) / math.sqrt(n)).all(), corrected.mean(0)
    assert corrected.abs().max() < 0.2


@pytest.mark.usefixtures("float64")
def test_per_point_psis_is_arvizs_on_the_same_draws_and_leaves_the_bounds_alone() -> None:
    """One chunk holds every draw, so a seed reproduces them: the ELBO and IWAE are those of the raw weights
    (PSIS draws nothing), k̂ is az.psislw's, and the PSIS mean is Σ w̃ z with az.psislw's normalised weights."""
    model, x = _rotated_fa(n=12)
    guide = _diagonal_guide(model, scale=0.7)
    K = 500
    with seeded(3):
        b = per_point_bounds(model, guide, x, K)
    with seeded(3), torch.no_grad():
        t = log_weight_terms(model, guide, x, K)
    log_w = t["log_lik"] + t["log_prior"] - t["log_q"]
    torch.testing.assert_close(b["elbo"], log_w.mean(0), rtol=0, atol=0)
    torch.testing.assert_close(b["iwae"], torch.logsumexp(log_w, 0) - math.log(K), rtol=0, atol=0)
    smoothed, k = az.psislw(log_w.T.numpy(), reff=1.0)
    np.testing.assert_allclose(b["pareto_k"].numpy(), k, rtol=0, atol=1e-12)
    mean = np.einsum("nk,knd->nd", np.exp(smoothed), t["z"].numpy())
    np.testing.assert_allclose(b["z_mean_psis"].numpy(), mean, rtol=0, atol=1e-10)
    assert (b["pareto_k"] > 0).any()  # the test has heavy tails to smooth


@pytest.mark.parametrize("chunk", [1, 7, 64, 300])
def test_psis_accumulator_streams_draws_exactly(chunk: int) -> None:
    """Draws fed in chunks (keeping only the largest-weight draws per point) give what PSIS over all of them gives."""
    g = torch.Generator().manual_seed(0)
    K, P = 300, 4
    log_w = 2.0 * torch.randn(K, P, generator=g, dtype=torch.float64) ** 2  # heavy right tail: smoothing acts
    z = torch.randn(K, P, 3, generator=g, dtype=torch.float64)
    acc = PsisAccumulator(K)
    for s0 in range(0, K, chunk):
        acc.add(log_w[s0:s0 + chunk], z[s0:s0 + chunk])
    k_hat, mean = acc.finish()
    smoothed, k = az.psislw(log_w.T.numpy(), reff=1.0)
    assert not np.allclose(smoothed, log_w.T.numpy() - np.logaddexp.reduce(log_w.T.numpy(), -1, keepdims=True))
    np.testing.assert_allclose(k_hat.numpy(), k, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mean.numpy(), np.einsum("pk,kpd->pd", np.exp(smoothed), z.numpy()), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expected 300 draws"):
        short = PsisAccumulator(K)
        short.add(log_w[:10], z[:10])
        short.finish()


def test_psis_without_a_tail_fit() -> None:
    """Too few draws: no fit (NaN) and the raw weights; weights constant to rounding: k̂ = −inf, unchanged."""
    lw = torch.randn(MIN_PSIS_SAMPLES - 1, 3, generator=torch.Generator().manual_seed(0))
    smoothed, k = psis(lw)
    assert torch.isnan(k).all() and torch.equal(smoothed, lw.double())
    const = torch.full((100, 2), -7.25) + 1e-6 * torch.rand(100, 2, generator=torch.Generator().manual_seed(1))
    smoothed, k = psis(const)  # float32 rounding-level spread
    assert torch.isneginf(k).all() and torch.equal(smoothed, const.double())


@pytest.mark.usefixtures("float64")
def test_evaluate_reports_pareto_k_summaries() -> None:
    model, x = _rotated_fa(n=30)
    guide = _diagonal_guide(model)
    m = evaluate(model, guide, x, iwae_k=200, seed=0)
    k = m["per_point"]["pareto_k"]
    assert k.shape == (len(x),)
    assert m["pareto_k_mean"] == pytest.approx(k.mean().item(), abs=1e-12)
    assert m["pareto_k_max"] == pytest.approx(k.max().item(), abs=1e-12)
    assert m["pareto_k_frac_above_0.7"] == pytest.approx((k > 0.7).double().mean().item(), abs=1e-12)
    assert 0 < m["pareto_k_mean"] < m["pareto_k_max"]
    assert "z_mean_psis" not in m and "pareto_k" not in m  # per-point arrays are not summarised as metrics
    for small in (3, 20):  # fewer than 21 draws: no tail fit, so no summaries
        few = evaluate(model, guide, x, iwae_k=small, seed=0)
        assert few["pareto_k_mean"] is None and few["pareto_k_max"] is None and few["pareto_k_frac_above_0.7"] is None
    mixture, mixture_guide, xm = _fitted("gaussian_mixture", "meanfield")
    scores = evaluate(mixture, mixture_guide, xm, iwae_k=50, posterior_samples=3, seed=0)
    assert "pareto_k_mean" not in scores and "pareto_k" not in scores["per_point"]  # no k̂ from that evaluator


@pytest.mark.usefixtures("float64")
def test_local_groups_line_up_draw_by_draw_with_the_closed_forms() -> None:
    """Exact guide on FA: log_p − log_q = log p(x) for every draw; log_likelihood is log N(x; μ + W z, Ψ) at
    the exported z; the replicates are x ~ N(μ + W z, Ψ) at the same z (standardized residuals: mean 0 and
    variance 1 within 4 standard errors)."""
    model, x = _rotated_fa(n=25)
    guide = build_guide("exact", model)
    idata = to_inference_data(model, guide, x, num_samples=400, seed=0)
    z = torch.as_tensor(idata.posterior["z"].values[0])  # (S, N, k)
    with torch.no_grad():
        loc = model.mu + z @ model.W.T
        sd = model.noise_variance.sqrt()
        lik = torch.distributions.Normal(loc, sd).log_prob(x).sum(-1)
        exact = model.log_likelihood(x)
    torch.testing.assert_close(torch.as_tensor(idata.log_likelihood["x"].values[0]), lik, rtol=0, atol=1e-10)
    log_w = idata.sample_stats["log_p"].values[0] - idata.sample_stats["log_q"].values[0]
    np.testing.assert_allclose(log_w, exact.expand(400, -1).numpy(), rtol=0, atol=1e-10)
    assert np.isneginf(idata.sample_stats["pareto_k"].values).all()
    resid = ((torch.as_tensor(idata.posterior_predictive["x"].values[0]) - loc) / sd).flatten()
    se = 1 / math.sqrt(resid.numel())
    assert abs(resid.mean().item()) < 4 * se and abs(resid.var().item() - 1) < 4 * math.sqrt(2) * se


@pytest.mark.usefixtures("float64")
def test_psis_means_of_the_exact_guide_are_its_raw_means_and_the_posterior_mean() -> None:
    """Exact guide on FA: constant weights, k̂ = −inf < 0.5 for every point, so the smoothed weights are uniform
    and Σ w̃ z is the plain mean (equal to rounding: the difference has no Monte Carlo error); both are within
    4 Monte Carlo standard errors (posterior sd / √S, the draws being independent) of the exact E[z | x]."""
    model, x = _rotated_fa(n=25)
    S = 400
    idata = to_inference_data(model, build_guide("exact", model), x, num_samples=S, seed=0)
    k = idata.sample_stats["pareto_k"].values
    assert (k < 0.5).all() and np.isneginf(k).all()
    raw, corrected = (idata.sample_stats[f"z_mean_{m}"].values for m in ("raw", "psis"))
    assert idata.sample_stats["z_mean_psis"].dims == ("point", "latent")
    np.testing.assert_allclose(corrected, raw, rtol=0, atol=1e-12)
    with torch.no_grad():
        exact = model.exact_posterior(x).mean.numpy()
        se = (model.posterior_covariance().diagonal() / S).sqrt().numpy()
    assert (np.abs(raw - exact) < 4 * se).all(), np.abs(raw - exact).max(0) / se


@pytest.mark.usefixtures("float64")
def test_psis_means_are_evaluations_on_the_same_draws_and_nan_where_k_is_high() -> None:
    """A too-narrow diagonal guide (scales × 0.7: k̂ ≈ 1 − 0.7²(1 − |ρ|) ≈ 0.7, so the points fall on both sides of
    the threshold). One seed and one chunk give to_inference_data and per_point_bounds the same draws (their k̂
    agree exactly): the raw mean is evaluation's z_mean, the corrected mean its z_mean_psis where k̂ ≤ 0.7 and
    NaN exactly where k̂ > 0.7. (That z_mean_psis corrects a biased proposal is
    test_the_psis_mean_corrects_a_shifted_proposal.)"""
    model, x = _rotated_fa(n=20)
    guide = _diagonal_guide(model, scale=0.7)
    S = 400
    idata = to_inference_data(model, guide, x, num_samples=S, seed=1)
    with seeded(1):
        b = per_point_bounds(model, guide, x, S)
    k = idata.sample_stats["pareto_k"].values
    np.testing.assert_array_equal(k, b["pareto_k"].numpy())
    high = k > 0.7
    assert 0 < high.sum() < len(k), k  # both kinds of point: the test has work to do
    raw, corrected = (idata.sample_stats[f"z_mean_{m}"].values for m in ("raw", "psis"))
    np.testing.assert_allclose(raw, b["z_mean"].numpy(), rtol=0, atol=1e-12)
    assert np.isnan(corrected[high]).all()
    np.testing.assert_allclose(corrected[~high], b["z_mean_psis"].numpy()[~high], rtol=0, atol=1e-12)
    assert not np.allclose(corrected[~high], raw[~high], rtol=0, atol=1e-3)  # the weights did reweight


def test_inputs_coordinates_seeds_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    model, guide, x = _fitted("factor_analysis", "amortized")
    frame = pd.DataFrame(x.numpy().astype(np.float64), columns=[f"f{i}" for i in range(6)])
    state = torch.get_rng_state()
    a = to_inference_data(model, guide, frame, num_samples=25, points=np.array([4, 1]), seed=7)
    b = to_inference_data(model, guide, x, num_samples=25, points=torch.tensor([4, 1]), seed=7,
                          feature_names=[f"f{i}" for i in range(6)])
    assert torch.equal(state, torch.get_rng_state()) and model.training and guide.training
    assert a.posterior_predictive.coords["feature"].values.tolist() == [f"f{i}" for i in range(6)]
    assert a.posterior.coords["point"].values.tolist() == [4, 1]
    np.testing.assert_array_equal(a.posterior["z"].values, b.posterior["z"].values)  # same seed, same draws
    assert to_inference_data(model, guide, x, num_samples=5, max_points=10).posterior.sizes["point"] == 10
    assert np.isnan(to_inference_data(model, guide, x, num_samples=5).sample_stats["pareto_k"].values).all()
    for bad, match in (([1, 1], "distinct"), ([0, 32], "in \\[0, 32\\)"), ([], "non-empty"), ([0.5], "integer")):
        with pytest.raises(ValueError, match=match):
            to_inference_data(model, guide, x, num_samples=5, points=bad)
    with pytest.raises(ValueError, match="feature_names"):
        to_inference_data(model, guide, x, num_samples=5, feature_names=["a"])
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(model, guide, x, num_samples=0)
    monkeypatch.setattr("pyro_lvm.inspect.MAX_VALUES", 1000)
    with pytest.raises(ValueError, match="MAX_VALUES"):
        to_inference_data(model, guide, x, num_samples=50)
