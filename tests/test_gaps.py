"""Inference gaps (Cremer et al. 2018): the guides' per-point parameters reproduce their q exactly, the
approximation and amortization gaps against factor analysis's closed forms, and the inference_gaps experiment
scoring a tiny run's checkpoints.

Factor-analysis checks run in float64 on a fixed, rotated model (the generating parameters turned by a random
rotation, as ``--fix-model sklearn-rotated`` turns EM's solution: a correlated posterior, so the diagonal family
has a known, non-zero gap). Monte Carlo tolerances are a few of the standard errors the library reports for the
same draws.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pyro_lvm.data import DataConfig, load_dataset, make_factor_analysis_data
from pyro_lvm.experiments import inference_gaps as gaps_experiment
from pyro_lvm.gaps import inference_gaps
from pyro_lvm.guides import GUIDES, GuideConfig, build_guide, usable_guides
from pyro_lvm.harness import checkpoint_files
from pyro_lvm.models import VAE, FactorAnalysis, FactorAnalysisConfig, VAEConfig
from pyro_lvm.runtime import default_dtype, local_params
from pyro_lvm.saving import save

N = 24  # held-out points of the factor-analysis checks


def _spec(name: str) -> str:
    return f"{name}:2" if GUIDES[name].arg_name else name


LOCAL_GUIDES = usable_guides(FactorAnalysis.example()[0].traits)  # every guide of a per-point latent


@pytest.mark.parametrize("name", LOCAL_GUIDES)
def test_local_parameters_give_back_the_guides_own_q(float64: None, name: str) -> None:
    """distribution_from(local_parameters(x)) is distribution(x): the same draws and log-densities (to rounding),
    and each point's parameters move that point's q alone."""
    model, x = FactorAnalysis.example(seed=0)
    torch.manual_seed(0)
    guide = build_guide(_spec(name), model, GuideConfig(hidden=(8,), flow_hidden=(8,), init_scale=0.7))
    with torch.no_grad():  # random, non-trivial parameters (a fresh flow can sit near the identity)
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    with local_params(model, guide), torch.no_grad():
        params = guide.local_parameters(x)
        if name == "exact":  # q = p(z|x): nothing per point to free
            assert params == {}
            with pytest.raises(ValueError, match="no per-point parameters"):
                guide.distribution_from(params)
            return
        assert params and all(v.shape[0] == len(x) for v in params.values())

        def draw(q: torch.distributions.Distribution) -> tuple[torch.Tensor, torch.Tensor]:
            torch.manual_seed(1)  # the base's rsample is the only random operation: same seed, same noise
            z = q.rsample((3,))
            return z, q.log_prob(z)  # planar/radial have no inverse: log q at the draw, from the cache

        z, log_q = draw(guide.distribution(x))
        q = guide.distribution_from(params)
        assert q.batch_shape == (len(x),)
        z_from, log_q_from = draw(q)
        torch.testing.assert_close(z_from, z, rtol=0, atol=1e-12)
        torch.testing.assert_close(log_q_from, log_q, rtol=0, atol=1e-12)

        # move point 0's parameters (a flow's own, where it has them, not just its base's): only point 0's q moves
        flow = [k for k in params if k.startswith("flow")]
        moved = {k: v.clone() for k, v in params.items()}
        for k in flow or moved:
            moved[k][0] += 0.5
        z_moved, log_q_moved = draw(guide.distribution_from(moved))
        torch.testing.assert_close(z_moved[:, 1:], z[:, 1:], rtol=0, atol=1e-12)
        torch.testing.assert_close(log_q_moved[:, 1:], log_q[:, 1:], rtol=0, atol=1e-12)
        assert max((z_moved[:, 0] - z[:, 0]).abs().max(), (log_q_moved[:, 0] - log_q[:, 0]).abs().max()) > 1e-3

        with pytest.raises(ValueError, match="params: "):
            guide.distribution_from({"loc": params["loc"]})


@pytest.fixture(scope="module")
def rotated_fa() -> Iterator[tuple[FactorAnalysis, torch.Tensor]]:
    """A factor-analysis model held at the parameters that generated the data, turned by a random rotation (as
    ``--fix-model sklearn-rotated`` turns EM's solution): a correlated posterior; and N points from it."""
    with default_dtype(torch.float64):
        x, truth = make_factor_analysis_data(N, 6, 2, seed=1)
        model = FactorAnalysis(FactorAnalysisConfig(6, 2))
        model.set_parameters(truth["W"], truth["mu"], truth["psi"])
        # a Haar rotation (seeded); this one leaves a mean-field gap of 0.149 nats, room for the checks below
        q, r = torch.linalg.qr(torch.randn(2, 2, generator=torch.Generator().manual_seed(2)))
        model.rotate(q * torch.sign(torch.diagonal(r)))
        yield model, x


def test_exact_guide_leaves_no_gap(rotated_fa: tuple[FactorAnalysis, torch.Tensor]) -> None:
    """q = p(z|x): every log-weight is log p(x), so the ELBO is exact and both gaps vanish to rounding (the Monte
    Carlo error is 0 too, since the weights are constant); there is nothing to optimise."""
    model, x = rotated_fa
    r = inference_gaps(model, build_guide("exact", model), x, eval_particles=100, seed=0)
    assert r["log_px_method"] == "exact" and r["optimisation"]["steps"] == 0
    for key in ("approximation_gap", "amortization_gap"):
        assert abs(r[key]) < 1e-9 and r[f"{key}_mc_error"] < 1e-9, (key, r[key])
    torch.testing.assert_close(r["per_point"]["amortized_elbo"], model.log_likelihood(x).detach(), rtol=0, atol=1e-9)


def test_diagonal_family_per_point_optimum_is_the_mean_field_optimum(
        rotated_fa: tuple[FactorAnalysis, torch.Tensor]) -> None:
    """From an untrained encoder's q (nats away), per-point Adam reaches the best diagonal Gaussian of every point:
    the approximation gap is the closed-form mean-field gap KL(q* ‖ p(z|x)), the amortization gap what the
    untrained encoder loses; model and guide come out untouched."""
    model, x = rotated_fa
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        guide = build_guide("amortized", model, GuideConfig(hidden=()))
    before = {k: v.clone() for k, v in {**model.state_dict(), **guide.state_dict()}.items()}
    r = inference_gaps(model, guide, x, lr=0.1, lr_cuts=2, elbo_particles=32, check_every=25, tol=1e-3,
                       eval_particles=2000, seed=0)
    analytic = model.mean_field_gap()
    assert analytic > 0.1  # a real gap to find (0.149 nats)
    # 4 Monte Carlo standard errors (0.0023 here: 2000 draws per point), plus 0.005 for the optimiser stopping
    # short of the optimum (gap − analytic measured −0.001 to 0.002 over seeds 0-5, from starts 5-13 nats off)
    assert abs(r["approximation_gap"] - analytic) < 4 * r["approximation_gap_mc_error"] + 0.005, (r, analytic)
    assert r["optimisation"]["converged"]
    assert r["amortization_gap"] > 1.0  # an untrained encoder is nats from each point's optimum
    assert (r["per_point"]["amortization_gap"] > -4 * r["per_point"]["amortization_gap_mc_se"]).all()
    after = {**model.state_dict(), **guide.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad and p.grad is None for p in [*model.parameters(), *guide.parameters()])


def test_the_mean_field_gap_holds_through_the_generic_path(rotated_fa: tuple[FactorAnalysis, torch.Tensor]) -> None:
    """The same check with factor analysis written as a six-line Pyro function (``wrap_model``, its exact log p(x)
    given as ``log_likelihood=``) at the same parameters: the per-point optimum over the function's local vector is
    the closed-form mean-field gap of the built-in model, with the same tolerance."""
    import pyro_lvm
    from pyro_lvm.models import functions

    builtin, x = rotated_fa
    with default_dtype(torch.float64):
        model = pyro_lvm.wrap_model(functions.factor_analysis, data_dim=6,
                                    log_likelihood=functions.factor_analysis_log_likelihood).double()
        model.set_parameters(W=builtin.W.detach().T, mu=builtin.mu.detach(), psi=builtin.noise_variance.detach())
        torch.manual_seed(0)
        guide = build_guide("amortized", model, GuideConfig(hidden=()))
    torch.testing.assert_close(model.log_likelihood(x), builtin.log_likelihood(x).detach(), rtol=0, atol=1e-9)
    r = inference_gaps(model, guide, x, lr=0.1, lr_cuts=2, elbo_particles=32, check_every=25, tol=1e-3,
                       eval_particles=2000, seed=0)
    assert r["log_px_method"] == "exact" and r["optimisation"]["converged"]
    analytic = builtin.mean_field_gap()
    assert abs(r["approximation_gap"] - analytic) < 4 * r["approximation_gap_mc_error"] + 0.005, (r, analytic)


def test_mean_field_optimal_encoder_leaves_no_amortization_gap(
        rotated_fa: tuple[FactorAnalysis, torch.Tensor]) -> None:
    """An encoder set by hand to every point's best diagonal Gaussian (mean of p(z|x), precisions diag(G⁻¹); a
    linear encoder represents it exactly): per-point optimisation finds nothing to gain, so the amortization gap
    is 0 within its Monte Carlo error and the approximation gap is the analytic one."""
    model, x = rotated_fa
    with default_dtype(torch.float64):
        guide = build_guide("amortized", model, GuideConfig(hidden=()))
    with torch.no_grad():
        G = model.posterior_covariance()
        A = G @ (model.W.T / model.noise_variance)  # E[z|x] = A (x − μ)
        guide.loc.weight.copy_(A)
        guide.loc.bias.copy_(-A @ model.mu)
        guide.scale.weight.zero_()
        guide.scale.bias.copy_(torch.log(torch.expm1(model.posterior_precision().diagonal().rsqrt() - 1e-6)))
    r = inference_gaps(model, guide, x, lr=0.01, lr_cuts=2, elbo_particles=64, check_every=15, tol=1e-3,
                       eval_particles=2000, seed=0)
    # 4 standard errors (0.0033: independent draws of the two ELBOs); measured −0.005 to 0.003 over seeds 0-5
    assert abs(r["amortization_gap"]) < 4 * r["amortization_gap_mc_error"], r
    assert abs(r["approximation_gap"] - model.mean_field_gap()) < 4 * r["approximation_gap_mc_error"] + 0.005, r


def _gap_flags(run: Path, out: Path, *extra: str) -> list[str]:
    return ["--from-checkpoints", str(run), "--points", "10", "--steps", "50", "--elbo-particles", "4",
            "--eval-particles", "50", "--output", str(out), "--quiet", *extra]


def test_experiment_scores_a_runs_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Fits saved where a run keeps them (``DIR/checkpoints/<guide>/fitted.pt``, with the data's provenance), then
    scored: results.json rows with both gaps per guide, on a seeded subset of the test split of the same data,
    results.md and the figure; bad requests are one ``error:`` line, exit status 2."""
    ds = load_dataset("synthetic", DataConfig(seed=0, num_points=80, data_dim=5, latent_dim=2, dtype=torch.float64))
    with default_dtype(torch.float64):
        model = FactorAnalysis(FactorAnalysisConfig(ds.data_dim, 2))
        model.init_from_data(ds.train)
        run = tmp_path / "run"
        for spec in ("exact", "amortized"):
            save(checkpoint_files(str(run), spec)[0], model, build_guide(spec, model, GuideConfig(hidden=())), data=ds)
    out = tmp_path / "gaps"
    assert gaps_experiment.main(["--model", "factor_analysis", "--guide", "exact,amortized",
                                 *_gap_flags(run, out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["experiment"] == "inference_gaps" and doc["data"]["points"] == 10
    assert doc["data"]["provenance"] == ds.provenance()  # the data the fits were trained on
    points = gaps_experiment.held_out_points(ds.test, 10, seed=0)
    assert [r["guide"] for r in doc["results"]] == ["exact", "amortized"]
    for row in doc["results"]:
        t = row["test"]
        for key in ("log_px", "amortized_elbo", "best_elbo", "approximation_gap", "amortization_gap"):
            assert math.isfinite(t[key]) and math.isfinite(t[f"{key}_se"]) and t[f"{key}_mc_error"] >= 0
            assert len(row["per_point"][key]) == 10
        assert t["log_px_method"] == "exact"
        torch.testing.assert_close(torch.tensor(row["per_point"]["log_px"], dtype=torch.float64),
                                   model.log_likelihood(points).detach(),
                                   rtol=0, atol=1e-12)  # those very test points
        assert t["approximation_gap"] == pytest.approx(t["log_px"] - t["best_elbo"], abs=1e-9)
        assert t["amortization_gap"] == pytest.approx(t["best_elbo"] - t["amortized_elbo"], abs=1e-9)
    assert doc["results"][0]["optimisation"]["steps"] == 0 < doc["results"][1]["optimisation"]["steps"]
    assert "approximation gap" in (out / "results.md").read_text() and (out / "inference_gaps.png").is_file()

    capsys.readouterr()
    for argv, match in [
        (["--model", "factor_analysis", "--guide", "amortized,iaf:2"], "no fitted.pt for iaf:2"),
        (["--model", "vae", "--guide", "amortized"], "use --model factor_analysis"),
        (["--model", "factor_analysis", "--steps", "0"], "--steps: must be an integer >= 1"),
    ]:
        assert gaps_experiment.main([*_gap_flags(run, tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and err.count("\n") == 1, err


def test_experiment_reloads_mnist_for_a_vae_and_estimates_log_px_by_iwae(tmp_path: Path, fake_mnist: Path) -> None:
    """A VAE fit saved with its (fake) binarized-MNIST provenance (40 images a split) where a run keeps it: the
    data come back from the recorded file, subset and all, and log p(x) is IWAE-K."""
    ds = load_dataset("binarized_mnist", DataConfig(data_dir=str(fake_mnist), subset=40))
    torch.manual_seed(0)
    model = VAE(VAEConfig(data_dim=784, latent_dim=2, hidden=(8,)))
    guide = build_guide("planar:2", model, GuideConfig(hidden=(8,), flow_hidden=(8,)))
    run = tmp_path / "run"
    save(checkpoint_files(str(run), "planar:2")[0], model, guide, data=ds)
    out = tmp_path / "gaps"
    assert gaps_experiment.main(["--model", "vae", "--guide", "planar:2", "--iwae-k", "64",
                                 *_gap_flags(run, out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    t = doc["results"][0]["test"]
    assert doc["dataset"] == "binarized_mnist" and doc["data"]["provenance"] == ds.provenance()
    assert t["log_px_method"] == "iwae-64" and t["best_particles"] == 64 and t["log_px_mc_error"] > 0
    assert t["log_px"] >= t["best_elbo"] - 1e-6  # IWAE and the ELBO from the same draws: log-mean-exp >= mean
