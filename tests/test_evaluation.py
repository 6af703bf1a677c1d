"""The evaluation layer (``pyro_lvm.evaluate``): bounds per point, chunking, seeds, inputs and checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_lvm import ConfigError, EvalConfig, build_guide, evaluate
from pyro_lvm.data import make_factor_analysis_data
from pyro_lvm.evaluate import active_units, fused_sampler, per_point_bounds
from pyro_lvm.guides import GuideConfig
from pyro_lvm.models import VAE, FactorAnalysis, FactorAnalysisConfig, VAEConfig
from pyro_lvm.runtime import seeded

pytestmark = pytest.mark.usefixtures("float64")


def _model() -> tuple[FactorAnalysis, torch.Tensor]:
    x, _ = make_factor_analysis_data(60, 5, 2, seed=3)
    with seeded(0):
        model = FactorAnalysis(FactorAnalysisConfig(5, 2))
    model.init_from_data(x)
    return model, x


def test_chunking_does_not_change_the_bounds() -> None:
    """Points x samples are drawn in chunks of at most max_rows; with the exact guide every weight is p(x), so
    any chunking gives the same per-point numbers, and with an approximate guide the mean over the same number of
    samples agrees within Monte Carlo error."""
    model, x = _model()
    exact = build_guide("exact", model)
    a = per_point_bounds(model, exact, x, num_samples=40, max_rows=10_000)
    b = per_point_bounds(model, exact, x, num_samples=40, max_rows=7)  # one point, 7 samples at a time
    torch.testing.assert_close(a["iwae"], b["iwae"], rtol=0, atol=1e-9)
    torch.testing.assert_close(a["elbo"], b["elbo"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("decoder,prior,spec", [("bernoulli", "standard", "amortized"),
                                                ("bernoulli", "mog", "amortized-fullcov"),
                                                ("gaussian", "vamp:3", "amortized"),
                                                ("bernoulli", "standard", "iaf:1")])
@pytest.mark.parametrize("block_bytes", [None, 200])  # the default block; blocks of 2 rows (each point's draws split)
@pytest.mark.parametrize("max_rows", [25_000, 50])  # every point in one chunk; one point per chunk
def test_the_vaes_fused_pass_draws_and_scores_what_the_traces_do(
        decoder: str, prior: str, spec: str, block_bytes: int | None, max_rows: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The VAE's fused importance pass (no traces, the decoder in row blocks) draws the same z from the same random
    numbers as the Pyro traces and scores them the same, for every prior, decoder and guide family it takes."""
    if block_bytes is not None:
        monkeypatch.setattr(VAE, "EVAL_BLOCK_BYTES", block_bytes)
    with seeded(0):
        model = VAE(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,), decoder=decoder, prior=prior))
        guide = build_guide(spec, model, GuideConfig(hidden=(8,)))
        x = (torch.rand(7, 12) < 0.3).double() if decoder == "bernoulli" else torch.randn(7, 12)
    assert fused_sampler(model, guide, x) is not None
    with seeded(1):
        fused = per_point_bounds(model, guide, x, 30, max_rows)
    with seeded(1):
        traced = per_point_bounds(model, guide, x, 30, max_rows, fused=False)
    assert fused.keys() == traced.keys()
    for k in fused:
        torch.testing.assert_close(fused[k], traced[k], rtol=1e-9, atol=1e-9, msg=k)
    one = evaluate(model, guide, x, iwae_k=30, seed=2)
    two = evaluate(model, guide, x, iwae_k=30, seed=2, fused=False)
    assert one["iwae"] == pytest.approx(two["iwae"], abs=1e-9) and one["elbo"] == pytest.approx(two["elbo"], abs=1e-9)


def test_the_fused_pass_steps_aside_for_handlers_and_other_forwards() -> None:
    """Traces score what a Pyro handler does (``poutine.scale``) and a VAE whose ``forward`` is its own."""
    import pyro

    class Scaled(VAE):
        def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
            with pyro.poutine.scale(scale=2.0):
                super().forward(x, total_size)

    with seeded(0):
        model = Scaled(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,)))
        guide = build_guide("amortized", model, GuideConfig(hidden=(8,)))
        x = (torch.rand(7, 12) < 0.3).double()
    assert fused_sampler(model, guide, x) is None
    with pyro.poutine.scale(scale=2.0):
        assert fused_sampler(VAE(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,))), guide, x) is None
    with seeded(1):
        doubled = per_point_bounds(model, guide, x, 5)
    with seeded(1):
        plain = per_point_bounds(model, guide, x, 5, fused=False)
    torch.testing.assert_close(doubled["elbo"], plain["elbo"], rtol=0, atol=0)


