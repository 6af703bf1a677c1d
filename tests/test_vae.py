"""VAE model, evaluation bounds, JIT training and the VAE experiment on small data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import binary_data

from pyro_lvm.evaluate import EvalConfig, evaluate, per_point_bounds
from pyro_lvm.experiments import vae as vae_experiment
from pyro_lvm.guides import FLOWS, GuideConfig, build_guide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.runtime import local_params
from pyro_lvm.train import TrainConfig, fit


def test_bernoulli_decoder_rejects_non_binary_data() -> None:
    model = VAE(VAEConfig(data_dim=5, latent_dim=2, hidden=(4,)))
    guide = build_guide("amortized", model, GuideConfig(hidden=(4,)))
    x = torch.full((3, 5), 0.5)
    with pytest.raises(ValueError, match="binary 0/1 data"):
        model.validate(x)
    with pytest.raises(ValueError, match="binary 0/1 data"):
        fit(model, guide, x, None, TrainConfig(epochs=1, quiet=True))
    with pytest.raises(ValueError, match="binary 0/1 data"):
        evaluate(model, guide, x)


def test_gaussian_decoder_accepts_continuous_data_and_learns() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 5) @ torch.randn(5, 5)
    model = VAE(VAEConfig(data_dim=5, latent_dim=2, hidden=(16,), decoder="gaussian"))
    guide = build_guide("amortized", model, GuideConfig(hidden=(16,)))
    before = evaluate(model, guide, x, EvalConfig(iwae_k=16))["elbo"]
    fit(model, guide, x, None, TrainConfig(epochs=60, batch_size=None, lr=3e-2, quiet=True))
    after = evaluate(model, guide, x, EvalConfig(iwae_k=16))["elbo"]
    assert math.isfinite(after) and after > before + 1.0


def test_iwae_bounds_ELBO_and_rises_with_k() -> None:
    torch.manual_seed(0)
    x = binary_data(200, 12, flip=0.05)
    model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=(16,)))
    guide = build_guide("amortized", model, GuideConfig(hidden=(16,)))
    fit(model, guide, x, None, TrainConfig(epochs=30, batch_size=50, lr=1e-2, quiet=True))
    means, ses = [], []
    for k in (1, 10, 100, 1000):
        b = per_point_bounds(model, guide, x, k)
        means.append(b["iwae"].mean().item())
        ses.append(b["iwae"].std().item() / math.sqrt(len(x)))
        assert (b["iwae"] >= b["elbo"] - 1e-5).all()  # log-mean-exp >= mean, point by point (Jensen)
    # each step up in K must gain more than three standard errors of the difference's noise
    for (m0, s0), (m1, s1) in zip(zip(means, ses, strict=True), zip(means[1:], ses[1:], strict=True), strict=False):
        assert m1 > m0 - 3 * math.hypot(s0, s1)
    assert means[-1] > means[0] + 0.05, means  # a trained diagonal guide still leaves a measurable gap


def test_mixture_prior_trains() -> None:
    x = binary_data(32, 12, flip=0.05)
    model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=(8,), prior="mog", prior_components=3))
    guide = build_guide("planar:2", model, GuideConfig(hidden=(8,), flow_hidden=(8,)))
    result = fit(model, guide, x, None, TrainConfig(epochs=3, batch_size=16, quiet=True))
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert model.sample(4).shape == (4, 12)


def test_vae_experiment_end_to_end_on_500_images(tmp_path: Path, fake_mnist: Path) -> None:
    out = tmp_path / "run"
    code = vae_experiment.main(["--data-dir", str(fake_mnist), "--guide", "amortized,planar:2,iaf:1", "--epochs", "2",
                                "--warmup-epochs", "1", "--hidden", "32", "--flow-hidden", "32", "--latent-dim", "2",
                                "--iwae-k", "8", "--output", str(out), "--quiet"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "vae" and res["data"]["train"] == 500
    assert [r["guide"] for r in res["results"]] == ["amortized", "planar:2", "iaf:1"]
    for r in res["results"]:
        t = r["test"]
        for key in ("elbo", "iwae", "kl", "reconstruction", "active_units"):
            assert key in t
        assert t["iwae_k"] == 8 and t["iwae"] >= t["elbo"] - 1e-4
        assert math.isclose(t["elbo"], t["reconstruction"] - t["kl"], rel_tol=1e-5)
        assert r["train_seconds"] > 0 and r["seconds_per_epoch"] > 0
    for name in ("results.md", "training_curves.png", "amortized_samples.png", "amortized_reconstructions.png",
                 "amortized_latent.png"):
        assert (out / name).is_file(), name


REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist.npz"
#: the hash published beside the file (../shared/data/README.md)
SHARED_MNIST_SHA256 = (re.search(r"sha256[^\n]*?([0-9a-f]{64})", (REAL_MNIST.parent / "README.md").read_text()).group(1)
                       if REAL_MNIST.is_file() else None)


@pytest.mark.skipif(not REAL_MNIST.is_file(), reason="the real binarized MNIST is not beside the repository")
def test_vae_experiment_on_real_mnist_subset(tmp_path: Path) -> None:
    code = vae_experiment.main(["--subset", "500", "--epochs", "1", "--hidden", "16", "--latent-dim", "4",
                                "--iwae-k", "4", "--output", str(tmp_path), "--quiet"])
    res = json.loads((tmp_path / "results.json").read_text())
    data = res["data"]
    assert code == 0 and (data["train"], data["valid"], data["test"], data["dim"]) == (500, 500, 500, 784)
    # provenance: the file read, its hash as published beside it, and the split sizes
    assert data["provenance"]["sha256"] == SHARED_MNIST_SHA256
    assert data["provenance"]["splits"] == {"train": 500, "valid": 500, "test": 500}


def test_vae_experiment_on_digits_uses_gaussian_decoder(tmp_path: Path) -> None:
    code = vae_experiment.main(["--dataset", "digits", "--epochs", "2", "--hidden", "16", "--latent-dim", "2",
                                "--iwae-k", "4", "--output", str(tmp_path), "--quiet"])
    res = json.loads((tmp_path / "results.json").read_text())
    # binary data would get a Bernoulli decoder; digits are continuous, so the effective config says gaussian
    assert code == 0 and res["results"][0]["config"]["model"]["decoder"] == "gaussian"
    assert math.isfinite(res["results"][0]["test"]["iwae"])


def test_vae_experiment_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyro_lvm.experiments.cli import run_main

    code = run_main(vae_experiment.main, ["--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "binarized MNIST not found" in err and "--data-dir" in err and "Traceback" not in err


def _timeless(obj: Any, out: str) -> Any:
    """A results.json without its clock readings (seconds), with its output directory ``out`` written as <out>."""
    if isinstance(obj, dict):
        return {k: _timeless(v, out) for k, v in obj.items() if "second" not in k}
    if isinstance(obj, list):
        return [_timeless(v, out) for v in obj]
    return obj.replace(out, "<out>") if isinstance(obj, str) else obj


def test_quickstart_smoke_gives_the_same_results_with_its_sections_at_once_as_one_after_another(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyro_lvm.experiments import quickstart

    outs = {}
    for jobs in (2, 1):
        assert quickstart.main(["--smoke", "--output", str(tmp_path / str(jobs)), "--quiet", "--jobs", str(jobs)]) == 0
        outs[jobs] = capsys.readouterr().out
        summary = json.loads((tmp_path / str(jobs) / "summary.json").read_text())
        for name in quickstart.SECTIONS.names():
            assert (tmp_path / str(jobs) / name / "results.json").is_file() and name in summary
    assert "sklearn.FactorAnalysis" in outs[1] and "| exact |" in outs[1]
    # the tables in the same order; the numbers the same to the last bit (each section seeds its own fits)
    assert [line.split("|")[1:4] for line in outs[2].splitlines() if line.startswith("| ")] == \
        [line.split("|")[1:4] for line in outs[1].splitlines() if line.startswith("| ")]
    for name in quickstart.SECTIONS.names():
        a, b = (_timeless(json.loads((tmp_path / str(j) / name / "results.json").read_text()), str(tmp_path / str(j)))
                for j in (1, 2))
        assert a == b


LOCAL_GUIDES = ["amortized", "amortized-fullcov"] + [f"{name}:2" for name in FLOWS.names()]
DECODER_SETUPS = {
    "bernoulli-mlp": {"decoder": "bernoulli"},
    "gaussian-mlp-pixel": {"decoder": "gaussian"},
    "gaussian-mlp-shared": {"decoder": "gaussian", "gaussian_scale": "shared"},
    "bernoulli-conv": {"decoder": "bernoulli", "architecture": "conv"},
    "bernoulli-mog-prior": {"decoder": "bernoulli", "prior": "mog", "prior_components": 3},
    "bernoulli-vamp-prior": {"decoder": "bernoulli", "prior": "vamp:3"},
}


# every guide with the plain decoder and with the VampPrior (whose components come from the guide); every decoder,
# network and prior with a Gaussian guide, a flow with and one without an inverse: the decoder side does not see
# which guide drew z
PAIRINGS = ([(g, s) for g in LOCAL_GUIDES for s in ("bernoulli-mlp", "bernoulli-vamp-prior")]
            + [(g, s) for g in ("amortized", "planar:2", "iaf:2") for s in DECODER_SETUPS
               if s not in ("bernoulli-mlp", "bernoulli-vamp-prior")])


@pytest.mark.parametrize("spec,setup", PAIRINGS)
def test_every_guide_trains_every_decoder(spec: str, setup: str) -> None:
    """Guide x decoder (likelihood, network, prior) pairs: finite loss, gradients on every parameter."""
    from pyro.infer import Trace_ELBO

    torch.manual_seed(0)
    kw = DECODER_SETUPS[setup]
    d = 784 if kw.get("architecture") == "conv" else 12
    x = binary_data(8, d, flip=0.05) if kw["decoder"] == "bernoulli" else torch.randn(8, d)
    model = VAE(VAEConfig(data_dim=d, latent_dim=3, hidden=(8,), **kw))
    guide = build_guide(spec, model, GuideConfig(hidden=(8,), flow_hidden=(8,)))
    with local_params(model, guide):
        loss = Trace_ELBO().differentiable_loss(model, guide, x)
    assert torch.isfinite(loss)
    loss.backward()
    named = list(model.named_parameters()) + list(guide.named_parameters())
    missing = [n for n, p in named if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_a_guide_that_does_not_fit_is_refused_before_anything_trains(tmp_path: Path, fake_mnist: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = vae_experiment.main(["--data-dir", str(fake_mnist), "--guide", "amortized,exact", "--epochs", "1",
                                "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "guide 'exact' cannot be used here: vae has no closed-form posterior" in err
    assert not (tmp_path / "run").exists()  # checked before data were loaded or the first guide trained
