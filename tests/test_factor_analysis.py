"""Factor analysis and PPCA against their closed forms, data checks at the boundary, and the FA experiment.

Everything runs in float64 on small data with fixed seeds. Monte Carlo tolerances are a few standard
errors of the estimate being checked (computed from the same draws), never hand-picked numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from pyro_lvm.data import DataConfig, load_dataset, make_factor_analysis_data, read_binarized_mnist
from pyro_lvm.evaluate import EvalConfig, evaluate, per_point_bounds
from pyro_lvm.experiments import factor_analysis as fa_experiment
from pyro_lvm.experiments.cli import run_main
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import PPCA, FactorAnalysis, FactorAnalysisConfig
from pyro_lvm.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("float64")


def _fitted_fa(n: int = 400, d: int = 6, k: int = 2, seed: int = 0, fixed: str = "sklearn-rotated"
               ) -> tuple[FactorAnalysis, torch.Tensor]:
    """A model at scikit-learn's EM solution (rotated, by default, so the posterior is correlated), and data."""
    from sklearn.decomposition import FactorAnalysis as SkFA

    x, _ = make_factor_analysis_data(n, d, k, seed=seed)
    est = SkFA(k, random_state=seed, tol=1e-8, max_iter=5000).fit(x.numpy())
    model = FactorAnalysis(FactorAnalysisConfig(d, k))
    fa_experiment.FIXED_MODELS[fixed](model, est, seed)
    return model, x


def test_rotation_leaves_the_likelihood_and_turns_the_posterior() -> None:
    """sklearn's W makes WᵀΨ⁻¹W diagonal (a factorised posterior, no mean-field gap); W R keeps p(x)."""
    plain, x = _fitted_fa(fixed="sklearn")
    rotated, _ = _fitted_fa(fixed="sklearn-rotated")
    torch.testing.assert_close(plain.log_likelihood(x), rotated.log_likelihood(x), rtol=0, atol=1e-10)
    assert plain.mean_field_gap() < 1e-10 < 1e-3 < rotated.mean_field_gap()
    with pytest.raises(ValueError, match="orthogonal"):
        plain.rotate(2 * torch.eye(2))


def test_marginal_likelihood_matches_dense_gaussian_and_sklearn() -> None:
    from sklearn.decomposition import FactorAnalysis as SkFA

    x, _ = make_factor_analysis_data(300, 5, 2, seed=1)
    est = SkFA(2, random_state=0).fit(x.numpy())
    model = FactorAnalysis(FactorAnalysisConfig(5, 2))
    fa_experiment.set_to_sklearn(model, est)
    W, psi = model.W.detach(), model.noise_variance.detach()
    dense = torch.distributions.MultivariateNormal(model.mu.detach(), W @ W.T + torch.diag(psi))
    torch.testing.assert_close(model.log_likelihood(x), dense.log_prob(x), rtol=0, atol=1e-10)
    assert math.isclose(model.log_likelihood(x).mean().item(), est.score(x.numpy()), abs_tol=1e-8)


