"""Factor analysis (or PPCA) fitted by SVI with each guide, against the exact answer and scikit-learn.

    python -m experiments.factor_analysis --dataset breast_cancer --latent-dim 5 \
        --guide exact,amortized,amortized-fullcov --seed 0 --output runs/fa

``--fix-model sklearn`` holds the model at scikit-learn's EM solution and trains only the guide, so
each guide's gap log p(x) − ELBO can be set beside the analytic mean-field gap. scikit-learn's W has
WᵀΨ⁻¹W diagonal, so its posterior factorises and that gap is 0; ``--fix-model sklearn-rotated`` holds
it at W R for a random rotation R instead: the same p(x), a correlated posterior, a non-zero gap.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import MODELS, FactorAnalysis

from pyro_lvm.data import DataConfig, Dataset, load_dataset
from pyro_lvm.evaluate import EvalConfig, evaluate, public
from pyro_lvm.registry import Registry
from pyro_lvm.report import payload, plot_training_curves, write_results
from pyro_lvm.train import TrainConfig, default_dtype, fit, set_seed

from .cli import (
    add_common_args,
    add_full_batch_train_args,
    experiment_main,
    guide_list,
    int_tuple,
    positive_int,
    run_main,
    train_from_args,
)

DATASETS = ("breast_cancer", "wine", "digits", "iris", "synthetic")


@dataclass
class FAExperimentConfig:
    dataset: str = "breast_cancer"
    model: str = "factor_analysis"
    latent_dim: int = 5
    guides: list[str] = field(default_factory=lambda: ["exact", "amortized", "amortized-fullcov"])
    #: encoder hidden sizes; () = linear encoder, enough for FA whose exact posterior mean is linear in x
    encoder_hidden: tuple[int, ...] = ()
    #: a name in FIXED_MODELS: hold the model there and train only the guide (``None``: train both)
    fix_model: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=3000, batch_size=None, lr=0.02, lr_final_factor=0.05, num_particles=4, clip_norm=100.0,
        eval_every=50, checkpoint_every=100, restore_best=True))
    iwae_k: int = 1000
    seed: int = 0
    output: str = "runs/factor_analysis"
    quiet: bool = False
    data: DataConfig = field(default_factory=lambda: DataConfig(dtype=torch.float64))


def sklearn_baseline(model_name: str, ds: Dataset, latent_dim: int, seed: int) -> tuple[dict[str, Any], Any]:
    """scikit-learn's maximum-likelihood fit on the train split, scored on test (mean nats per point)."""
    from sklearn.decomposition import PCA
    from sklearn.decomposition import FactorAnalysis as SkFA
    from sklearn.exceptions import ConvergenceWarning

    train, test = ds.train.numpy(), ds.test.numpy()
    if model_name == "ppca":
        est = PCA(latent_dim, random_state=seed).fit(train)
        name = "sklearn.PCA (PPCA MLE)"
    else:
        with warnings.catch_warnings():  # EM to tight tolerance; its residual is far below our 0.5% target
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = SkFA(latent_dim, random_state=seed, max_iter=10_000, tol=1e-6).fit(train)
        name = "sklearn.FactorAnalysis"
    return {"name": name, "test": {"exact_log_likelihood": float(est.score(test))}}, est


def set_to_sklearn(model: FactorAnalysis, est: Any) -> None:
    """Hold the model at scikit-learn's fit (FactorAnalysis, or PCA read as the PPCA MLE)."""
    if np.ndim(est.noise_variance_) == 1:
        W = est.components_.T
    else:  # PCA: W = U (Λ − σ²I)^½, Tipping & Bishop (1999)
        W = est.components_.T * np.sqrt(np.maximum(est.explained_variance_ - est.noise_variance_, 0.0))
    model.set_parameters(torch.as_tensor(W), torch.as_tensor(est.mean_), torch.as_tensor(est.noise_variance_))


#: --fix-model NAME -> how to set the held-fixed model from scikit-learn's estimate (model, estimate, seed)
FIXED_MODELS: Registry[Callable[[FactorAnalysis, Any, int], None]] = Registry("fixed model")


@FIXED_MODELS.register("sklearn")
def at_sklearn(model: FactorAnalysis, est: Any, seed: int) -> None:
    set_to_sklearn(model, est)