def test_a_seed_fixes_the_evaluation_and_elbo_is_reconstruction_minus_kl() -> None:
    model, x = _model()
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    one = evaluate(model, guide, x, iwae_k=20, seed=5)
    two = evaluate(model, guide, x, iwae_k=20, seed=5)
    other = evaluate(model, guide, x, iwae_k=20, seed=6)
    assert one["elbo"] == two["elbo"] and one["iwae"] == two["iwae"] and one["elbo"] != other["elbo"]
    assert one["elbo"] == pytest.approx(one["reconstruction"] - one["kl"], abs=1e-9)
    assert one["elbo"] <= one["iwae"] <= one["exact_log_likelihood"] + 1e-9
    assert one["gap_elbo"] == pytest.approx(one["exact_log_likelihood"] - one["elbo"], abs=1e-12)
    assert one["num_points"] == len(x) and one["per_point"]["iwae"].shape == (len(x),)


def test_numpy_float32_input_and_the_models_dtype() -> None:
    model, x = _model()
    guide = build_guide("exact", model)
    m = evaluate(model, guide, x.numpy().astype(np.float32), iwae_k=2, seed=0)
    assert math.isfinite(m["elbo"]) and m["gap_elbo"] == pytest.approx(0, abs=1e-5)  # float32 input, float64 model


def test_active_units_counts_dimensions_whose_mean_varies() -> None:
    z = torch.stack([torch.linspace(-1, 1, 50), torch.full((50,), 3.0), 0.01 * torch.randn(50)], -1)
    assert active_units(z, threshold=0.01) == 1 and active_units(z[:1]) == 0


@pytest.mark.parametrize("field,value", [("iwae_k", 0), ("max_rows", -1), ("posterior_samples", 0),
                                         ("active_threshold", -0.1), ("threads", 0), ("fused", 1)])
def test_eval_config_refuses_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        EvalConfig(**{field: value})


def test_evaluation_restores_train_mode_and_the_callers_rng() -> None:
    model, x = _model()
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    state = torch.get_rng_state()
    evaluate(model, guide, x, iwae_k=3, seed=0)
    assert torch.equal(state, torch.get_rng_state()) and model.training and guide.training


@pytest.mark.parametrize("value,text", [
    (-0.0, "0.000"), (0.0, "0.000"), (-1e-12, "0.000"), (-0.0004, "0.000"), (np.float32(-1e-5), "0.000"),
    (-0.0006, "-0.001"), (1.23456, "1.235"), (-2.1654, "-2.165"), (-math.inf, "-inf"), (math.nan, "—"),
    (None, "—"), (3, "3"),
])
def test_table_cells_print_zero_without_a_sign(value: object, text: str) -> None:
    """A gap that is exactly 0 (−0.0 from a subtraction) or rounds to zero prints 0.000, never −0.000."""
    from pyro_lvm.report import _fmt

    assert _fmt(value) == text


def test_results_table_names_what_is_there_and_explains_it() -> None:
    """A column no row has a value for is left out (the mixture's exact log p(x) is None: it has none); a column
    with a note brings it under the table; a "|" in a title is escaped, so the Markdown row keeps its cells."""
    from pyro_lvm.report import COLUMN_NOTES, results_table

    rows = [{"guide": "map", "test": {"elbo": -2.0, "iwae": -2.0, "exact_log_likelihood": None,
                                      "log_lik_at_point_estimate": -2.0, "assignment_gap": -0.0,
                                      "pareto_k_theta": None}},
            {"guide": "meanfield", "test": {"elbo": -2.5, "iwae": -2.4, "exact_log_likelihood": None,
                                            "log_lik_at_point_estimate": -2.1, "assignment_gap": 0.0,
                                            "pareto_k_theta": 0.9}}]
    table = results_table({"experiment": "gaussian_mixture", "dataset": "toy", "results": rows, "baselines": []})
    header = table.splitlines()[2]
    assert header == "| guide | ELBO | IWAE-K | log p(x\\|θ̂) | assignment gap ELBO | k̂ q(θ) train | train s |"
    assert "exact log p(x)" not in table and "-0.000" not in table and "| map | -2.000 |" in table
    for key in ("log_lik_at_point_estimate", "assignment_gap", "pareto_k_theta"):
        assert COLUMN_NOTES[key] in table