def test_exact_posterior_is_bayes_rule() -> None:
    """p(z|x) from the closed form equals p(x|z)p(z)/p(x) at arbitrary z (no sampling involved)."""
    model, x = _correlated_fa(n=20)
    z = torch.randn(20, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        log_post = model.exact_posterior(x).log_prob(z)
        lik = torch.distributions.Normal(model.mu + z @ model.W.T, model.noise_variance.sqrt()).log_prob(x).sum(-1)
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        torch.testing.assert_close(log_post, lik + prior - model.log_likelihood(x), rtol=0, atol=1e-10)


def test_exact_guide_makes_the_elbo_tight() -> None:
    """With q = p(z|x) every importance weight equals p(x): ELBO = IWAE-K = log p(x) point by point."""
    model, x = _fitted_fa()
    guide = build_guide("exact", model)
    pyro.set_rng_seed(0)
    b = per_point_bounds(model, guide, x, num_samples=50)
    exact = model.log_likelihood(x).detach()
    torch.testing.assert_close(b["elbo"], exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(b["iwae"], exact, rtol=0, atol=1e-6)


def _mean_field_optimal_guide(model: FactorAnalysis):
    """The amortized diagonal guide set by hand to the best diagonal Gaussian: same mean as p(z|x),
    precisions diag(G⁻¹) (a linear encoder represents it exactly)."""
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    with torch.no_grad():
        G = model.posterior_covariance()
        A = G @ (model.W.T / model.noise_variance)  # mean = A (x − μ)
        guide.loc.weight.copy_(A)
        guide.loc.bias.copy_(-A @ model.mu)
        sd = model.posterior_precision().diagonal().rsqrt() - 1e-6  # the head adds 1e-6
        guide.scale.weight.zero_()
        guide.scale.bias.copy_(torch.log(torch.expm1(sd)))  # softplus⁻¹
    return guide


def test_mean_field_gap_formula_is_the_kl_of_the_best_diagonal_gaussian() -> None:
    model, _ = _fitted_fa()
    with torch.no_grad():
        G = model.posterior_covariance()
        best_diag = torch.diag(1 / model.posterior_precision().diagonal())
        q = torch.distributions.MultivariateNormal(torch.zeros(2), best_diag)
        p = torch.distributions.MultivariateNormal(torch.zeros(2), G)
        kl = torch.distributions.kl_divergence(q, p).item()
        # any other diagonal (here: the posterior's own marginal variances) is worse
        worse = torch.distributions.kl_divergence(
            torch.distributions.MultivariateNormal(torch.zeros(2), torch.diag(G.diagonal())), p).item()
    assert model.mean_field_gap() == pytest.approx(kl, abs=1e-12)
    assert model.mean_field_gap() > 1e-3 and worse > kl


def _correlated_fa(n: int = 200, seed: int = 0) -> tuple[FactorAnalysis, torch.Tensor]:
    """A model whose two factors load on nearly the same direction (a strongly correlated posterior), and data."""
    g = torch.Generator().manual_seed(seed)
    model = FactorAnalysis(FactorAnalysisConfig(6, 2))
    W = torch.randn(6, 2, generator=g) @ torch.tensor([[1.0, 0.9], [0.0, 0.3]])
    model.set_parameters(W, torch.zeros(6), torch.full((6,), 0.2))
    x = torch.randn(n, 2, generator=g) @ W.T + 0.2**0.5 * torch.randn(n, 6, generator=g)
    return model, x


def test_iwae_rises_toward_the_exact_likelihood_as_k_grows() -> None:
    """With the mean-field-optimal guide: ELBO = log p(x) − analytic gap (within 4 standard errors), and
    IWAE-K increases with K toward log p(x)."""
    model, x = _correlated_fa()
    analytic = model.mean_field_gap()
    assert analytic > 0.5  # the test needs a gap far above Monte Carlo noise
    guide = _mean_field_optimal_guide(model)
    exact = model.log_likelihood(x).mean().item()
    pyro.set_rng_seed(0)
    b = per_point_bounds(model, guide, x, num_samples=2000)
    # log w − log p(x) is the same function of ε for every x here, so the per-point spread is Monte Carlo
    # noise of a 2000-sample mean; its standard error bounds the error of the average
    elbo, elbo_se = b["elbo"].mean().item(), b["elbo"].std().item() / math.sqrt(len(x))
    assert abs((exact - elbo) - analytic) < 4 * elbo_se + 1e-3, (exact - elbo, analytic)
    gaps = []
    for k in (1, 10, 100, 1000):
        pyro.set_rng_seed(1)
        gaps.append(exact - per_point_bounds(model, guide, x, num_samples=k)["iwae"].mean().item())
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] > -0.01, gaps
    assert gaps[-1] < 0.5 * gaps[0], gaps  # a narrow q converges slowly (its weights are heavy-tailed)


def test_svi_recovers_the_marginal_covariance_on_synthetic_data() -> None:
    """The SVI fit's WWᵀ + Ψ is as close to the truth as the data allow: no farther than the sample
    covariance (the unconstrained MLE), and its train log-likelihood within 0.01 nats of EM's."""
    from sklearn.decomposition import FactorAnalysis as SkFA

    x, truth = make_factor_analysis_data(1500, 6, 2, seed=2)
    model = FactorAnalysis(FactorAnalysisConfig(6, 2))
    model.init_from_data(x)
    guide = build_guide("exact", model)
    fit(model, guide, x, None, TrainConfig(epochs=600, batch_size=None, lr=0.03, lr_final_factor=0.1, quiet=True))
    with torch.no_grad():
        cov = model.marginal().covariance_matrix
    sample_cov = torch.cov(x.T, correction=0)
    err, sample_err = (cov - truth["cov"]).norm().item(), (sample_cov - truth["cov"]).norm().item()
    assert err <= sample_err, (err, sample_err)
    em = SkFA(2, random_state=0, tol=1e-8, max_iter=5000).fit(x.numpy()).score(x.numpy())
    assert model.log_likelihood(x).mean().item() > em - 0.01


def test_ppca_closed_form_mle_matches_sklearn_pca() -> None:
    """Tipping & Bishop's MLE; scikit-learn's PCA scores the same model with the n−1 covariance, so it
    sits a hair below the MLE (the exact MLE uses the n-denominator covariance)."""
    from sklearn.decomposition import PCA

    x, _ = make_factor_analysis_data(300, 6, 2, seed=4)
    model = PPCA(FactorAnalysisConfig(6, 2))
    model.mle(x)
    ours, sk = model.log_likelihood(x).mean().item(), PCA(2).fit(x.numpy()).score(x.numpy())
    assert sk <= ours < sk + 1e-3
    with torch.no_grad():
        model.W.mul_(1.1)
    assert model.log_likelihood(x).mean().item() < ours - 1e-3


def test_diagonal_guide_trained_on_a_fixed_model_reaches_the_analytic_gap() -> None:
    """Only the guide learns (the model held fixed): the diagonal guide's gap converges to the analytic
    mean-field gap and the full-covariance guide closes it."""
    model, x = _correlated_fa(n=300)
    analytic = model.mean_field_gap()
    exact = model.log_likelihood(x).mean().item()
    gaps = {}
    for spec in ("amortized", "amortized-fullcov"):
        pyro.set_rng_seed(0)
        guide = build_guide(spec, model, GuideConfig(hidden=()))
        fit(model, guide, x, None, TrainConfig(epochs=200, batch_size=50, lr=0.05, lr_final_factor=0.01,
                                               num_particles=8, train_model=False, quiet=True, restore_best=False))
        pyro.set_rng_seed(0)
        gaps[spec] = exact - evaluate(model, guide, x, EvalConfig(iwae_k=500))["elbo"]
    # no diagonal Gaussian beats the analytic optimum (the 0.02 covers the ELBO's Monte Carlo error over
    # 300 x 500 draws); a converged fit comes within 10% of it (4-7% over seeds 0-1 at these 1,200 steps; the
    # full-covariance guide leaves 2-6% of it)
    assert analytic - 0.02 < gaps["amortized"] < 1.1 * analytic, (gaps, analytic)
    assert gaps["amortized-fullcov"] < 0.1 * analytic, (gaps, analytic)


# ------------------------------------------------------------------------------------------------
# training: NaN guard and checkpoints


# ------------------------------------------------------------------------------------------------
# bad input at the boundary


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1.0, float("nan"), 0, 0]] * 3), "NaN"),
    (torch.tensor([[1.0, float("inf"), 0, 0]] * 3), "inf"),
    (torch.zeros(3, 5), "expected 4 features"),
    (torch.zeros(3), "2-D"),
    (torch.zeros(0, 4), "empty"),
    ([["a", "b", "c", "d"]], "not numbers"),
])
def test_bad_data_gives_a_clear_value_error(bad: object, match: str) -> None:
    model = FactorAnalysis(FactorAnalysisConfig(4, 1))
    guide = build_guide("amortized", model)
    with pytest.raises(ValueError, match=match):
        fit(model, guide, bad, None, TrainConfig(epochs=1, quiet=True))
    with pytest.raises(ValueError, match=match):
        evaluate(model, guide, bad)


