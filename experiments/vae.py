r"""VAEs with swappable variational families, evaluated by the papers' protocol.

    python -m pyro_lvm.experiments.vae --dataset binarized_mnist --guide amortized,planar:10,iaf:2 \
        --epochs 100 --iwae-k 5000 --output runs/vae_mnist

Each guide is fitted with SVI (Trace_ELBO, minibatch 100, Adam, linear KL warm-up, early stopping on
the validation ELBO) and scored on the test split: ELBO, IWAE-K (the test log-likelihood estimate),
reconstruction and KL terms, and active units. Binary data get a Bernoulli decoder, other data a
Gaussian one (``--decoder`` overrides).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pyro_lvm.config import check_choice, check_config, check_parameter_memory, dense_parameters
from pyro_lvm.data import DataConfig, Dataset
from pyro_lvm.guides import GuideConfig
from pyro_lvm.guides.registry import canonical_guide_specs
from pyro_lvm.harness import Experiment, ExperimentConfig, register_experiment
from pyro_lvm.models import DECODERS, VAE, VAEConfig
from pyro_lvm.models.base import LatentModel, ModelTraits, row_blocks
from pyro_lvm.models.vae import parse_prior
from pyro_lvm.nn import ACTIVATIONS, ARCHITECTURES
from pyro_lvm.report import new_figure
from pyro_lvm.train import TrainConfig

from .cli import run_cli


@dataclass
class VAEExperimentConfig(ExperimentConfig):
    dataset: str = "binarized_mnist"
    output: str = "runs/vae"
    #: directory with binarized_mnist.npz (default: $PYRO_LVM_DATA_DIR, then ../shared/data)
    data_dir: str | None = None
    #: dimension of z
    latent_dim: int = 40
    #: decoder hidden sizes; the encoder mirrors them
    hidden: tuple[int, ...] = (300, 300)
    #: hidden sizes of each flow layer's hypernetwork
    flow_hidden: tuple[int, ...] = (300,)
    #: bernoulli or gaussian; default: bernoulli for binary data, gaussian otherwise
    decoder: str | None = None
    #: networks of decoder and encoder: mlp, gated-mlp (gated dense units), conv (28x28: conv decoder, MLP encoder) or
    #: gated-conv (28x28: van den Berg et al.'s gated conv encoder and decoder); conv architectures ignore --hidden
    architecture: str = "mlp"
    #: nonlinearity of encoder and decoder
    activation: str = "relu"
    #: prior p(z): standard, mog[:K] (K learned Gaussians) or vamp[:K] (the VampPrior, K pseudo-inputs); K: 10
    prior: str = "standard"
    #: train with JitTrace_ELBO (see the README for the guides it supports)
    jit: bool = False
    #: evaluate on a seeded random subset of N test points (the test file is ordered)
    test_subset: int | None = None
    #: keep a seeded random subset of at most N points per split (quick runs and tests)
    subset: int | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=100, batch_size=100, lr=1e-3, lr_final_factor=0.3, warmup_epochs=10, patience=20, clip_norm=100.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.hidden, self.flow_hidden = tuple(self.hidden), tuple(self.flow_hidden)
        check_config(self, positive_int=("latent_dim", "test_subset", "subset"), layers=("hidden", "flow_hidden"))
        check_choice(self, "decoder", DECODERS.names())
        check_choice(self, "architecture", ARCHITECTURES.names())
        check_choice(self, "activation", ACTIVATIONS)
        parse_prior(self.prior)  # the model's own check of NAME[:K]
        self.guides = canonical_guide_specs(self.guides)


@register_experiment("vae")
class VAEExperiment(Experiment):
    Config = VAEExperimentConfig
    summary = "VAEs (Bernoulli or Gaussian decoders) with every local guide, on ELBO and IWAE-K"
    streams = True  # minibatches, evaluation, --inspect and the figures read a streamed split block by block
    train_flags = ("epochs", "warmup_epochs", "patience", "batch_size", "lr", "lr_final_factor", "max_steps",
                   "num_particles", "objective")
    choices = {"decoder": DECODERS.names, "architecture": ARCHITECTURES.names, "activation": lambda: list(ACTIVATIONS)}

    def model_traits(self, cfg: VAEExperimentConfig) -> ModelTraits:
        return VAE.traits_for(None)

    def estimator(self, cfg: VAEExperimentConfig) -> str | None:
        return "jit" if cfg.jit else cfg.train.elbo

    def data_config(self, cfg: VAEExperimentConfig) -> DataConfig:
        return DataConfig(seed=cfg.seed, data_dir=cfg.data_dir, subset=cfg.subset)

    def test_split(self, cfg: VAEExperimentConfig, ds: Dataset) -> torch.Tensor:
        test = ds.test
        if cfg.test_subset and cfg.test_subset < len(test):  # a seeded random subset: the test file is ordered
            keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.test_subset]
            test = test[keep]
        return test

    def model_config(self, cfg: VAEExperimentConfig, ds: Dataset) -> VAEConfig:
        decoder = cfg.decoder or ("bernoulli" if ds.binary else "gaussian")
        return VAEConfig(data_dim=ds.data_dim, latent_dim=cfg.latent_dim, hidden=cfg.hidden, decoder=decoder,
                         architecture=cfg.architecture, activation=cfg.activation, prior=cfg.prior)

    def check_data(self, cfg: VAEExperimentConfig, ds: Dataset) -> None:
        model = self.model_config(cfg, ds)  # the config's own checks against the data (a 28x28 network on other widths)
        if ARCHITECTURES[cfg.architecture][1] is None:  # dense networks: the encoder mirrors the decoder's --hidden
            gated = 2 if cfg.architecture.startswith("gated") else 1
            encoder = dense_parameters((ds.data_dim, *reversed(cfg.hidden), 2 * cfg.latent_dim)) * gated
            check_parameter_memory("hidden", model.parameter_count() + encoder,
                                   f"decoder and encoder of hidden sizes {cfg.hidden} (latent_dim {cfg.latent_dim}, "
                                   f"data_dim {ds.data_dim})")

    def build_model(self, cfg: VAEExperimentConfig, ds: Dataset) -> LatentModel:
        return VAE(self.model_config(cfg, ds))

    def guide_config(self, cfg: VAEExperimentConfig) -> GuideConfig:
        return GuideConfig(hidden=tuple(reversed(cfg.hidden)), flow_hidden=cfg.flow_hidden, activation=cfg.activation,
                           architecture=cfg.architecture)

    def train_config(self, cfg: VAEExperimentConfig, spec: str, output: str) -> TrainConfig:
        base = super().train_config(cfg, spec, output)
        return dataclasses.replace(base, elbo="jit") if cfg.jit else base

    def describe(self, row: dict[str, Any]) -> str:
        t = row["test"]
        return (f"{row['guide']:>16}: test ELBO {t['elbo']:.2f}  IWAE-{t['iwae_k']} {t['iwae']:.2f}  "
                f"KL {t['kl']:.2f}  active {t['active_units']}")

    def guide_figures(self, cfg: VAEExperimentConfig, ds: Dataset, spec: str, model: LatentModel, guide: Any,
                      prefix: str) -> None:
        plot_vae_figures(model, guide, ds, self.test_split(cfg, ds), prefix)


@torch.no_grad()
def plot_vae_figures(model: VAE, guide: Any, ds: Dataset, test: torch.Tensor, prefix: str) -> list[str]:
    """Samples from p(x), test reconstructions, and (for 2-D latents) the test posterior means."""
    paths = []
    if ds.image_shape is not None:
        h, w = ds.image_shape
        samples = model.sample(64, mean=True).cpu().reshape(8, 8, h, w).permute(0, 2, 1, 3).reshape(8 * h, 8 * w)
        x = test[:16]
        recon = model.decoder.mean(guide.posterior(x).sample()).cpu()
        pairs = torch.stack([x.cpu().to(recon), recon]).reshape(2, 16, h, w).permute(1, 2, 0, 3).reshape(16, h, 2 * w)
        pairs = pairs.reshape(4, 4, h, 2 * w).permute(0, 2, 1, 3).reshape(4 * h, 8 * w)
        for name, img in (("samples", samples), ("reconstructions", pairs)):
            fig, ax = new_figure(figsize=(5, 5))
            ax.imshow(img.numpy(), cmap="gray")
            ax.set_axis_off()
            ax.set_title("means of p(x|z), z ~ p(z)" if name == "samples" else "test images | reconstructions")
            fig.savefig(f"{prefix}_{name}.png", dpi=100, bbox_inches="tight")
            paths.append(f"{prefix}_{name}.png")
    if model.latent_dim == 2:
        z = torch.cat([guide.encode(rows).cpu() for _, rows in row_blocks(test)])  # streamed data: by blocks
        fig, ax = new_figure(figsize=(6, 5))
        labels = ds.labels.get("test")
        if labels is None or len(labels) != len(test):
            ax.scatter(z[:, 0], z[:, 1], s=4)
        else:
            fig.colorbar(ax.scatter(z[:, 0], z[:, 1], s=4, c=labels, cmap="tab10"), ax=ax, label="label")
        ax.set(xlabel="z1", ylabel="z2", title="posterior means of test points")
        fig.savefig(f"{prefix}_latent.png", dpi=100, bbox_inches="tight")
        paths.append(f"{prefix}_latent.png")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(VAEExperiment(), argv)


if __name__ == "__main__":
    sys.exit(main())