@FIXED_MODELS.register("sklearn-rotated")
def at_sklearn_rotated(model: FactorAnalysis, est: Any, seed: int) -> None:
    """EM's solution turned by a random rotation R (seeded): W R gives the same p(x), a correlated p(z|x)."""
    set_to_sklearn(model, est)
    q, r = torch.linalg.qr(torch.randn(model.latent_dim, model.latent_dim,
                                       generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    model.rotate(q * torch.sign(torch.diagonal(r)))  # a Haar-distributed orthogonal matrix


def run(cfg: FAExperimentConfig) -> dict[str, Any]:
    """Fit every guide, evaluate on the test split, write results; returns the results payload."""
    with default_dtype(torch.float64):  # small data; float64 makes the closed forms exact to ~1e-12
        return _run(cfg)


def _run(cfg: FAExperimentConfig) -> dict[str, Any]:
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    fix_model = FIXED_MODELS[cfg.fix_model] if cfg.fix_model else None  # an unknown name fails here, listing them
    data_cfg = dataclasses.replace(cfg.data, seed=cfg.seed, dtype=torch.float64)
    ds = load_dataset(cfg.dataset, data_cfg)
    if not 1 <= cfg.latent_dim < ds.data_dim:
        raise ValueError(f"--latent-dim must be between 1 and {ds.data_dim - 1} for {cfg.dataset}, "
                         f"got {cfg.latent_dim}")
    baseline, est = sklearn_baseline(cfg.model, ds, cfg.latent_dim, cfg.seed)
    model_cls = MODELS[cfg.model]
    results, histories = [], {}
    for spec in cfg.guides:
        set_seed(cfg.seed)
        model = model_cls(model_cls.Config(ds.data_dim, cfg.latent_dim))
        model.init_from_data(ds.train)
        if fix_model:
            fix_model(model, est, cfg.seed)
        guide = build_guide(spec, model, GuideConfig(hidden=cfg.encoder_hidden))
        train_cfg = dataclasses.replace(cfg.train, seed=cfg.seed, quiet=cfg.quiet, train_model=not cfg.fix_model,
                                        output=f"{cfg.output}/checkpoints/{spec.replace(':', '_')}")
        fr = fit(model, guide, ds.train, ds.valid, train_cfg)
        test = public(evaluate(model, guide, ds.test, EvalConfig(iwae_k=cfg.iwae_k)))
        if isinstance(model, FactorAnalysis):  # the fitted model's own: 0 once WᵀΨ⁻¹W is diagonal
            test["analytic_mean_field_gap"] = model.mean_field_gap()
        row: dict[str, Any] = {"guide": spec, "test": test, "train_seconds": fr.train_seconds,
                               "seconds_per_epoch": fr.seconds_per_epoch, "best_epoch": fr.best_epoch,
                               "epochs_run": len(fr.history)}
        if "truth" in ds.meta:
            with torch.no_grad():
                cov = model.marginal().covariance_matrix
                true = ds.meta["truth"]["cov"]
                row["recovery"] = {"cov_relative_error": float((cov - true).norm() / true.norm())}
        results.append(row)
        histories[spec] = fr.history
        if not cfg.quiet:
            t = test
            print(f"{spec:>20}: ELBO {t['elbo']:.3f}  IWAE-{t['iwae_k']} {t['iwae']:.3f}  "
                  f"exact {t['exact_log_likelihood']:.3f}  ({fr.train_seconds:.1f}s)", file=sys.stderr)
    config = dataclasses.asdict(cfg) | {"data": {**dataclasses.asdict(data_cfg), "dtype": "float64"}}
    out = payload("factor_analysis", cfg.dataset, config, ds.sizes(), results, [baseline])
    write_results(cfg.output, out)
    plot_training_curves(histories, f"{cfg.output}/training_curves.png",
                         title=f"{cfg.model} on {cfg.dataset}, k = {cfg.latent_dim}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> FAExperimentConfig:
    d = FAExperimentConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.factor_analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--model", choices=["factor_analysis", "ppca"], default=d.model)
    p.add_argument("--latent-dim", type=positive_int, default=d.latent_dim)
    p.add_argument("--guide", type=guide_list, default=d.guides, help="guide name or comma-separated list")
    p.add_argument("--encoder-hidden", type=int_tuple, default=d.encoder_hidden,
                   help="encoder hidden sizes, e.g. 64,64; empty = linear (default)")
    p.add_argument("--fix-model", choices=FIXED_MODELS.names(), default=None,
                   help="hold the model at scikit-learn's solution (or it rotated) and train only the guide")
    add_full_batch_train_args(p, d.train)
    p.add_argument("--elbo", choices=["trace", "meanfield"], default="trace")
    p.add_argument("--keep", choices=["best", "last"], default="best",
                   help="end on the state with the best validation ELBO (checked every 50 epochs) or the last one")
    p.add_argument("--iwae-k", type=positive_int, default=d.iwae_k)
    add_common_args(p, default_output=d.output)
    a = p.parse_args(argv)
    train = train_from_args(d.train, a, elbo=a.elbo, restore_best=a.keep == "best")
    return FAExperimentConfig(dataset=a.dataset, model=a.model, latent_dim=a.latent_dim, guides=a.guide,
                              encoder_hidden=a.encoder_hidden, fix_model=a.fix_model, train=train,
                              iwae_k=a.iwae_k, seed=a.seed, output=a.output, quiet=a.quiet)


main = experiment_main(parse_args, run)


if __name__ == "__main__":
    sys.exit(run_main(main))
