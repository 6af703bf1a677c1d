"""VAEs with swappable variational families, evaluated by the papers' protocol.

    python -m experiments.vae --dataset binarized_mnist --guide amortized,planar:10,iaf:2 \
        --epochs 100 --iwae-k 5000 --output runs/vae_mnist

Each guide is fitted with SVI (Trace_ELBO, minibatch 100, Adam, linear KL warm-up, early stopping on
the validation ELBO) and scored on the test split: ELBO, IWAE-K (the test log-likelihood estimate),
reconstruction and KL terms, and active units.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import PRIORS, VAE, VAEConfig
from pyro_lvm.models.vae import ACTIVATIONS

from pyro_lvm.data import DataConfig, Dataset, load_dataset
from pyro_lvm.evaluate import EvalConfig, evaluate, public
from pyro_lvm.report import payload, plot_training_curves, write_results
from pyro_lvm.train import FitResult, TrainConfig, fit, load_checkpoint, set_seed

from .cli import add_common_args, experiment_main, guide_list, int_tuple, positive_int, run_main

DATASETS = ("binarized_mnist", "digits")


@dataclass
class VAEExperimentConfig:
    dataset: str = "binarized_mnist"
    data_dir: str | None = None
    guides: list[str] = field(default_factory=lambda: ["amortized"])
    latent_dim: int = 40
    #: decoder hidden sizes; the encoder mirrors them
    hidden: tuple[int, ...] = (300, 300)
    #: hidden sizes of each flow layer's hypernetwork
    flow_hidden: tuple[int, ...] = (300,)
    #: "bernoulli" or "gaussian"; default: bernoulli for binary data, gaussian otherwise
    decoder: str | None = None
    architecture: str = "mlp"
    #: nonlinearity of encoder and decoder
    activation: str = "relu"
    prior: str = "standard"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=100, batch_size=100, lr=1e-3, lr_final_factor=0.3, warmup_epochs=10, patience=20, clip_norm=100.0))
    iwae_k: int = 1000
    #: evaluate on the first N test points only (``None``: all)
    test_subset: int | None = None
    #: keep at most N points per split (quick runs and tests)
    subset: int | None = None
    #: skip training: load each guide's best.pt from this earlier run's --output directory
    from_checkpoints: str | None = None
    seed: int = 0
    output: str = "runs/vae"
    quiet: bool = False


def build(cfg: VAEExperimentConfig, ds: Dataset, spec: str) -> tuple[VAE, Any]:
    decoder = cfg.decoder or ("bernoulli" if ds.binary else "gaussian")
    model = VAE(VAEConfig(data_dim=ds.data_dim, latent_dim=cfg.latent_dim, hidden=cfg.hidden, decoder=decoder,
                          architecture=cfg.architecture, activation=cfg.activation, prior=cfg.prior))
    guide = build_guide(spec, model, GuideConfig(hidden=tuple(reversed(cfg.hidden)), flow_hidden=cfg.flow_hidden,
                                                 activation=cfg.activation))
    return model, guide


def restore(model: VAE, guide: Any, directory: Path) -> FitResult:
    """Load the state an earlier run kept (``best.pt``, else ``last.pt``) and its history, instead of training."""
    best, last = directory / "best.pt", directory / "last.pt"
    if not (best.is_file() or last.is_file()):
        raise FileNotFoundError(f"no checkpoint at {best} or {last}; train first, or point --from-checkpoints at "
                                "the --output directory of an earlier run with the same guides")
    ckpt = load_checkpoint(best if best.is_file() else last, model, guide)
    history = torch.load(last, weights_only=False)["history"] if last.is_file() else []
    valid = [h["valid_elbo"] for h in history if h["epoch"] == ckpt["epoch"] and "valid_elbo" in h]
    return FitResult(history=history, best_epoch=ckpt["epoch"], best_valid_elbo=valid[0] if valid else None,
                     train_seconds=history[-1]["seconds"] if history else 0.0)


def run(cfg: VAEExperimentConfig) -> dict[str, Any]:
    """Fit each guide, evaluate on the test split, write results and figures; returns the payload."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    set_seed(cfg.seed)
    ds = load_dataset(cfg.dataset, DataConfig(seed=cfg.seed, data_dir=cfg.data_dir, subset=cfg.subset))
    test = ds.test
    if cfg.test_subset and cfg.test_subset < len(test):  # a seeded random subset: the test file is ordered
        test = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.test_subset]]
    results, histories, fitted = [], {}, {}
    for spec in cfg.guides:
        set_seed(cfg.seed)
        model, guide = build(cfg, ds, spec)
        model.validate(ds.train, name=f"{cfg.dataset} train split")
        tag = spec.replace(":", "_")
        if cfg.from_checkpoints:
            fr = restore(model, guide, Path(cfg.from_checkpoints) / "checkpoints" / tag)
        else:
            train_cfg = dataclasses.replace(cfg.train, seed=cfg.seed, quiet=cfg.quiet,
                                            output=f"{cfg.output}/checkpoints/{tag}")
            fr = fit(model, guide, ds.train, ds.valid, train_cfg)
        metrics = public(evaluate(model, guide, test, EvalConfig(iwae_k=cfg.iwae_k)))
        results.append({"guide": spec, "test": metrics, "train_seconds": fr.train_seconds,
                        "seconds_per_epoch": fr.seconds_per_epoch, "best_epoch": fr.best_epoch,
                        "epochs_run": len(fr.history), "best_valid_elbo": fr.best_valid_elbo,
                        "guide_parameters": sum(p.numel() for p in guide.parameters())})
        histories[spec], fitted[spec] = fr.history, (model, guide)
        if not cfg.quiet:
            print(f"{spec:>16}: test ELBO {metrics['elbo']:.2f}  IWAE-{cfg.iwae_k} {metrics['iwae']:.2f}  "
                  f"KL {metrics['kl']:.2f}  active {metrics['active_units']}  ({fr.train_seconds:.0f}s)",
                  file=sys.stderr)
        out = payload("vae", cfg.dataset, dataclasses.asdict(cfg), {**ds.sizes(), "test": len(test)}, results, [])
        write_results(cfg.output, out)  # after every guide, so a long run leaves partial results
    plot_training_curves(histories, f"{cfg.output}/training_curves.png", title=f"VAE on {cfg.dataset}")
    for spec, (model, guide) in fitted.items():
        plot_vae_figures(model, guide, ds, test, f"{cfg.output}/{spec.replace(':', '_')}")
    return out


