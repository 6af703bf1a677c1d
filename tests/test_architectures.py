"""VAE network architectures (``pyro_lvm.nn.ARCHITECTURES``): gated units against their formula, both halves'
shapes and gradients, a gated-conv VAE taking a training step, config errors, and a gated-mlp save/load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import binary_data
from pyro.infer import Trace_ELBO

from pyro_lvm import build_guide, evaluate, load, save
from pyro_lvm.config import ConfigError
from pyro_lvm.guides import GuideConfig
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.nn import ARCHITECTURES, Gated, decoder_network, encoder_network
from pyro_lvm.runtime import local_params, seeded


def _sigmoid(a: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-a))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    # torch.allclose, not torch.testing.assert_close: the latter's first call imports for ~2 s on this machine
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), (a - b).abs().max()


def test_gated_units_compute_the_formula_from_their_weights(float64: None) -> None:
    # h = (W₁x + b₁) ⊙ σ(W₂x + b₂), written out from the layers' own weights; float64, so 1e-12 is rounding only
    torch.manual_seed(0)
    dense, x = Gated.dense(3, 2), torch.randn(4, 3)
    by_hand = ((x @ dense.value.weight.T + dense.value.bias)
               * _sigmoid(x @ dense.gate.weight.T + dense.gate.bias))
    _close(dense(x), by_hand, atol=1e-12)
    # a convolution whose kernel covers the whole (2, 3, 3) input is one dot product per output channel
    conv, img = Gated.conv(2, 4, 3, 1, 0), torch.randn(5, 2, 3, 3)
    flat = img.reshape(5, 18)
    by_hand = ((flat @ conv.value.weight.reshape(4, 18).T + conv.value.bias)
               * _sigmoid(flat @ conv.gate.weight.reshape(4, 18).T + conv.gate.bias))
    _close(conv(img).reshape(5, 4), by_hand, atol=1e-12)
    # a transposed convolution of a 1x1 input paints its kernel scaled by the input: y[o,i,j] = Σ_c W[c,o,i,j] z_c + b_o
    deconv, z = Gated.deconv(3, 2, 4, 1, 0), torch.randn(5, 3)
    lin = lambda layer: torch.einsum("nc,coij->noij", z, layer.weight) + layer.bias[:, None, None]  # noqa: E731
    by_hand = lin(deconv.value) * _sigmoid(lin(deconv.gate))
    _close(deconv(z.reshape(5, 3, 1, 1)), by_hand, atol=1e-12)


@pytest.mark.parametrize("architecture", ARCHITECTURES.names())
def test_both_halves_keep_leading_dims_and_pass_gradients_to_every_parameter(architecture: str) -> None:
    torch.manual_seed(0)
    k, hidden = 4, (8, 6)
    decoder = decoder_network(architecture, k, hidden, 784, "relu")
    encoder = encoder_network(architecture, 784, hidden, "relu")
    z = torch.randn(2, 3, k)  # (S, N, k): IWAE evaluation's latents
    x = binary_data(6, 784).reshape(2, 3, 784)
    out, h = decoder(z), encoder(x)
    assert out.shape == (2, 3, 784) and h.shape == (2, 3, encoder.output_dim)
    # each latent / point is decoded / encoded on its own: the reshapes mix no batch elements
    _close(out[1, 2], decoder(z[1, 2]), atol=1e-6, rtol=1e-5)
    _close(h[1, 2], encoder(x[1, 2]), atol=1e-6, rtol=1e-5)
    expected_width = {"gated-conv": 256}.get(architecture, hidden[-1])  # conv architectures ignore hidden sizes
    assert encoder.output_dim == expected_width
    (out.square().mean() + h.square().mean()).backward()
    for name, p in [*decoder.named_parameters(), *encoder.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gated_conv_vae_with_amortized_guide_takes_a_finite_step() -> None:
    x = binary_data(4, 784)
    with seeded(0):
        model = VAE(VAEConfig(data_dim=784, latent_dim=4, architecture="gated-conv"))
        guide = build_guide("amortized", model, GuideConfig(architecture="gated-conv"))
    assert guide.encoder.output_dim == 256
    params = [*model.parameters(), *guide.parameters()]
    elbo = Trace_ELBO()

    def loss() -> torch.Tensor:
        with seeded(1), local_params(model, guide):  # the same draws each time: the change is the step's alone
            return elbo.differentiable_loss(model, guide, x)

    before = loss()
    assert math.isfinite(before.item())
    before.backward()
    with torch.no_grad():  # Adam's first step, θ -= lr·sign(g), by hand: torch.optim's first step imports for ~4 s
        for p in params:
            p -= 1e-3 * p.grad.sign()
    after = loss()
    assert all(torch.isfinite(p).all() for p in params)
    # with common random numbers the loss falls by ~lr·Σ|g| to first order (0.5 of 2204 nats here, against float32
    # round-off of ~1e-3 nats); a NaN anywhere in the forward or backward pass fails this or the line above
    assert math.isfinite(after.item()) and after.item() < before.item()


def test_gated_conv_refuses_data_that_are_not_784_wide_naming_architecture() -> None:
    with pytest.raises(ConfigError, match="architecture") as e:
        VAEConfig(data_dim=12, latent_dim=2, architecture="gated-conv")
    assert e.value.field == "architecture"
    model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=(4,)))
    with pytest.raises(ValueError, match=r"^architecture: 'gated-conv' reads inputs of width \(784,\)"):
        build_guide("amortized", model, GuideConfig(architecture="gated-conv"))


def test_guide_config_refuses_an_unknown_architecture() -> None:
    with pytest.raises(ConfigError, match="unknown value 'resnet'") as e:
        GuideConfig(architecture="resnet")
    assert e.value.field == "architecture"


def test_mlp_and_conv_guides_keep_their_parameter_names() -> None:
    # checkpoints saved before gated architectures existed (no guide `architecture`: "mlp") must still load
    model = VAE(VAEConfig(data_dim=784, latent_dim=2, hidden=(4,), architecture="conv"))
    names = {a: list(build_guide("amortized", model, GuideConfig(hidden=(4,), architecture=a)).state_dict())
             for a in ("mlp", "conv")}
    assert names["mlp"] == names["conv"] and "encoder.net.0.weight" in names["mlp"]


@pytest.mark.parametrize("spec", ["amortized", "planar:2"])
def test_gated_mlp_model_and_guide_round_trip_through_save_and_load(tmp_path: Path, spec: str) -> None:
    x = binary_data(16, 12)
    with seeded(0):
        model = VAE(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,), architecture="gated-mlp"))
        guide = build_guide(spec, model, GuideConfig(hidden=(8,), flow_hidden=(8,), architecture="gated-mlp"))
        with torch.no_grad():  # move off the initial values, so a rebuilt-but-not-loaded guide would not match
            for p in [*model.parameters(), *guide.parameters()]:
                p.add_(0.1 * torch.randn_like(p))
    assert "encoder.net.0.gate.weight" in guide.state_dict()  # the gated encoder, not the MLP one
    before = evaluate(model, guide, x, iwae_k=3, posterior_samples=2, seed=1)
    save(tmp_path / "fit.pt", model, guide)
    fitted = load(tmp_path / "fit.pt")
    after = evaluate(fitted.model, fitted.guide, x, iwae_k=3, posterior_samples=2, seed=1)
    assert fitted.guide.guide_config.architecture == "gated-mlp" and fitted.model.config.architecture == "gated-mlp"
    assert after["elbo"] == pytest.approx(before["elbo"], rel=1e-6, abs=1e-6)
    assert after["iwae"] == pytest.approx(before["iwae"], rel=1e-6, abs=1e-6)


def test_a_28x28_network_on_other_data_is_refused_before_anything_is_written(tmp_path, capsys) -> None:
    from pyro_lvm.experiments import vae as vae_experiment

    code = vae_experiment.main(["--dataset", "digits", "--architecture", "gated-conv", "--output",
                                str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --architecture: 'gated-conv'")
    assert not (tmp_path / "run").exists()
