r"""Gaussian mixtures fitted by SVI with each global guide, against scikit-learn's EM.

    python -m pyro_lvm.experiments.gaussian_mixture --dataset iris --components 3 --covariance full \
        --assignments collapsed --guide map,meanfield,fullrank,auto-iaf --seed 0 --output runs/gmm_iris

For each guide: several k-means++-seeded restarts (the best final training ELBO is kept), then on the test split
(:func:`pyro_lvm.evaluate.mixture_bounds`, each quantity named for what it is): the log-likelihood at the point
estimate, log p(x|θ̂); the posterior predictive under q(θ), log E_q(θ) p(x|θ), and the expected log-likelihood
E_q(θ) log p(x|θ); the ELBO and IWAE-K over the assignments (averaged over θ ~ q(θ)) and the gaps they leave against
their own target, E_q(θ) log p(x|θ) (non-zero only with ``--assignments amortized``). No "exact log p(x)" is
reported: with latent globals the held-out target log p(x | x_train) needs the true posterior over θ. How far q(θ) is
from that posterior is asked on the training split instead (:func:`pyro_lvm.evaluate.global_pareto_k`): the Pareto
k̂ and ESS of ``--theta-samples`` importance weights over θ, and the KL lower bound they give (none for ``map``,
a point mass). scikit-learn's ``GaussianMixture`` (same K and covariance type, ``n_init=5``) is the EM baseline row,
scored at its point estimate. Posterior draws of every non-point-mass guide are written for ArviZ.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_lvm.config import MAX_SEED, ConfigError, check_choice, check_config, check_split
from pyro_lvm.data import DataConfig, Dataset
from pyro_lvm.evaluate import MIN_PSIS_SAMPLES, global_pareto_k
from pyro_lvm.guides import GlobalGuide, GuideConfig, build_guide
from pyro_lvm.guides.registry import canonical_guide_specs
from pyro_lvm.harness import Experiment, ExperimentConfig, guide_tag, register_experiment
from pyro_lvm.models import ASSIGNMENTS, COVARIANCES, GaussianMixture, GaussianMixtureConfig
from pyro_lvm.models.base import LatentModel, ModelTraits
from pyro_lvm.models.gaussian_mixture import component_order, reorder
from pyro_lvm.report import new_figure
from pyro_lvm.runtime import seeded
from pyro_lvm.train import ELBOS, FitResult, TrainConfig, fit

from .cli import run_cli


@dataclass
class GMMExperimentConfig(ExperimentConfig):
    dataset: str = "iris"
    guides: tuple[str, ...] = ("map",)
    output: str = "runs/gaussian_mixture"
    iwae_k: int = 100
    #: K, the number of components
    components: int = 3
    #: diag or full component covariances
    covariance: str = "full"
    #: collapsed (summed out), enumerated (TraceEnum_ELBO) or amortized (a neural q(c|x))
    assignments: str = "collapsed"
    #: k-means++-seeded fits per guide; the one with the best final training ELBO is kept
    restarts: int = 3
    #: hidden sizes of the amortized q(c|x) (--assignments amortized)
    encoder_hidden: tuple[int, ...] = (32,)
    #: ELBO estimator; default: the assignment scheme's own (trace, traceenum, tracegraph)
    elbo: str | None = None
    #: draws θ ~ q(θ) for the posterior predictive and the ArviZ export
    posterior_samples: int = 200
    #: draws θ ~ q(θ) on the training split for the Pareto k̂ of q(θ) (global_pareto_k; at least 21)
    theta_samples: int = 1000
    #: train / valid / test fractions of the data
    split: tuple[float, ...] = (0.7, 0.0, 0.3)
    #: synthetic data: number of points
    num_points: int = 1000
    #: synthetic data: dimensions
    data_dim: int = 2
    #: synthetic data: least distance between two means
    separation: float = 6.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1000, batch_size=None, lr=0.02, lr_final_factor=0.1, clip_norm=100.0, restore_best=False,
        checkpoint_every=1, checkpoint_seconds=2.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(self, positive_int=("components", "restarts", "posterior_samples", "theta_samples", "num_points",
                                         "data_dim"), positive=("separation",), layers=("encoder_hidden",))
        self.encoder_hidden = tuple(self.encoder_hidden)
        check_choice(self, "covariance", COVARIANCES.names())
        check_choice(self, "assignments", ASSIGNMENTS.names())
        check_choice(self, "elbo", ELBOS.names())
        check_split(self)
        self.guides = canonical_guide_specs(self.guides)
        if self.seed + self.restarts - 1 > MAX_SEED:  # restart r runs under seed + r
            raise ConfigError("seed", f"restart {self.restarts - 1} would run under seed {self.seed} + "
                              f"{self.restarts - 1}, above {MAX_SEED}; use a seed of at most "
                              f"{MAX_SEED - self.restarts + 1}")
        if self.theta_samples < MIN_PSIS_SAMPLES:
            raise ConfigError("theta_samples", f"must be an integer >= {MIN_PSIS_SAMPLES} (the fewest draws PSIS fits "
                              f"a Pareto tail to), got {self.theta_samples}")


def sklearn_baseline(ds: Dataset, cfg: GMMExperimentConfig) -> dict[str, Any]:
    """EM with the same K and covariance type, best of 5 k-means inits, scored on test (nats per point)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SkGMM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SkGMM(cfg.components, covariance_type=cfg.covariance, n_init=5, max_iter=1000, tol=1e-6,
                    random_state=cfg.seed).fit(ds.train.double().numpy())
    return {"name": "sklearn.GaussianMixture(n_init=5)",
            "test": {"log_lik_at_point_estimate": float(est.score(ds.test.double().numpy()))},
            "train_log_likelihood": float(est.score(ds.train.double().numpy()))}


