"""The contract on an accelerator: every model x usable guide pair trains, scores, saves and loads on a CUDA
device, and computes there the same bounds as on the CPU.

The device tests are skipped where torch sees no CUDA device (CI has none); ``PYRO_LVM_TEST_DEVICE=cpu`` runs them
on the CPU, to test the tests. What they catch: a tensor a model or guide keeps outside its parameters and buffers
(it stays on the CPU when the module moves, and the first step fails), a tensor made on the default device inside a
forward pass, and arithmetic that differs between devices beyond Monte Carlo noise. The first test catches the
same faults without a GPU, through a dtype move: a tensor left behind by ``.double()`` stays float32 and the first
float64 step fails or comes out float32.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from pyro_lvm import load, save
from pyro_lvm.evaluate import log_weight_terms
from pyro_lvm.guides import GUIDES, GuideConfig, build_guide
from pyro_lvm.models import MODELS, VAE
from pyro_lvm.runtime import local_params
from pyro_lvm.train import ELBOS, TrainConfig, fit

DEVICE = os.environ.get("PYRO_LVM_TEST_DEVICE", "cuda")
needs_device = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")

SMALL = GuideConfig(hidden=(8,), flow_hidden=(8,))
PAIRS = [(m, g) for m in MODELS.names() for g in GUIDES.names()
         if GUIDES[g].requires(MODELS[m].example(seed=0)[0]) is None]
# the VAE's learned priors: the VampPrior binds the guide's encoder, the mixture holds its own parameters
PRIORS = [("vamp:3", g) for g in ("amortized", "iaf", "sylvester-t")] + [("mog:3", "amortized")]


def _example(model_name: str, prior: str | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    model, x = MODELS[model_name].example(seed=0)
    if prior is not None:
        model = VAE(dataclasses.replace(model.config, prior=prior))
    return model, x


def _on_device(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are not on ``DEVICE``."""
    want = torch.device(DEVICE).type
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type != want]


def _tensors(state: object, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a (nested) state dict by dotted name."""
    if isinstance(state, torch.Tensor):
        return [(prefix, state)]
    if isinstance(state, dict):
        return [kv for k, v in state.items() for kv in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    return []


def _pairs() -> list[tuple[str, str, str | None]]:
    return [(m, g, None) for m, g in PAIRS] + [("vae", g, p) for p, g in PRIORS]


@pytest.mark.parametrize("model_name,guide_name,prior", _pairs())
def test_pair_follows_its_modules_to_float64(model_name: str, guide_name: str, prior: str | None) -> None:
    """Built in float32, moved by ``.double()`` before the first step (when autoguides and a model's initial values
    make their parameters): every parameter, buffer, the loss and every gradient are float64."""
    torch.manual_seed(0)
    model, x = _example(model_name, prior)
    guide = build_guide(guide_name, model, SMALL)
    model, guide, x = model.double(), guide.double(), x.double()
    with local_params(model, guide):
        loss = ELBOS[model.default_elbo](max_plate_nesting=1).differentiable_loss(model, guide, x)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    loss.backward()
    tensors = [*model.named_parameters(), *model.named_buffers(), *guide.named_parameters(), *guide.named_buffers()]
    left = [n for n, t in tensors if t.is_floating_point() and t.dtype != torch.float64]
    assert not left, f"left in float32 by .double(): {left}"
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in [*model.parameters(), *guide.parameters()])


@needs_device
@pytest.mark.parametrize("model_name,guide_name,prior", _pairs())
def test_pair_trains_scores_and_loads_on_the_device(model_name: str, guide_name: str, prior: str | None,
                                                    tmp_path: object) -> None:
    torch.manual_seed(0)
    model, x = _example(model_name, prior)
    guide = build_guide(guide_name, model, SMALL)
    model, guide, x = model.to(DEVICE), guide.to(DEVICE), x.to(DEVICE)
    elbo = ELBOS[model.default_elbo](max_plate_nesting=1)
    with local_params(model, guide):
        loss = elbo.differentiable_loss(model, guide, x)  # also builds an autoguide's parameters, on x's device
    assert loss.device.type == torch.device(DEVICE).type and torch.isfinite(loss)
    assert not _on_device(model) and not _on_device(guide), (_on_device(model), _on_device(guide))
    loss.backward()
    grads = [p.grad for p in [*model.parameters(), *guide.parameters()]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    if model.local_site is not None:
        terms = log_weight_terms(model, guide, x, num_samples=3)
        assert all(torch.isfinite(terms[k]).all() and terms[k].shape == (3, len(x))
                   for k in ("log_lik", "log_prior", "log_q"))

    params = [*model.parameters(), *guide.parameters()]
    before = [p.detach().clone() for p in params]
    fit(model, guide, x, None, TrainConfig(epochs=2, batch_size=8, lr=1e-2, quiet=True, seed=0,
                                           accelerator="gpu" if DEVICE == "cuda" else "cpu"))
    assert not _on_device(model) and not _on_device(guide), "fit left a tensor off the device"
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True)), "fit changed nothing"

    path = save(tmp_path / "fit.pt", model, guide)  # written from the device, read on the CPU
    loaded = load(path, device="cpu")
    saved = dict(_tensors({"model": model.state_dict(), "guide": guide.state_dict()}))
    back = dict(_tensors({"model": loaded.model.state_dict(), "guide": loaded.guide.state_dict()}))
    assert saved.keys() == back.keys() and saved
    assert all(back[k].device.type == "cpu" and torch.equal(saved[k].cpu(), back[k]) for k in saved)


@needs_device
@pytest.mark.parametrize("model_name,guide_name,prior",
                         [p for p in _pairs() if MODELS[p[0]].local_site is not None])
def test_device_bounds_agree_with_the_cpu(model_name: str, guide_name: str, prior: str | None) -> None:
    """The mean log importance weight log p(x, z) − log q(z|x), z ~ q, of the same float64 model and guide on
    the device and on the CPU: independent Monte Carlo estimates of one number, so their difference is within
    5 of its standard errors (a wrong density on one device moves it by far more: a log-det term or a scale
    misplaced shifts every weight)."""
    torch.manual_seed(0)
    model, x = _example(model_name, prior)
    guide = build_guide(guide_name, model, SMALL)
    model, guide, x = model.double(), guide.double(), x.double()
    with local_params(model, guide):
        ELBOS["trace"](max_plate_nesting=1).differentiable_loss(model, guide, x)  # lazily built parameters
    estimates = []
    for device in ("cpu", DEVICE):
        torch.manual_seed(1)
        with torch.no_grad():
            t = log_weight_terms(model.to(device), guide.to(device), x.to(device), num_samples=400)
        log_w = (t["log_lik"] + t["log_prior"] - t["log_q"]).cpu()  # (S, N)
        per_draw = log_w.mean(-1)  # the points share each draw's noise stream: average them, then over draws
        estimates.append((per_draw.mean(), per_draw.var() / len(per_draw)))
    (m_cpu, v_cpu), (m_dev, v_dev) = estimates
    assert abs(m_cpu - m_dev) < 5 * (v_cpu + v_dev).sqrt() + 1e-9, (m_cpu, m_dev, (v_cpu + v_dev).sqrt())
