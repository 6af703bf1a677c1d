"""The VampPrior: p(z) = (1/K) Σ_k q(z|u_k) with the guide's own encoder, scored without an (S, B, K, k) tensor."""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_lvm import load, save
from pyro_lvm.config import ConfigError
from pyro_lvm.experiments import vae as vae_experiment
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.models.vae import DiagonalGaussianMixture
from pyro_lvm.runtime import local_params


def _vamp(k: int, spec: str = "amortized", dtype: torch.dtype = torch.float64) -> tuple[VAE, torch.nn.Module]:
    torch.manual_seed(0)
    model = VAE(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,), prior=f"vamp:{k}"))
    guide = build_guide(spec, model, GuideConfig(hidden=(8,), flow_hidden=(8,), init_scale=0.7))
    return model.to(dtype), guide.to(dtype)


def test_fast_mixture_log_density_is_the_mixture_of_its_gaussians() -> None:
    """The expanded Mahalanobis form against MixtureSameFamily, in float64 (agreement to round-off: 1e-10)."""
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(7, 3, generator=g, dtype=torch.float64)
    scale = torch.rand(7, 3, generator=g, dtype=torch.float64) + 0.1
    z = 3 * torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    reference = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(7, dtype=torch.float64)),
                                       dist.Normal(loc, scale).to_event(1))
    torch.testing.assert_close(DiagonalGaussianMixture(loc, scale).log_prob(z), reference.log_prob(z),
                               rtol=0, atol=1e-10)


def test_one_pseudo_input_at_the_data_mean_is_the_posterior_there() -> None:
    """K = 1, u = x̄: p(z) = q(z|x̄) exactly, so the ELBO's KL term at x = x̄ is 0 for every draw; the prior's
    draws have q(z|x̄)'s mean and sd (20,000 draws: each within 5 standard errors), and decode to images."""
    model, guide = _vamp(1)
    x = (torch.rand(40, 12, generator=torch.Generator().manual_seed(1)) < 0.3).double()
    with torch.no_grad():
        model.prior.pseudo_inputs.copy_(x.mean(0, keepdim=True))  # in [0, 1]: hardtanh leaves it unchanged
    xbar = x.mean(0, keepdim=True)
    q = guide.distribution(xbar)  # batch (1,)
    p = model.prior()
    z = q.sample((50,))  # (50, 1, 3)
    torch.testing.assert_close(p.log_prob(z), q.log_prob(z), rtol=0, atol=1e-10)

    pyro.set_rng_seed(2)
    draws = p.sample((20_000,))  # (20000, 3)
    base = q.base_dist
    se = base.scale[0] / math.sqrt(20_000)
    assert ((draws.mean(0) - base.loc[0]).abs() < 5 * se).all()
    assert ((draws.std(0) / base.scale[0] - 1).abs() < 5 / math.sqrt(2 * 20_000)).all()  # sd's SE ≈ sd/√(2n)
    images = model.sample(6, mean=True, seed=3)
    assert images.shape == (6, 12) and ((images > 0) & (images < 1)).all()
    binary = model.sample(6, seed=3)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("spec", ["amortized", "amortized-fullcov", "iaf:2"])
def test_kl_is_estimated_and_meanfield_elbo_falls_back_to_the_same_estimate(spec: str) -> None:
    """No closed-form KL(q ‖ p) for a mixture prior: TraceMeanField_ELBO's loss equals Trace_ELBO's draw for
    draw (Pyro finds no registered KL and estimates it), and gradients reach the pseudo-inputs and, through the
    prior term, the encoder both share."""
    model, guide = _vamp(4, spec)
    x = (torch.rand(6, 12, generator=torch.Generator().manual_seed(1)) < 0.3).double()
    with local_params(model, guide):
        pyro.set_rng_seed(5)
        mc = Trace_ELBO().differentiable_loss(model, guide, x)
        pyro.set_rng_seed(5)
        mf = TraceMeanField_ELBO().differentiable_loss(model, guide, x)
    torch.testing.assert_close(mf, mc, rtol=1e-10, atol=1e-10)
    # the prior term alone reaches the pseudo-inputs and the encoder
    z = torch.randn(5, 3, dtype=torch.float64)
    model.prior().log_prob(z).sum().backward()
    assert model.prior.pseudo_inputs.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.encoder.parameters())


def test_vamp_prior_needs_a_guide_and_parses_its_spec() -> None:
    model = VAE(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,), prior="vamp:5"))
    assert (model.config.prior, model.config.prior_components) == ("vamp", 5)
    with pytest.raises(ValueError, match="prior: .*no guide is bound"):
        model.sample(2)
    with pytest.raises(ValueError, match="prior: 'vamp' pushes its pseudo-inputs through the guide's encoder"):
        model.bind_guide(torch.nn.Linear(2, 2))
    for bad in ("vamp:0", "vamp:x"):
        with pytest.raises(ConfigError, match="^prior: "):
            VAEConfig(data_dim=12, prior=bad)


def test_cli_rejects_an_unknown_prior_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        vae_experiment.main(["--prior", "vampire:3", "--output", "/nonexistent/never"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "vampire" in err[0] and "vamp" in err[0]


def test_save_and_load_rebind_the_encoder(tmp_path: Path) -> None:
    model, guide = _vamp(3, "planar:2")
    x = (torch.rand(6, 12, generator=torch.Generator().manual_seed(1)) < 0.3).double()
    model.init_from_data(x, seed=0)
    assert {tuple(r) for r in model.prior.pseudo_inputs.tolist()} <= {tuple(r) for r in x.tolist()}
    z = torch.randn(4, 3, dtype=torch.float64)
    before = model.prior().log_prob(z)
    save(tmp_path / "vamp.pt", model, guide)
    fitted = load(tmp_path / "vamp.pt")
    torch.testing.assert_close(fitted.model.prior().log_prob(z.to(fitted.model.dtype)), before.to(fitted.model.dtype))
