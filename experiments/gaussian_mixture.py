"""Gaussian mixtures fitted by SVI with each global guide, against scikit-learn's EM.

    python -m experiments.gaussian_mixture --dataset iris --components 3 --covariance full \\
        --assignments collapsed --guide map,meanfield,fullrank,auto-iaf --seed 0 --output runs/gmm_iris

For each guide: several k-means++-seeded restarts (the best final training ELBO is kept), then the
held-out log-likelihood at the point estimate, the posterior predictive, and — with
``--assignments amortized`` — the ELBO and IWAE-K over the assignments and their gap to the exact
(enumerated) likelihood. scikit-learn's ``GaussianMixture`` (same K and covariance type, ``n_init=5``)
is the EM baseline row. Posterior draws of every non-point-mass guide are written for ArviZ.
"""

from __future__ import annotations

import argparse
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
from pyro_lvm.guides import GlobalGuide, GuideConfig, build_guide
from pyro_lvm.models import ASSIGNMENTS, COVARIANCES, GaussianMixture, GaussianMixtureConfig
from pyro_lvm.models.gaussian_mixture import component_order, reorder

from pyro_lvm.data import DataConfig, Dataset, load_dataset
from pyro_lvm.evaluate import EvalConfig, evaluate, public
from pyro_lvm.report import payload, plot_training_curves, write_results
from pyro_lvm.train import ELBOS, FitResult, TrainConfig, default_dtype, fit, set_seed

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

#: the experiment's dataset names -> registered loaders
DATASETS = {"iris": "iris", "wine": "wine", "digits-pca": "digits_pca", "synthetic": "synthetic_mixture"}


@dataclass
class GMMExperimentConfig:
    dataset: str = "iris"
    components: int = 3
    covariance: str = "full"
    assignments: str = "collapsed"
    guides: list[str] = field(default_factory=lambda: ["map"])
    #: k-means++-seeded fits per guide; the one with the best final training ELBO is kept
    restarts: int = 3
    #: hidden sizes of the amortized q(c|x) (``--assignments amortized``)
    encoder_hidden: tuple[int, ...] = (32,)
    #: ELBO estimator; ``None``: the assignment scheme's own (trace, traceenum, tracegraph)
    elbo: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1000, batch_size=None, lr=0.02, lr_final_factor=0.1, clip_norm=100.0, restore_best=False,
        checkpoint_every=250))
    iwae_k: int = 100
    posterior_samples: int = 200
    split: tuple[float, float, float] = (0.7, 0.0, 0.3)
    #: synthetic data: points, dimensions, least distance between means
    num_points: int = 1000
    data_dim: int = 2
    separation: float = 6.0
    seed: int = 0
    output: str = "runs/gaussian_mixture"
    quiet: bool = False


