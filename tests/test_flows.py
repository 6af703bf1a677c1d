"""Flow guides: the log q(z|x) that Trace_ELBO sees equals the base log-density minus the summed
log|det| of every transform, with the Jacobians computed by autograd, point by point."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine
from torch.autograd.functional import jacobian

from pyro_lvm.guides import FLOWS, GuideConfig, build_guide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.runtime import local_params

N, K = 4, 3


def _guide(spec: str):
    torch.manual_seed(0)
    model = VAE(VAEConfig(data_dim=6, latent_dim=K, hidden=(8,)))
    guide = build_guide(spec, model, GuideConfig(hidden=(8,), flow_hidden=(8,), init_scale=0.7))
    # random, non-trivial flow parameters (fresh init can sit near the identity)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, guide.double()


@pytest.mark.parametrize("spec", [f"{name}:2" for name in FLOWS.names()] + ["amortized-fullcov"])
def test_log_q_is_base_minus_autograd_log_dets(spec: str) -> None:
    model, guide = _guide(spec)
    x = (torch.rand(N, 6, generator=torch.Generator().manual_seed(1)) < 0.5).double()

    torch.manual_seed(123)
    with local_params(model, guide):
        tr = poutine.trace(guide).get_trace(x)
    site = tr.nodes["z"]
    z_elbo, log_q_elbo = site["value"], site["fn"].log_prob(site["value"])  # what Trace_ELBO scores

    h = guide.encoder(x)
    torch.manual_seed(123)  # the same draw: the base's rsample is the guide's only random operation
    if spec == "amortized-fullcov":
        base = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(N, K).double(), 1.0), 1)
        transforms = guide.distribution(x).transforms
    else:
        base, transforms = guide.base(h), guide.conditioned(h)
    z0 = base.rsample()

    def push(v: torch.Tensor) -> torch.Tensor:  # (N, K) -> (N, K), each row with its own context
        for t in transforms:
            v = t(v)
        return v

    z = push(z0.clone())
    torch.testing.assert_close(z, z_elbo, rtol=1e-9, atol=1e-9)
    J = jacobian(push, z0.clone())  # (N, K, N, K); rows are independent, so blocks off the diagonal vanish
    blocks = torch.stack([J[i, :, i, :] for i in range(N)])
    off = J.clone()
    for i in range(N):
        off[i, :, i, :] = 0
    assert off.abs().max() < 1e-12
    expected = base.log_prob(z0) - torch.linalg.slogdet(blocks)[1]
    torch.testing.assert_close(log_q_elbo, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", FLOWS.names())
def test_default_number_of_transforms_and_K(name: str) -> None:
    model = VAE(VAEConfig(data_dim=6, latent_dim=K, hidden=(8,)))
    default = build_guide(name, model, GuideConfig(hidden=(8,), flow_hidden=(8,)))
    three = build_guide(f"{name}:3", model, GuideConfig(hidden=(8,), flow_hidden=(8,)))
    assert len(default.transforms) == FLOWS[name].default_k
    assert len(three.transforms) == 3


def test_autoregressive_flow_rejects_narrow_hidden_layers() -> None:
    model = VAE(VAEConfig(data_dim=6, latent_dim=K, hidden=(8,)))
    with pytest.raises(ValueError, match="hidden sizes >= the latent dimension"):
        build_guide("iaf", model, GuideConfig(hidden=(8,), flow_hidden=(2,)))


def test_fullcov_guide_is_the_gaussian_it_claims_and_reduces_to_the_diagonal_one() -> None:
    """log q(z|x) = log N(z; μ(x), L(x)L(x)ᵀ) at arbitrary z (the inverse path), and with the
    off-diagonal head at zero the guide is the diagonal guide with the same encoder and heads."""
    model, guide = _guide("amortized-fullcov")
    x = (torch.rand(N, 6, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    z = torch.randn(N, K, generator=torch.Generator().manual_seed(2)).double()
    h = guide.encoder(x)
    L = guide.scale_tril(h)
    assert torch.equal(L, L.tril()) and (L.diagonal(dim1=-2, dim2=-1) > 0).all()
    assert L.tril(-1).abs().max() > 1e-3  # the check below is not on a diagonal L
    reference = torch.distributions.MultivariateNormal(guide.loc(h), scale_tril=L)
    torch.testing.assert_close(guide.distribution(x).log_prob(z), reference.log_prob(z), rtol=1e-10, atol=1e-10)

    diagonal = build_guide("amortized", model, GuideConfig(hidden=(8,), init_scale=0.7)).double()
    diagonal.load_state_dict({k.replace("diag.", "scale.") if k.startswith("diag.") else k: v
                              for k, v in guide.state_dict().items() if not k.startswith("offdiag")})
    with torch.no_grad():
        guide.offdiag.weight.zero_()
        guide.offdiag.bias.zero_()
    torch.testing.assert_close(guide.distribution(x).log_prob(z), diagonal.distribution(x).log_prob(z),
                               rtol=1e-10, atol=1e-10)