@torch.no_grad()
def plot_vae_figures(model: VAE, guide: Any, ds: Dataset, test: torch.Tensor, prefix: str) -> list[str]:
    """Samples from p(x), test reconstructions, and (for 2-D latents) the test posterior means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if ds.image_shape is not None:
        h, w = ds.image_shape
        samples = model.sample(64).reshape(8, 8, h, w).permute(0, 2, 1, 3).reshape(8 * h, 8 * w)
        x = test[:16]
        recon = model.decoder.mean(guide.distribution(x).sample())
        pairs = torch.stack([x, recon]).reshape(2, 16, h, w).permute(1, 2, 0, 3).reshape(16, h, 2 * w)
        pairs = pairs.reshape(4, 4, h, 2 * w).permute(0, 2, 1, 3).reshape(4 * h, 8 * w)
        for name, img in (("samples", samples), ("reconstructions", pairs)):
            fig, ax = plt.subplots(figsize=(5, 5))
            ax.imshow(img.numpy(), cmap="gray")
            ax.set_axis_off()
            ax.set_title("samples from p(x)" if name == "samples" else "test images | reconstructions")
            fig.savefig(f"{prefix}_{name}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            paths.append(f"{prefix}_{name}.png")
    if model.latent_dim == 2:
        z = guide.distribution(test).sample((32,)).mean(0)
        fig, ax = plt.subplots(figsize=(6, 5))
        labels = ds.labels.get("test")
        if labels is None:
            ax.scatter(z[:, 0], z[:, 1], s=4)
        else:
            fig.colorbar(ax.scatter(z[:, 0], z[:, 1], s=4, c=labels[: len(test)], cmap="tab10"), ax=ax, label="label")
        ax.set(xlabel="z1", ylabel="z2", title="posterior means of test points")
        fig.savefig(f"{prefix}_latent.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(f"{prefix}_latent.png")
    return paths


def parse_args(argv: Sequence[str] | None = None) -> VAEExperimentConfig:
    d = VAEExperimentConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.vae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--data-dir", default=None,
                   help="directory with binarized_mnist.npz (default: $PYRO_LVM_DATA_DIR, then ../shared/data)")
    p.add_argument("--guide", type=guide_list, default=d.guides, help="NAME[:K], or a comma-separated list")
    p.add_argument("--latent-dim", type=positive_int, default=d.latent_dim)
    p.add_argument("--hidden", type=int_tuple, default=d.hidden, help="decoder hidden sizes (encoder mirrors)")
    p.add_argument("--flow-hidden", type=int_tuple, default=d.flow_hidden)
    p.add_argument("--decoder", choices=["bernoulli", "gaussian"], default=None)
    p.add_argument("--architecture", choices=["mlp", "conv"], default=d.architecture)
    p.add_argument("--activation", choices=list(ACTIVATIONS), default=d.activation)
    p.add_argument("--prior", choices=PRIORS.names(), default=d.prior)
    p.add_argument("--epochs", type=positive_int, default=d.train.epochs)
    p.add_argument("--warmup-epochs", type=int, default=d.train.warmup_epochs)
    p.add_argument("--patience", type=positive_int, default=d.train.patience)
    p.add_argument("--batch-size", type=positive_int, default=d.train.batch_size)
    p.add_argument("--lr", type=float, default=d.train.lr)
    p.add_argument("--lr-final-factor", type=float, default=d.train.lr_final_factor,
                   help="learning rate decays exponentially to lr * this over the epochs")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in total")
    p.add_argument("--iwae-k", type=positive_int, default=d.iwae_k, help="5000 for the papers' protocol")
    p.add_argument("--test-subset", type=positive_int, default=None, help="evaluate on the first N test points")
    p.add_argument("--subset", type=positive_int, default=None, help="keep at most N points per split")
    p.add_argument("--from-checkpoints", default=None, metavar="DIR",
                   help="evaluate the best checkpoints of an earlier run (its --output DIR) instead of training")
    p.add_argument("--jit", action="store_true", help="JitTrace_ELBO (see README for the guides it supports)")
    add_common_args(p, default_output=d.output)
    a = p.parse_args(argv)
    train = dataclasses.replace(d.train, epochs=a.epochs, warmup_epochs=a.warmup_epochs, patience=a.patience,
                                batch_size=a.batch_size, lr=a.lr, lr_final_factor=a.lr_final_factor,
                                max_steps=a.max_steps, elbo="jit" if a.jit else "trace")
    return VAEExperimentConfig(dataset=a.dataset, data_dir=a.data_dir, guides=a.guide, latent_dim=a.latent_dim,
                               hidden=a.hidden, flow_hidden=a.flow_hidden, decoder=a.decoder,
                               architecture=a.architecture, activation=a.activation, prior=a.prior, train=train,
                               iwae_k=a.iwae_k,
                               test_subset=a.test_subset, subset=a.subset, from_checkpoints=a.from_checkpoints,
                               seed=a.seed, output=a.output,
                               quiet=a.quiet)


main = experiment_main(parse_args, run)


if __name__ == "__main__":
    sys.exit(run_main(main))