def sklearn_baseline(ds: Dataset, cfg: GMMExperimentConfig) -> dict[str, Any]:
    """EM with the same K and covariance type, best of 5 k-means inits, scored on test (nats per point)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SkGMM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SkGMM(cfg.components, covariance_type=cfg.covariance, n_init=5, max_iter=1000, tol=1e-6,
                    random_state=cfg.seed).fit(ds.train.numpy())
    return {"name": "sklearn.GaussianMixture(n_init=5)",
            "test": {"exact_log_likelihood": float(est.score(ds.test.numpy()))},
            "train_log_likelihood": float(est.score(ds.train.numpy()))}


def final_loss(fr: FitResult) -> float:
    """Mean training loss (−ELBO per point) over the last 5% of epochs: how restarts are compared."""
    return float(np.mean([h["train_loss"] for h in fr.history[-max(1, len(fr.history) // 20):]]))


def fit_with_restarts(cfg: GMMExperimentConfig, ds: Dataset, spec: str) -> tuple[GaussianMixture, GlobalGuide,
                                                                                   FitResult, list[FitResult]]:
    """Fit ``cfg.restarts`` times from different k-means++ seeds; keep the best final training ELBO.

    Returns the kept model, guide and fit, and every restart's fit (for its final loss and time).
    """
    best: tuple[GaussianMixture, GlobalGuide, FitResult] | None = None
    best_loss = math.inf
    fits: list[FitResult] = []
    tag = spec.replace(":", "_")
    for r in range(cfg.restarts):
        set_seed(cfg.seed + r)
        model = GaussianMixture(GaussianMixtureConfig(ds.data_dim, cfg.components, cfg.covariance, cfg.assignments))
        model.init_from_data(ds.train, seed=cfg.seed + r)
        guide = build_guide(spec, model, GuideConfig(hidden=cfg.encoder_hidden))
        train_cfg = dataclasses.replace(cfg.train, seed=cfg.seed + r, quiet=cfg.quiet,
                                        elbo=cfg.elbo or model.default_elbo,
                                        output=f"{cfg.output}/checkpoints/{tag}/restart{r}")
        fr = fit(model, guide, ds.train, ds.valid, train_cfg)
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


def write_posterior(guide: GlobalGuide, ds: Dataset, path: str, draws: int) -> dict[str, Any]:
    """Draws θ ~ q(θ), components ordered as θ̂'s, as ArviZ InferenceData (``.nc``); returns a summary."""
    import arviz as az

    with torch.no_grad():
        order = component_order(guide.point_estimate(ds.train))
        samples = [guide.sample_globals(ds.train) for _ in range(draws)]
        stacked = reorder({k: torch.stack([s[k] for s in samples]) for k in samples[0]}, order, batch_dims=1)
    idata = az.from_dict(posterior={k: v.numpy()[None] for k, v in stacked.items()})  # one chain
    idata.to_netcdf(path)
    summary = az.summary(idata, var_names=["weights", "locs"], kind="stats", round_to=4)
    return {"netcdf": path, "summary": summary.reset_index().to_dict(orient="records")}


