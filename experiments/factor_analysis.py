r"""Factor analysis (or PPCA) fitted by SVI with each guide, against the exact answer and scikit-learn.

    python -m pyro_lvm.experiments.factor_analysis --dataset breast_cancer --latent-dim 5 \
        --guide exact,amortized,amortized-fullcov --seed 0 --output runs/fa
    python -m pyro_lvm.experiments.factor_analysis --data my.csv --latent-dim 3 --guide exact,amortized

``--fix-model sklearn`` holds the model at scikit-learn's EM solution and trains only the guide, so
each guide's gap log p(x) − ELBO can be set beside the analytic mean-field gap. scikit-learn's W has
WᵀΨ⁻¹W diagonal, so its posterior factorises and that gap is 0; ``--fix-model sklearn-rotated`` holds
it at W R for a random rotation R instead: the same p(x), a correlated posterior, a non-zero gap.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pyro_lvm.config import ConfigError, check_choice, check_config, check_split
from pyro_lvm.data import DataConfig, Dataset
from pyro_lvm.guides import GuideConfig
from pyro_lvm.harness import Experiment, ExperimentConfig, register_experiment
from pyro_lvm.models import MODELS, FactorAnalysis
from pyro_lvm.models.base import LatentModel, ModelTraits
from pyro_lvm.registry import Registry
from pyro_lvm.train import TrainConfig

from .cli import run_cli

#: models this experiment fits (factor analysis and its isotropic special case)
FA_MODELS = ("factor_analysis", "ppca")


def sklearn_baseline(model_name: str, ds: Dataset, latent_dim: int, seed: int,
                     max_iter: int = 10_000) -> tuple[dict[str, Any], Any]:
    """scikit-learn's maximum-likelihood fit on the train split, scored on test (mean nats per point)."""
    from sklearn.decomposition import PCA
    from sklearn.decomposition import FactorAnalysis as SkFA
    from sklearn.exceptions import ConvergenceWarning

    train, test = ds.train.double().numpy(), ds.test.double().numpy()
    if model_name == "ppca":
        est = PCA(latent_dim, random_state=seed).fit(train)
        name = "sklearn.PCA (PPCA MLE)"
    else:
        with warnings.catch_warnings():  # EM to tight tolerance; its residual is far below our 0.5% target
            warnings.simplefilter("ignore", ConvergenceWarning)
            # exact SVD: on these small matrices LAPACK is 2-3x faster per EM step than the randomized default
            est = SkFA(latent_dim, random_state=seed, max_iter=max_iter, tol=1e-6, svd_method="lapack").fit(train)
        name = "sklearn.FactorAnalysis"
    return {"name": name, "test": {"exact_log_likelihood": float(est.score(test))}}, est


def set_to_sklearn(model: FactorAnalysis, est: Any) -> None:
    """Hold the model at scikit-learn's fit (FactorAnalysis, or PCA read as the PPCA MLE)."""
    if np.ndim(est.noise_variance_) == 1:
        W = est.components_.T
    else:  # PCA: W = U (Λ − σ²I)^½, Tipping & Bishop (1999)
        W = est.components_.T * np.sqrt(np.maximum(est.explained_variance_ - est.noise_variance_, 0.0))
    model.set_parameters(W, est.mean_, est.noise_variance_)


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


@dataclass
class FAExperimentConfig(ExperimentConfig):
    dataset: str = "breast_cancer"
    guides: tuple[str, ...] = ("exact", "amortized", "amortized-fullcov")
    output: str = "runs/factor_analysis"
    #: factor_analysis or ppca
    model: str = "factor_analysis"
    #: k, the number of factors
    latent_dim: int = 5
    #: encoder hidden sizes; empty = a linear encoder, enough for FA whose exact posterior mean is linear in x
    encoder_hidden: tuple[int, ...] = ()
    #: hold the model at scikit-learn's solution (sklearn) or it rotated (sklearn-rotated); train only the guide
    fix_model: str | None = None
    #: end on the state with the best validation ELBO (best) or the last iterate (last)
    keep: str = "best"
    #: ELBO estimator: trace or meanfield (analytic KL)
    elbo: str = "trace"
    #: EM iterations of the scikit-learn baseline at most (it stops earlier at a relative change of 1e-6)
    sklearn_max_iter: int = 10_000
    #: train / valid / test fractions of the data
    split: tuple[float, ...] = (0.6, 0.2, 0.2)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=3000, batch_size=None, lr=0.02, lr_final_factor=0.05, num_particles=4, clip_norm=100.0,
        eval_every=50, checkpoint_every=1, checkpoint_seconds=2.0, restore_best=True))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_hidden = tuple(self.encoder_hidden)
        check_config(self, positive_int=("latent_dim", "sklearn_max_iter"), layers=("encoder_hidden",))
        check_choice(self, "model", FA_MODELS)
        check_choice(self, "fix_model", FIXED_MODELS.names())
        check_choice(self, "keep", ("best", "last"))
        check_choice(self, "elbo", ("trace", "meanfield"))
        check_split(self)