def test_missing_mnist_says_where_it_looked_and_how_to_supply_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        read_binarized_mnist(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "binarized_mnist.npz") in msg and "--data-dir" in msg and "PYRO_LVM_DATA_DIR" in msg


def test_sklearn_splits_are_seeded_and_standardized_by_train_only() -> None:
    a, b = load_dataset("wine", DataConfig(seed=3)), load_dataset("wine", DataConfig(seed=3))
    c = load_dataset("wine", DataConfig(seed=4))
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)
    torch.testing.assert_close(a.train.mean(0), torch.zeros(a.data_dim, dtype=a.train.dtype), rtol=0, atol=1e-5)
    assert a.test.mean(0).abs().max() > 1e-3  # test is standardized with train statistics, not its own
    assert len(a.train) + len(a.valid) + len(a.test) == 178


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid datasets: .*breast_cancer"):
        load_dataset("mnist-fashion")


# ------------------------------------------------------------------------------------------------
# the experiment


def test_fa_experiment_end_to_end(tmp_path: Path) -> None:
    code = fa_experiment.main(["--dataset", "wine", "--latent-dim", "2", "--guide", "exact,amortized,planar:2",
                               "--epochs", "5", "--iwae-k", "8", "--output", str(tmp_path), "--quiet"])
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["experiment"] == "factor_analysis" and res["dataset"] == "wine"
    assert [r["guide"] for r in res["results"]] == ["exact", "amortized", "planar:2"]
    for r in res["results"]:
        t = r["test"]
        assert t["iwae_k"] == 8 and math.isfinite(t["exact_log_likelihood"]) and t["iwae"] >= t["elbo"] - 1e-9
        assert r["train_seconds"] > 0
    assert res["results"][0]["test"]["gap_elbo"] == pytest.approx(0, abs=1e-6)
    assert res["baselines"][0]["name"] == "sklearn.FactorAnalysis"
    assert np.isfinite(res["baselines"][0]["test"]["exact_log_likelihood"])
    assert (tmp_path / "results.md").is_file() and (tmp_path / "training_curves.png").is_file()
    assert torch.get_default_dtype() == torch.float64  # the fixture's; the run restored what it found


