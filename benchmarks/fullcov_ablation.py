"""Ablation: how the full-covariance guide's parameterisation changes what a VAE learns.

    python -m benchmarks.fullcov_ablation --output runs/fullcov_ablation

Every variant trains the same 784-300-300-40 VAE on a seeded random subset of binarized MNIST (10,000
training images by default, 30 epochs, KL warm-up over 10, the VAE experiment's optimiser) from the
same seed, and is scored on 1,000 test images (ELBO, IWAE-200, reconstruction, KL). Variants:

* ``diagonal``: q(z|x) = N(μ, diag σ²), the vanilla guide.
* ``cholesky``: L = diag σ + M, the plain Cholesky factor with free off-diagonals M.
* ``cholesky-noclip``: the same without gradient-norm clipping.
* ``cholesky-frozen``: the same with M's head fixed at zero (so it *is* the diagonal family).
* ``ldl``: L = (I + M) diag σ, the LDLᵀ factorisation.
* ``ldl-0.1``: the same with M's head scaled by 0.1 — ``amortized-fullcov`` as shipped.

The question it answers: is a full-covariance guide that trains worse than the diagonal one limited
by its family (impossible: it contains the diagonal family) or by how its parameters are learned?
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pyro.util import set_rng_seed as set_seed
from torch import nn

from pyro_lvm.data import DataConfig, load_dataset
from pyro_lvm.evaluate import EvalConfig, evaluate
from pyro_lvm.experiments.cli import positive_int, run_main
from pyro_lvm.experiments.vae import VAEExperimentConfig
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.guides.amortized import FullCovGaussianGuide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.report import payload, write_results
from pyro_lvm.train import fit


class CholeskyGuide(FullCovGaussianGuide):
    """L = diag σ + M: the off-diagonals of the Cholesky factor are free outputs of the encoder."""

    OFFDIAG_SCALE = 1.0

    def scale_tril(self, h: torch.Tensor) -> torch.Tensor:
        k = self.latent_dim
        L = h.new_zeros(h.shape[:-1] + (k, k))  # (..., k, k)
        L[..., self._rows, self._cols] = self.offdiag(h)
        return L + torch.diag_embed(nn.functional.softplus(self.diag(h)) + 1e-6)


class UnscaledLDLGuide(FullCovGaussianGuide):
    """L = (I + M) diag σ with M's head at full scale."""

    OFFDIAG_SCALE = 1.0


def _frozen_cholesky(model: VAE, config: GuideConfig) -> nn.Module:
    guide = CholeskyGuide(model, config)
    with torch.no_grad():
        guide.offdiag.weight.zero_()
        guide.offdiag.bias.zero_()
    guide.offdiag.requires_grad_(False)
    return guide


@dataclass(frozen=True)
class Variant:
    make: Callable[[VAE, GuideConfig], nn.Module]
    clip: bool = True


VARIANTS: dict[str, Variant] = {
    "diagonal": Variant(lambda m, c: build_guide("amortized", m, c)),
    "cholesky": Variant(CholeskyGuide),
    "cholesky-noclip": Variant(CholeskyGuide, clip=False),
    "cholesky-frozen": Variant(_frozen_cholesky),
    "ldl": Variant(UnscaledLDLGuide),
    "ldl-0.1": Variant(lambda m, c: build_guide("amortized-fullcov", m, c)),
}


@dataclass
class AblationConfig:
    variants: tuple[str, ...] = tuple(VARIANTS)
    subset: int = 10_000
    epochs: int = 30
    warmup_epochs: int = 10
    test_points: int = 1000
    iwae_k: int = 200
    data_dir: str | None = None
    seed: int = 0
    output: str = "runs/fullcov_ablation"


def run(cfg: AblationConfig) -> dict[str, Any]:
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    ds = load_dataset("binarized_mnist", DataConfig(subset=cfg.subset, seed=cfg.seed, data_dir=cfg.data_dir))
    vae = VAEExperimentConfig()
    base = dataclasses.replace(vae.train, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, patience=None,
                               seed=cfg.seed, quiet=True)
    rows = []
    for name in cfg.variants:
        variant = VARIANTS[name]
        set_seed(cfg.seed)
        model = VAE(VAEConfig(data_dim=ds.data_dim, latent_dim=vae.latent_dim, hidden=vae.hidden))
        guide = variant.make(model, GuideConfig(hidden=tuple(reversed(vae.hidden))))
        train = dataclasses.replace(base, clip_norm=base.clip_norm if variant.clip else None)
        t0 = time.perf_counter()
        res = fit(model, guide, ds.train, ds.valid, train)
        seconds = time.perf_counter() - t0
        test = evaluate(model, guide, ds.test[: cfg.test_points], EvalConfig(iwae_k=cfg.iwae_k, seed=cfg.seed))
        test.pop("per_point", None)
        rows.append({"guide": name, "test": test, "train_seconds": seconds,
                     "valid_elbo_per_epoch": [h["valid_elbo"] for h in res.history]})
        print(f"{name}: test ELBO {test['elbo']:.2f}, IWAE-{cfg.iwae_k} {test['iwae']:.2f}", file=sys.stderr)
    return payload("fullcov_ablation", "binarized_mnist", dataclasses.asdict(cfg), ds.sizes(), rows, [])


def main(argv: Sequence[str] | None = None) -> int:
    d = AblationConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.fullcov_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(d.variants), help=f"comma-separated; valid: {', '.join(VARIANTS)}")
    p.add_argument("--subset", type=positive_int, default=d.subset, help="images per split")
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--test-points", type=positive_int, default=d.test_points)
    p.add_argument("--iwae-k", type=positive_int, default=d.iwae_k)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output", default=d.output)
    a = p.parse_args(argv)
    cfg = AblationConfig(variants=tuple(v.strip() for v in a.variants.split(",") if v.strip()), subset=a.subset,
                         epochs=a.epochs, warmup_epochs=a.warmup_epochs, test_points=a.test_points,
                         iwae_k=a.iwae_k, data_dir=a.data_dir, seed=a.seed, output=a.output)
    paths = write_results(Path(cfg.output), run(cfg))
    print(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