@torch.no_grad()
def plot_clusters(model: GaussianMixture, guide: GlobalGuide, ds: Dataset, path: str, title: str) -> str:
    """Test points coloured by their responsibilities, with each component's 2-σ ellipse, in 2-D.

    2-D data are drawn as is; otherwise on the first two principal axes of the training data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    theta = guide.point_estimate(ds.train)
    theta = reorder(theta, component_order(theta))
    mean = ds.train.mean(0)
    if ds.data_dim == 2:
        proj, labels = torch.eye(2, dtype=ds.train.dtype), ("x1", "x2")
    else:
        proj, labels = torch.linalg.svd(ds.train - mean, full_matrices=False)[2][:2].T, ("PC1", "PC2")
    pts = [((x - mean) @ proj, model.responsibilities(x, theta)) for x in (ds.train, ds.test)]
    colors = plt.get_cmap("tab10")(np.arange(model.num_components) % 10)[:, :3]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
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
    plt.close(fig)
    return path


def run(cfg: GMMExperimentConfig) -> dict[str, Any]:
    """Fit every guide, evaluate on the test split, write results and figures; returns the payload."""
    with default_dtype(torch.float64):  # small data; float64 keeps the enumerated sums exact
        return _run(cfg)


def _run(cfg: GMMExperimentConfig) -> dict[str, Any]:
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    for registry, name in ((COVARIANCES, cfg.covariance), (ASSIGNMENTS, cfg.assignments), (ELBOS, cfg.elbo)):
        if name is not None and name not in registry:
            registry[name]  # noqa: B018 - raises UnknownNameError listing the valid names, before any work
    if cfg.components < 1 or cfg.restarts < 1:
        raise ValueError(f"--components and --restarts must be >= 1, got {cfg.components}, {cfg.restarts}")
    data_cfg = DataConfig(seed=cfg.seed, split=cfg.split, dtype=torch.float64, num_points=cfg.num_points,
                          data_dim=cfg.data_dim, num_components=cfg.components, separation=cfg.separation)
    ds = load_dataset(DATASETS[cfg.dataset], data_cfg)
    if len(ds.train) < cfg.components:
        raise ValueError(f"{cfg.dataset}: {len(ds.train)} training points cannot fit {cfg.components} components")
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    baseline = sklearn_baseline(ds, cfg)
    results, histories = [], {}
    for spec in cfg.guides:
        model, guide, fr, fits = fit_with_restarts(cfg, ds, spec)
        test = public(evaluate(model, guide, ds.test, EvalConfig(iwae_k=cfg.iwae_k,
                                                                  posterior_samples=cfg.posterior_samples)))
        tag = spec.replace(":", "_")
        row: dict[str, Any] = {"guide": spec, "test": test, "train_seconds": fr.train_seconds,
                               "seconds_per_epoch": fr.seconds_per_epoch, "epochs_run": len(fr.history),
                               "restart_final_losses": [final_loss(f) for f in fits],
                               "restart_seconds": [f.train_seconds for f in fits],
                               "components": component_summary(model, guide, ds)}
        if "truth" in ds.meta:
            row["recovery"] = recovery(model, guide, ds)
        if not guide.is_point_mass:
            row["posterior"] = write_posterior(guide, ds, f"{cfg.output}/{tag}_posterior.nc",
                                               cfg.posterior_samples)
        results.append(row)
        histories[spec] = fr.history
        plot_clusters(model, guide, ds, f"{cfg.output}/{tag}_clusters.png",
                      f"{cfg.dataset}: {spec}, {cfg.assignments}, {cfg.covariance} covariance")
        if not cfg.quiet:
            print(f"{spec:>12}: test log p(x|θ̂) {test['exact_log_likelihood']:.4f}  predictive "
                  f"{test['predictive_log_likelihood']:.4f}  ELBO {test['elbo']:.4f}  "
                  f"({fr.train_seconds:.1f}s)", file=sys.stderr)
    out = payload("gaussian_mixture", cfg.dataset, dataclasses.asdict(cfg), ds.sizes(), results, [baseline])
    write_results(cfg.output, out)
    plot_training_curves(histories, f"{cfg.output}/training_curves.png",
                         title=f"Gaussian mixture (K = {cfg.components}, {cfg.covariance}) on {cfg.dataset}")
    return out


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three fractions like 0.7,0,0.3, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions (train,valid,test), got {text!r}")
    return parts  # type: ignore[return-value]


def parse_args(argv: Sequence[str] | None = None) -> GMMExperimentConfig:
    d = GMMExperimentConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.gaussian_mixture", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), default=d.dataset)
    p.add_argument("--components", type=positive_int, default=d.components)
    p.add_argument("--covariance", choices=COVARIANCES.names(), default=d.covariance)
    p.add_argument("--assignments", choices=ASSIGNMENTS.names(), default=d.assignments)
    p.add_argument("--guide", type=guide_list, default=d.guides, help="global guide(s): map, meanfield, fullrank, "
                   "lowrank[:R], auto-iaf[:K]; comma-separated to compare")
    p.add_argument("--restarts", type=positive_int, default=d.restarts)
    p.add_argument("--encoder-hidden", type=int_tuple, default=d.encoder_hidden)
    p.add_argument("--elbo", choices=ELBOS.names(), default=None,
                   help="override the estimator (default: trace / traceenum / tracegraph by --assignments)")
    add_full_batch_train_args(p, d.train)
    p.add_argument("--iwae-k", type=positive_int, default=d.iwae_k)
    p.add_argument("--posterior-samples", type=positive_int, default=d.posterior_samples)
    p.add_argument("--split", type=_split, default=d.split, help="train,valid,test fractions (default 0.7,0,0.3)")
    p.add_argument("--num-points", type=positive_int, default=d.num_points, help="synthetic data only")
    p.add_argument("--data-dim", type=positive_int, default=d.data_dim, help="synthetic data only")
    p.add_argument("--separation", type=float, default=d.separation, help="synthetic data only")
    add_common_args(p, default_output=d.output)
    a = p.parse_args(argv)
    train = train_from_args(d.train, a)
    return GMMExperimentConfig(dataset=a.dataset, components=a.components, covariance=a.covariance,
                               assignments=a.assignments, guides=a.guide, restarts=a.restarts,
                               encoder_hidden=a.encoder_hidden, elbo=a.elbo, train=train, iwae_k=a.iwae_k,
                               posterior_samples=a.posterior_samples, split=a.split, num_points=a.num_points,
                               data_dim=a.data_dim, separation=a.separation, seed=a.seed, output=a.output,
                               quiet=a.quiet)


main = experiment_main(parse_args, run)


if __name__ == "__main__":
    sys.exit(run_main(main))