def test_fa_experiment_fixed_model_reports_the_analytic_gap(tmp_path: Path) -> None:
    fa_experiment.main(["--dataset", "synthetic", "--latent-dim", "3", "--guide", "amortized", "--fix-model",
                        "sklearn-rotated", "--epochs", "3", "--iwae-k", "4", "--output", str(tmp_path), "--quiet"])
    res = json.loads((tmp_path / "results.json").read_text())
    row = res["results"][0]
    assert row["test"]["analytic_mean_field_gap"] > 0 and row["recovery"]["cov_relative_error"] < 0.2


@pytest.mark.parametrize("argv,match", [
    (["--dataset", "nope"], "unknown dataset 'nope'; valid datasets:"),
    (["--guide", "nope"], "unknown guide 'nope'; valid guides:"),
    (["--latent-dim", "40", "--dataset", "wine"], "--latent-dim: must be between 1 and 12"),
    (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
    (["--lr", "-1"], "--lr: must be a finite number > 0, got -1.0"),
    (["--dataset", "binarized_mnist"], "'binarized_mnist' lacks continuous data"),
    (["--guide", "exact,householder:4,nope"], "unknown guide 'nope'"),
])
def test_fa_experiment_bad_flags_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     argv: list[str], match: str) -> None:
    try:
        code = run_main(fa_experiment.main, [*argv, "--output", str(tmp_path), "--quiet"])
    except SystemExit as e:  # argparse's own errors exit 2 with a usage line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err


def test_fa_experiment_re_scores_an_earlier_run_from_its_checkpoints(tmp_path: Path) -> None:
    """--from-checkpoints loads each guide's saved fit (rebuilt from its stored config) instead of training, and
    the seeded evaluation gives the first run's numbers again."""
    common = ["--dataset", "wine", "--latent-dim", "2", "--guide", "exact,iaf:2", "--iwae-k", "16", "--quiet"]
    assert fa_experiment.main([*common, "--epochs", "5", "--output", str(tmp_path / "a")]) == 0
    again = ["--from-checkpoints", str(tmp_path / "a"), "--output", str(tmp_path / "b")]
    assert fa_experiment.main([*common, *again]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("a", "b"))
    for ra, rb in zip(a, b, strict=True):
        assert ra["test"]["elbo"] == pytest.approx(rb["test"]["elbo"], rel=1e-12)
        assert ra["test"]["exact_log_likelihood"] == pytest.approx(rb["test"]["exact_log_likelihood"], rel=1e-12)
    assert not (tmp_path / "b" / "checkpoints").exists()  # nothing was trained or saved again