def final_loss(fr: FitResult) -> float:
    """Mean training loss (−ELBO per point) over the last 5% of epochs: how restarts are compared."""
    return float(np.mean([h["train_loss"] for h in fr.history[-max(1, len(fr.history) // 20):]]))


def build_mixture(cfg: GMMExperimentConfig, ds: Dataset, spec: str, restart: int) -> tuple[GaussianMixture,
                                                                                        GlobalGuide]:
    """Restart ``restart``'s model (k-means++ seeded by ``seed + restart``) and guide, each from that seed."""
    seed = cfg.seed + restart
    with seeded(seed):
        model = GaussianMixture(GaussianMixtureConfig(ds.data_dim, cfg.components, cfg.covariance, cfg.assignments))
        model.init_from_data(ds.train, seed=seed)
        return model, build_guide(spec, model, GuideConfig(hidden=cfg.encoder_hidden))


def fit_with_restarts(cfg: GMMExperimentConfig, ds: Dataset, spec: str,
                      first: tuple[GaussianMixture, GlobalGuide] | None = None, train_cfg: TrainConfig | None = None
                      ) -> tuple[GaussianMixture, GlobalGuide, FitResult, list[FitResult]]:
    """Fit ``cfg.restarts`` times from different k-means++ seeds (``first``, if given, is restart 0); keep the
    best final training ELBO. Returns the kept model, guide and fit, and every restart's fit (for its final loss
    and time). ``train_cfg`` defaults to ``cfg.train`` with the run's seed and estimator, no checkpoints."""
    train_cfg = train_cfg or dataclasses.replace(cfg.train, seed=cfg.seed, quiet=True, elbo=cfg.elbo)
    best: tuple[GaussianMixture, GlobalGuide, FitResult] | None = None
    best_loss = math.inf
    fits: list[FitResult] = []
    for r in range(cfg.restarts):
        model, guide = first if r == 0 and first is not None else build_mixture(cfg, ds, spec, r)
        fr = fit(model, guide, ds.train, ds.valid, dataclasses.replace(
            train_cfg, seed=cfg.seed + r, output=f"{train_cfg.output}/restart{r}" if train_cfg.output else None))
        fits.append(fr)
        loss = final_loss(fr)
        if best is None or loss < best_loss:
            best, best_loss = (model, guide, fr), loss
    assert best is not None
    return (*best, fits)


@torch.no_grad()
def component_summary(model: GaussianMixture, guide: GlobalGuide, ds: Dataset) -> dict[str, Any]:
    """θ̂ ordered by weight, each component's effective size Σ_n p(c_n=k|x_n) on train, and a collapse check.

    A component counts as collapsed when fewer than one training point's worth of responsibility
    falls on it, or when its smallest standard deviation is below 1% of the data's smallest one.
    """
    theta = guide.point_estimate(ds.train)
    theta = reorder(theta, component_order(theta))
    resp = model.responsibilities(ds.train, theta)
    effective = resp.sum(0)
    cov = model.component_covariances(theta)
    min_sd = torch.linalg.eigvalsh(cov)[..., 0].clamp_min(0).sqrt()  # (K,)
    floor = 0.01 * ds.train.std(0).min()
    collapsed = int(((effective < 1.0) | (min_sd < floor)).sum())
    return {"weights": theta["weights"].tolist(), "locs": theta["locs"].tolist(),
            "effective_points": effective.tolist(), "min_std": min_sd.tolist(), "collapsed_components": collapsed}


def recovery(model: GaussianMixture, guide: GlobalGuide, ds: Dataset) -> dict[str, Any]:
    """Fitted vs true means after matching labels (Hungarian), in units of each mean's standard error.

    The MLE of a well-separated component's mean has covariance Σ_k / n_k, so each coordinate's error
    divided by sqrt(Σ_k,dd / n_k) is about N(0, 1); ``max_standardized_error`` is the worst of K·D.
    """
    from scipy.optimize import linear_sum_assignment

    truth = ds.meta["truth"]
    theta = guide.point_estimate(ds.train)
    dist = torch.cdist(theta["locs"], truth["locs"].to(theta["locs"]))
    rows, cols = linear_sum_assignment(dist.numpy())
    n_k = torch.bincount(ds.labels["train"], minlength=len(truth["weights"])).to(theta["locs"])
    se = (truth["covariances"].diagonal(dim1=-2, dim2=-1).to(theta["locs"]) / n_k[:, None]).sqrt()  # (K, D)
    err = (theta["locs"][rows] - truth["locs"][cols].to(theta["locs"])) / se[cols]
    return {"matching": cols.tolist(), "max_abs_error": float((theta["locs"][rows] - truth["locs"][cols]).abs().max()),
            "max_standardized_error": float(err.abs().max()),
            "weights_abs_error": float((theta["weights"][rows] - truth["weights"][cols]).abs().max())}


def write_posterior(guide: GlobalGuide, ds: Dataset, path: str, draws: int, seed: int | None = None) -> dict[str, Any]:
    """Draws θ ~ q(θ), components ordered as θ̂'s, as ArviZ InferenceData (``.nc``); returns a summary. ``seed`` fixes
    the draws (the caller's RNG states are restored afterwards; ``None``: drawn from the caller's RNG), and the file
    carries no creation time, so one seed writes the same bytes."""
    import arviz as az

    from pyro_lvm.posterior_report import write_netcdf

    with torch.no_grad(), seeded(seed):
        order = component_order(guide.point_estimate(ds.train))
        samples = [guide.sample_globals(ds.train) for _ in range(draws)]
        stacked = reorder({k: torch.stack([s[k] for s in samples]) for k in samples[0]}, order, batch_dims=1)
    idata = az.from_dict(posterior={k: v.numpy()[None] for k, v in stacked.items()})  # one chain
    for group in idata.groups():  # ArviZ stamps each group with the wall-clock time
        getattr(idata, group).attrs.pop("created_at", None)
    write_netcdf(idata, path)  # atomic: a killed run leaves the old file or the new one
    summary = az.summary(idata, var_names=["weights", "locs"], kind="stats", round_to=4)
    return {"netcdf": path, "summary": summary.reset_index().to_dict(orient="records")}


@torch.no_grad()
def plot_clusters(model: GaussianMixture, guide: GlobalGuide, ds: Dataset, path: str, title: str) -> str:
    """Test points coloured by their responsibilities, with each component's 2-σ ellipse, in 2-D.

    2-D data are drawn as is; otherwise on the first two principal axes of the training data.
    """
    import matplotlib
    from matplotlib.patches import Ellipse

    theta = guide.point_estimate(ds.train)
    theta = reorder(theta, component_order(theta))
    mean = ds.train.mean(0)
    if ds.data_dim == 2:
        proj, labels = torch.eye(2, dtype=ds.train.dtype), ("x1", "x2")
    else:
        proj, labels = torch.linalg.svd(ds.train - mean, full_matrices=False)[2][:2].T, ("PC1", "PC2")
    pts = [((x - mean) @ proj, model.responsibilities(x, theta)) for x in (ds.train, ds.test)]
    colors = matplotlib.colormaps["tab10"](np.arange(model.num_components) % 10)[:, :3]
    fig, ax = new_figure(figsize=(6.5, 5.5))
    for (xy, resp), marker, alpha in zip(pts, ("o", "^"), (0.25, 0.9), strict=True):
        ax.scatter(xy[:, 0], xy[:, 1], c=np.clip(resp.numpy() @ colors, 0, 1), s=14, marker=marker, alpha=alpha,
                   edgecolors="none")
    cov = proj.T @ model.component_covariances(theta) @ proj  # (K, 2, 2)
    locs = (theta["locs"] - mean) @ proj
    for k in range(model.num_components):
        vals, vecs = torch.linalg.eigh(cov[k])
        angle = math.degrees(math.atan2(vecs[1, 1], vecs[0, 1]))
        w, h = (2 * 2 * vals.clamp_min(0).sqrt()).flip(0).tolist()
        ax.add_patch(Ellipse(locs[k].tolist(), w, h, angle=angle, fill=False, lw=2, color=colors[k]))
        ax.annotate(f"{k}: π={theta['weights'][k]:.2f}", locs[k].tolist(), fontsize=8, color="k")
    ax.set(xlabel=labels[0], ylabel=labels[1], title=title)
    ax.text(0.01, 0.01, "circles: train, triangles: test; colour = responsibilities; ellipses: 2σ",
            transform=ax.transAxes, fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


@register_experiment("gaussian_mixture")
class GaussianMixtureExperiment(Experiment):
    Config = GMMExperimentConfig
    required_tags = frozenset({"continuous"})
    dtype = torch.float64  # small data; float64 keeps the enumerated sums exact
    summary = "Gaussian mixtures: collapsed / enumerated / amortized assignments, global guides, against EM"
    in_memory_because = "its scikit-learn EM baseline and its initialisation read the whole training split"
    choices = {"covariance": COVARIANCES.names, "assignments": ASSIGNMENTS.names, "elbo": ELBOS.names}

    def model_traits(self, cfg: GMMExperimentConfig) -> ModelTraits:
        return GaussianMixture.traits_for(GaussianMixtureConfig(1, cfg.components, cfg.covariance, cfg.assignments))

    def estimator(self, cfg: GMMExperimentConfig) -> str | None:
        return cfg.elbo

    def data_config(self, cfg: GMMExperimentConfig) -> DataConfig:
        return DataConfig(seed=cfg.seed, split=tuple(cfg.split), dtype=torch.float64, num_points=cfg.num_points,
                          data_dim=cfg.data_dim, num_components=cfg.components, separation=cfg.separation)

    def check_data(self, cfg: GMMExperimentConfig, ds: Dataset) -> None:
        if len(ds.train) < cfg.components:
            raise ConfigError("components", f"{len(ds.train)} training points cannot fit {cfg.components} "
                              "components; use fewer components or more data")

    def baselines(self, cfg: GMMExperimentConfig, ds: Dataset) -> list[dict[str, Any]]:
        return [sklearn_baseline(ds, cfg)]

    def build(self, cfg: GMMExperimentConfig, ds: Dataset, spec: str, seed: int) -> tuple[LatentModel, Any]:
        return build_mixture(cfg, ds, spec, seed - cfg.seed)

    def train_config(self, cfg: GMMExperimentConfig, spec: str, output: str) -> TrainConfig:
        return dataclasses.replace(super().train_config(cfg, spec, output), elbo=cfg.elbo)

    def fit(self, cfg: GMMExperimentConfig, ds: Dataset, spec: str, model: LatentModel, guide: Any,
            train_cfg: TrainConfig) -> tuple[LatentModel, Any, FitResult]:
        model, guide, fr, fits = fit_with_restarts(cfg, ds, spec, (model, guide), train_cfg)
        fr.restarts = fits
        return model, guide, fr

    def eval_config(self, cfg: GMMExperimentConfig) -> Any:
        return dataclasses.replace(super().eval_config(cfg), posterior_samples=cfg.posterior_samples)

    def extras(self, cfg: GMMExperimentConfig, ds: Dataset, spec: str, model: LatentModel, guide: Any,
               fr: FitResult) -> dict[str, Any]:
        fits = fr.restarts or [fr]
        row: dict[str, Any] = {"restart_final_losses": [final_loss(f) for f in fits if f.history],
                               "restart_seconds": [f.train_seconds for f in fits],
                               "components": component_summary(model, guide, ds)}
        if "truth" in ds.meta and "locs" in ds.meta["truth"]:
            row["recovery"] = recovery(model, guide, ds)
        if not guide.is_point_mass:
            row["posterior"] = write_posterior(guide, ds, str(Path(cfg.output) / f"{guide_tag(spec)}_posterior.nc"),
                                               cfg.posterior_samples, seed=cfg.seed)
        # q(θ) against the posterior it approximates, p(θ | x_train); the row's "test" entries join the table's columns
        row["global_pareto_k"] = k = global_pareto_k(model, guide, ds.train, num_samples=cfg.theta_samples,
                                                     seed=cfg.seed)
        kl = None if k["elbo_theta"] is None else (k["iwae_theta"] - k["elbo_theta"]) / k["num_points"]
        row["test"] = {"pareto_k_theta": k["pareto_k_theta"], "ess_theta": k["ess_theta"], "kl_theta_lower_bound": kl}
        return row

    def describe(self, row: dict[str, Any]) -> str:
        t = row["test"]
        k = "—" if t.get("pareto_k_theta") is None else f"{t['pareto_k_theta']:.2f}"
        return (f"{row['guide']:>12}: test log p(x|θ̂) {t['log_lik_at_point_estimate']:.4f}  predictive "
                f"{t['predictive_log_likelihood']:.4f}  ELBO {t['elbo']:.4f}  train k̂ q(θ) {k}")

    def guide_figures(self, cfg: GMMExperimentConfig, ds: Dataset, spec: str, model: LatentModel, guide: Any,
                      prefix: str) -> None:
        plot_clusters(model, guide, ds, f"{prefix}_clusters.png",
                      f"{ds.name}: {spec}, {cfg.assignments}, {cfg.covariance} covariance")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(GaussianMixtureExperiment(), argv)


if __name__ == "__main__":
    sys.exit(main())