@register_experiment("factor_analysis")
class FactorAnalysisExperiment(Experiment):
    Config = FAExperimentConfig
    required_tags = frozenset({"continuous"})
    dtype = torch.float64  # small data; float64 makes the closed forms exact to ~1e-12
    summary = "factor analysis / PPCA: every guide against the exact log p(x) and scikit-learn"
    in_memory_because = "its scikit-learn baseline and data-based initialisation read the whole training split"
    choices = {"model": lambda: list(FA_MODELS), "fix_model": FIXED_MODELS.names, "keep": lambda: ["best", "last"],
               "elbo": lambda: ["trace", "meanfield"]}

    def model_traits(self, cfg: FAExperimentConfig) -> ModelTraits:
        cls = MODELS[cfg.model]
        return cls.traits_for(cls.Config(max(cfg.latent_dim, 1), cfg.latent_dim))

    def estimator(self, cfg: FAExperimentConfig) -> str:
        return cfg.elbo

    def data_config(self, cfg: FAExperimentConfig) -> DataConfig:
        return DataConfig(seed=cfg.seed, split=tuple(cfg.split), dtype=torch.float64, latent_dim=cfg.latent_dim)

    def check_data(self, cfg: FAExperimentConfig, ds: Dataset) -> None:
        if not 1 <= cfg.latent_dim < ds.data_dim:
            raise ConfigError("latent_dim", f"must be between 1 and {ds.data_dim - 1} for data with "
                              f"{ds.data_dim} features, got {cfg.latent_dim}")

    def baselines(self, cfg: FAExperimentConfig, ds: Dataset) -> list[dict[str, Any]]:
        row, est = sklearn_baseline(cfg.model, ds, cfg.latent_dim, cfg.seed, cfg.sklearn_max_iter)
        ds.meta["sklearn_estimate"] = est  # --fix-model holds each guide's model there
        return [row]

    def build_model(self, cfg: FAExperimentConfig, ds: Dataset) -> LatentModel:
        cls = MODELS[cfg.model]
        model = cls(cls.Config(ds.data_dim, cfg.latent_dim))
        model.init_from_data(ds.train)
        if cfg.fix_model:
            FIXED_MODELS[cfg.fix_model](model, ds.meta["sklearn_estimate"], cfg.seed)
        return model

    def guide_config(self, cfg: FAExperimentConfig) -> GuideConfig:
        return GuideConfig(hidden=cfg.encoder_hidden)

    def train_config(self, cfg: FAExperimentConfig, spec: str, output: str) -> TrainConfig:
        return dataclasses.replace(super().train_config(cfg, spec, output), train_model=not cfg.fix_model,
                                   elbo=cfg.elbo, restore_best=cfg.keep == "best")

    def extras(self, cfg: FAExperimentConfig, ds: Dataset, spec: str, model: LatentModel, guide: Any,
               fr: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(model, FactorAnalysis):  # the fitted model's own: 0 once WᵀΨ⁻¹W is diagonal
            out["test"] = {"analytic_mean_field_gap": model.mean_field_gap()}
        truth = ds.meta.get("truth")
        if truth is not None and "cov" in truth:
            with torch.no_grad():
                cov = model.marginal().covariance_matrix.cpu()
                true = torch.as_tensor(truth["cov"]).to(cov)
                out["recovery"] = {"cov_relative_error": float((cov - true).norm() / true.norm())}
        return out

    def describe(self, row: dict[str, Any]) -> str:
        t = row["test"]
        return (f"{row['guide']:>20}: ELBO {t['elbo']:.3f}  IWAE-{t['iwae_k']} {t['iwae']:.3f}  "
                f"exact {t['exact_log_likelihood']:.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(FactorAnalysisExperiment(), argv)


if __name__ == "__main__":
    sys.exit(main())
