r"""Variational posteriors over global latents against a NUTS reference, on identifiable quantities.

    python -m pyro_lvm.experiments.compare_posteriors --model bayesian_fa --dataset wine --latent-dim 2 \
        --guide map,meanfield,fullrank,lowrank:2,auto-iaf --seed 0 --output runs/compare_fa
    python -m pyro_lvm.experiments.compare_posteriors --model gaussian_mixture --dataset synthetic_mixture \
        --components 3 --guide map,meanfield,fullrank,lowrank:2,auto-iaf --output runs/compare_gmm

NUTS (``pyro_lvm.reference.nuts_reference``) runs once on the training split and is kept as ``DIR/nuts.nc``; a
re-run with the same model, data, seed and NUTS settings reuses it. Each global guide is fitted by SVI, then
θ_s ~ q(θ) are scored against the NUTS draws on the model family's identifiable quantities (Bayesian FA: μ, Ψ
and C = W Wᵀ + Ψ, since W is identifiable only up to rotation; the mixture: weights, means and covariances,
every draw relabelled to NUTS's labelling): for each scalar, z = (mean_q − mean_NUTS) / sd_NUTS and the sd
ratio sd_q / sd_NUTS. Beside them: each guide's PSIS k̂ of its joint weights over θ on the training data
(log p(x_train, θ_s) − log q(θ_s)), NUTS's largest r̂ and smallest ESS, the usual held-out table, and
``DIR/forest.png``, a forest plot of NUTS and every guide side by side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_lvm.config import ConfigError, check_choice, check_config, check_split, to_dict
from pyro_lvm.data import DataConfig, Dataset, sha256_arrays
from pyro_lvm.guides import check_guide
from pyro_lvm.harness import Experiment, ExperimentConfig, guide_tag, register_experiment, source_name
from pyro_lvm.models import COVARIANCES, GaussianMixture, GaussianMixtureConfig
from pyro_lvm.models.base import LatentModel, ModelTraits
from pyro_lvm.models.bayesian_fa import BayesianFAConfig, BayesianFactorAnalysis
from pyro_lvm.registry import Registry
from pyro_lvm.report import atomic_write_text, new_figure, results_table
from pyro_lvm.runtime import seeded
from pyro_lvm.train import TrainConfig

from .cli import run_cli

#: the NUTS reference's file in the output directory
NUTS_FILE = "nuts.nc"


@dataclass(frozen=True)
class ComparedModel:
    """A model family this experiment compares: how to build it from the config."""

    #: the config -> the model's traits (no data needed)
    traits: Callable[[Any], ModelTraits]
    #: (config, data) -> a model with its priors set from the training split and its start values
    build: Callable[[Any, Dataset], LatentModel]
    #: (config, data) -> raises ConfigError where the config does not fit the data
    check_data: Callable[[Any, Dataset], None]
    #: the config -> what the results call this model, e.g. "bayesian_fa (k = 2)"
    label: Callable[[Any], str]


#: --model NAME -> how to build it
COMPARED: Registry[ComparedModel] = Registry("compared model")


def _build_fa(cfg: Any, ds: Dataset) -> LatentModel:
    model = BayesianFactorAnalysis(BayesianFAConfig(ds.data_dim, cfg.latent_dim))
    model.init_from_data(ds.train)
    return model


def _build_mixture(cfg: Any, ds: Dataset) -> LatentModel:
    # c summed out: NUTS needs continuous latents, and every global guide then sees the same posterior over θ
    model = GaussianMixture(GaussianMixtureConfig(ds.data_dim, cfg.components, cfg.covariance, "collapsed"))
    model.init_from_data(ds.train, seed=cfg.seed)
    return model


def _check_fa(cfg: Any, ds: Dataset) -> None:
    if not 1 <= cfg.latent_dim < ds.data_dim:
        raise ConfigError("latent_dim", f"must be between 1 and {ds.data_dim - 1} for data with {ds.data_dim} "
                          f"features, got {cfg.latent_dim}")


def _check_mixture(cfg: Any, ds: Dataset) -> None:
    if len(ds.train) < cfg.components:
        raise ConfigError("components", f"{len(ds.train)} training points cannot fit {cfg.components} components; "
                          "use fewer components or more data")


COMPARED.register("bayesian_fa")(ComparedModel(
    lambda cfg: BayesianFactorAnalysis.traits_for(BayesianFAConfig(cfg.latent_dim, cfg.latent_dim)),
    _build_fa, _check_fa, lambda cfg: f"bayesian_fa (k = {cfg.latent_dim})"))
COMPARED.register("gaussian_mixture")(ComparedModel(
    lambda cfg: GaussianMixture.traits_for(GaussianMixtureConfig(1, cfg.components, cfg.covariance, "collapsed")),
    _build_mixture, _check_mixture,
    lambda cfg: f"gaussian_mixture (K = {cfg.components}, {cfg.covariance}, collapsed)"))


@dataclass
class ComparePosteriorsConfig(ExperimentConfig):
    #: a registered data set (default: wine, standardized, for bayesian_fa; for gaussian_mixture give
    #: synthetic_mixture or iris: NUTS on a full-covariance mixture in wine's 13 dimensions is slow)
    dataset: str = "wine"
    #: guide specs NAME[:K] to fit and compare: global guides only (auto-iaf works, and costs about 8x a fullrank epoch)
    guides: tuple[str, ...] = ("map", "meanfield", "fullrank", "lowrank:2")
    output: str = "runs/compare_posteriors"
    #: bayesian_fa or gaussian_mixture (its assignments summed out)
    model: str = "bayesian_fa"
    #: k, the number of factors (bayesian_fa)
    latent_dim: int = 2
    #: K, the number of components (gaussian_mixture)
    components: int = 3
    #: diag or full component covariances (gaussian_mixture)
    covariance: str = "full"
    #: train / valid / test fractions of the data (the posterior is the training split's)
    split: tuple[float, ...] = (0.7, 0.0, 0.3)
    #: keep at most this many points per split, drawn at random by the seed (default: all)
    subset: int | None = None
    #: synthetic data: number of points
    num_points: int = 300
    #: synthetic data: dimensions
    data_dim: int = 2
    #: synthetic mixture data: least distance between two means
    separation: float = 6.0
    #: NUTS: chains, run one after another (r̂ compares them)
    nuts_chains: int = 2
    #: NUTS: adaptation steps per chain (step size, diagonal mass matrix)
    nuts_warmup: int = 300
    #: NUTS: draws kept per chain
    nuts_samples: int = 400
    #: NUTS: largest tree depth (at most 2^depth - 1 leapfrog steps per draw)
    nuts_max_tree_depth: int = 8
    #: NUTS: target acceptance probability of the step-size adaptation
    nuts_target_accept: float = 0.8
    #: NUTS: compile the potential energy with the PyTorch JIT (2-3x faster steps after ~1 s of compiling per chain)
    nuts_jit: bool = True
    #: draws θ ~ q(θ) per guide: for its means and sds, its k̂, and the held-out predictive
    posterior_samples: int = 1000
    #: NUTS is flagged as unconverged when its largest r̂ on the compared quantities exceeds this
    rhat_threshold: float = 1.01
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1000, batch_size=None, lr=0.02, lr_final_factor=0.05, num_particles=8, clip_norm=100.0,
        restore_best=False, checkpoint_every=1, checkpoint_seconds=2.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "model", COMPARED.names())
        check_config(self, positive_int=("latent_dim", "components", "subset", "num_points", "data_dim",
                                         "nuts_chains", "nuts_samples", "nuts_max_tree_depth", "posterior_samples"),
                     nonneg_int=("nuts_warmup",), positive=("separation",), unit=("nuts_target_accept",))
        if self.nuts_target_accept >= 1:
            raise ConfigError("nuts_target_accept", f"must be in (0, 1), got {self.nuts_target_accept}")
        if not (isinstance(self.rhat_threshold, int | float) and self.rhat_threshold > 1):
            raise ConfigError("rhat_threshold", f"must be a number > 1, got {self.rhat_threshold!r}")
        check_choice(self, "covariance", COVARIANCES.names())
        check_split(self)
        traits = COMPARED[self.model].traits(self)
        for spec in self.guides:  # only global guides: q(θ) is what is compared with NUTS
            try:
                check_guide(spec, traits)
            except ValueError as e:
                raise ConfigError("guides", f"{e} (this experiment compares global guides q(θ) with NUTS)") from None


# ---------------------------------------------------------------------- the NUTS reference, cached


def nuts_fingerprint(cfg: ComparePosteriorsConfig, ds: Dataset, model: LatentModel) -> str:
    """What a cached ``nuts.nc`` must match to be reused: model and its config, the training data's sha256, the
    seed and every NUTS setting (JSON)."""
    return json.dumps({"model": model.name, "model_config": to_dict(model.config),
                       "train_sha256": sha256_arrays([ds.train.detach().cpu().numpy()]), "seed": cfg.seed,
                       "chains": cfg.nuts_chains, "warmup": cfg.nuts_warmup, "samples": cfg.nuts_samples,
                       "max_tree_depth": cfg.nuts_max_tree_depth, "target_accept": cfg.nuts_target_accept},
                      sort_keys=True)


def nuts_for(cfg: ComparePosteriorsConfig, ds: Dataset, model: LatentModel, quiet: bool = True) -> tuple[Any, bool]:
    """The NUTS reference of this run: ``DIR/nuts.nc`` when its fingerprint matches, else a new run written there
    (atomically). Returns (InferenceData, whether it was reused)."""
    import arviz as az

    from pyro_lvm.reference import nuts_reference

    path = Path(cfg.output) / NUTS_FILE
    fingerprint = nuts_fingerprint(cfg, ds, model)
    if path.is_file():
        try:
            cached = az.from_netcdf(path)
            cached.posterior.load()
            if cached.posterior.attrs.get("fingerprint") == fingerprint:
                return cached, True
        except (OSError, ValueError, KeyError):  # an unreadable file is run again and overwritten
            pass
        if not quiet:
            print(f"{path} was made with other settings or data: running NUTS again", file=sys.stderr)
    idata = nuts_reference(model, ds.train, num_samples=cfg.nuts_samples, warmup=cfg.nuts_warmup,
                           chains=cfg.nuts_chains, seed=cfg.seed, target_accept_prob=cfg.nuts_target_accept,
                           max_tree_depth=cfg.nuts_max_tree_depth, jit=cfg.nuts_jit)
    idata.posterior.attrs["fingerprint"] = fingerprint

    _write_netcdf(idata, path)
    return idata, False


def _write_netcdf(idata: Any, path: Path) -> None:
    """``idata`` as netCDF at ``path``, atomically (``pyro_lvm.posterior_report.write_netcdf``: made in memory, so
    HDF5 never writes to disk, nor to the system's temporary directory). ArviZ's wall-clock ``created_at`` stamp is
    removed from every group first (as ``gaussian_mixture``'s and ``--inspect``'s files), so one seed writes the
    same bytes."""
    from pyro_lvm.posterior_report import write_netcdf

    for group in idata.groups():
        getattr(idata, group).attrs.pop("created_at", None)
    write_netcdf(idata, path)


@torch.no_grad()
def held_out_under_draws(model: LatentModel, idata: Any, x: torch.Tensor) -> dict[str, float]:
    """Mean over test points of E_θ log p(x_n | θ) and log E_θ p(x_n | θ) under the draws of ``idata`` (NUTS):
    the same ``elbo``/``expected_log_likelihood`` and ``predictive_log_likelihood`` columns the guides get."""
    theta = {k: torch.as_tensor(idata.posterior[k].values).flatten(0, 1).to(x) for k in model.global_sites}
    s = next(iter(theta.values())).shape[0]
    lp = torch.stack([model.log_likelihood_at(x, {k: v[i] for k, v in theta.items()}) for i in range(s)])
    expected = lp.mean(0).mean().item()
    predictive = (torch.logsumexp(lp, 0) - math.log(s)).mean().item()
    return {"elbo": expected, "iwae": expected, "expected_log_likelihood": expected,
            "predictive_log_likelihood": predictive}


def recovery(model: LatentModel, idata: Any, truth: dict[str, Any]) -> dict[str, Any] | None:
    """Where synthetic data carry their true θ: each compared quantity's truth in NUTS posterior sds,
    z = (truth − mean_NUTS) / sd_NUTS per scalar (about N(0, 1) for a calibrated posterior); the mixture's true
    components are first relabelled to NUTS's labelling. ``None`` when the truth lacks a compared quantity."""
    import arviz as az

    from pyro_lvm.reference import reference_labels, scalar_entries, summary_for

    summary = summary_for(model)
    values = {**truth, "cov": truth.get("cov", truth.get("covariances"))}
    if not all(name in values and values[name] is not None for name in summary.compared):
        return None
    theta = {k: torch.as_tensor(values[k]).unsqueeze(0) for k in summary.compared}  # one "draw"
    if summary.relabel is not None:
        theta, _ = summary.relabel(model, theta, reference_labels(model, idata))
    true = scalar_entries(az.from_dict(posterior={k: v.numpy()[None] for k, v in theta.items()}), summary.compared)
    post = scalar_entries(idata, summary.compared)
    z = {k: float((true[k][0] - post[k].mean()) / post[k].std(ddof=1)) for k in post}
    by = {n: max(abs(v) for k, v in z.items() if k.split("[")[0] == n) for n in summary.compared}
    return {"max_abs_z": max(abs(v) for v in z.values()), "max_abs_z_by_quantity": by, "z": z}


# ---------------------------------------------------------------------- the experiment


@register_experiment("compare_posteriors")
class ComparePosteriorsExperiment(Experiment):
    Config = ComparePosteriorsConfig
    required_tags = frozenset({"continuous"})
    dtype = torch.float64  # NUTS's leapfrog and the comparisons in float64
    summary = "global guides' posteriors against a NUTS reference on identifiable quantities (mean/sd errors, k̂)"
    in_memory_because = "NUTS runs on the whole training split at once"
    choices = {"model": COMPARED.names, "covariance": COVARIANCES.names}

    def model_traits(self, cfg: ComparePosteriorsConfig) -> ModelTraits:
        return COMPARED[cfg.model].traits(cfg)

    def data_config(self, cfg: ComparePosteriorsConfig) -> DataConfig:
        return DataConfig(seed=cfg.seed, split=tuple(cfg.split), dtype=torch.float64, subset=cfg.subset,
                          num_points=cfg.num_points, data_dim=cfg.data_dim, latent_dim=cfg.latent_dim,
                          num_components=cfg.components, separation=cfg.separation)

    def check_data(self, cfg: ComparePosteriorsConfig, ds: Dataset) -> None:
        COMPARED[cfg.model].check_data(cfg, ds)

    def build_model(self, cfg: ComparePosteriorsConfig, ds: Dataset) -> LatentModel:
        return COMPARED[cfg.model].build(cfg, ds)

    def eval_config(self, cfg: ComparePosteriorsConfig) -> Any:
        return dataclasses.replace(super().eval_config(cfg), posterior_samples=cfg.posterior_samples)

    def baselines(self, cfg: ComparePosteriorsConfig, ds: Dataset) -> list[dict[str, Any]]:
        """The NUTS reference (run, or reused from ``DIR/nuts.nc``), as the table's reference row."""
        from pyro_lvm.reference import nuts_diagnostics, summary_for

        with seeded(cfg.seed):
            model = self.build_model(cfg, ds)
        idata, reused = nuts_for(cfg, ds, model, quiet=cfg.quiet)
        summary = summary_for(model)
        attrs = idata.posterior.attrs
        diagnostics = nuts_diagnostics(idata, summary.compared)
        row = {"name": "NUTS (reference)", "test": held_out_under_draws(model, idata, ds.test),
               "train_seconds": float(attrs["seconds"]), "reused": reused,
               "netcdf": str(Path(cfg.output) / NUTS_FILE), "compared": list(summary.compared),
               "diagnostics": diagnostics,
               "diagnostics_all_sites": nuts_diagnostics(idata, [v for v in idata.posterior.data_vars]),
               "converged": bool(diagnostics["r_hat_max"] <= cfg.rhat_threshold),
               "settings": {k: _plain(attrs[k]) for k in ("chains", "warmup", "num_samples", "max_tree_depth",
                                                          "target_accept_prob", "step_size", "accept_prob",
                                                          "divergences", "sampled")},
               "note": str(attrs["note"])}
        if "truth" in ds.meta:
            row["recovery"] = recovery(model, idata, ds.meta["truth"])
        if not cfg.quiet:
            verdict = "" if row["converged"] else f"  (above {cfg.rhat_threshold}: more --nuts-warmup/--nuts-samples)"
            print(f"NUTS {'reused from ' + row['netcdf'] if reused else 'ran'}: max r̂ {diagnostics['r_hat_max']:.4f}"
                  f"{verdict}, min bulk ESS {diagnostics['ess_bulk_min']:.0f}, {diagnostics['divergences']} "
                  f"divergences ({row['train_seconds']:.1f}s)", file=sys.stderr)
        return [row]

    def extras(self, cfg: ComparePosteriorsConfig, ds: Dataset, spec: str, model: LatentModel, guide: Any,
               fr: Any) -> dict[str, Any]:
        """q(θ)'s draws against NUTS's (per scalar, per quantity, overall), its joint k̂, its draws as netCDF."""
        import arviz as az

        from pyro_lvm.evaluate import global_pareto_k
        from pyro_lvm.reference import error_summary, guide_posterior, posterior_errors, reference_labels, summary_for

        nuts = az.from_netcdf(Path(cfg.output) / NUTS_FILE)
        summary = summary_for(model)
        q = guide_posterior(model, guide, ds.train, num_samples=cfg.posterior_samples, seed=cfg.seed,
                            reference=reference_labels(model, nuts))
        path = Path(cfg.output) / f"{guide_tag(spec)}_posterior.nc"
        _write_netcdf(q, path)
        rows = posterior_errors(nuts, q, summary.compared)
        by_quantity = {name: error_summary([r for r in rows if r["quantity"] == name]) for name in summary.compared}
        k_hat = global_pareto_k(model, guide, ds.train, num_samples=cfg.posterior_samples, seed=cfg.seed)
        return {"comparison": {"note": summary.note, "overall": error_summary(rows), "by_quantity": by_quantity,
                               "parameters": rows},
                "global_pareto_k": k_hat, "posterior": {"netcdf": str(path)}}

    def inspect_run(self, cfg: ComparePosteriorsConfig, netcdf: dict[str, Path]) -> None:
        """``--inspect`` keeps its per-guide files, but not its run-level ``forest.png``: here that file is the
        comparison with NUTS (:func:`forest_plot`), drawn by :meth:`figures`."""

    def describe(self, row: dict[str, Any]) -> str:
        c = row["comparison"]["overall"]
        k = row["global_pareto_k"]["pareto_k_theta"]
        return (f"{row['guide']:>12}: mean |z| {_f(c['mean_abs_mean_error'])}  max |z| {_f(c['max_abs_mean_error'])}  "
                f"sd ratio {_f(c['sd_ratio_geomean'])}  k̂ {_f(k, 2)}")

    def figures(self, cfg: ComparePosteriorsConfig, ds: Dataset, fitted: dict[str, tuple[LatentModel, Any]],
                histories: dict[str, list[dict[str, float]]]) -> None:
        """Training curves, the forest plot (``forest.png``), and ``results.md`` with the comparison tables."""
        super().figures(cfg, ds, fitted, histories)
        doc = json.loads((Path(cfg.output) / "results.json").read_text())
        model = next(iter(fitted.values()))[0]
        forest_plot(cfg, model, [r["guide"] for r in doc["results"]], Path(cfg.output) / "forest.png",
                    title=f"{COMPARED[cfg.model].label(cfg)} on {source_name(cfg)}: posteriors against NUTS")
        text = comparison_markdown(doc, cfg) + "\n" + results_table(doc)
        atomic_write_text(Path(cfg.output) / "results.md", text)
        if not cfg.quiet:
            print(comparison_markdown(doc, cfg))


def _plain(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else v


# ---------------------------------------------------------------------- outputs


def comparison_markdown(doc: dict[str, Any], cfg: ComparePosteriorsConfig) -> str:
    """The comparison tables: per guide overall, then per quantity, with NUTS's diagnostics and the notes."""
    nuts = doc["baselines"][0]
    d = nuts["diagnostics"]
    s = nuts["settings"]
    lines = [f"### {doc['experiment']} on {doc['dataset']}: {COMPARED[cfg.model].label(cfg)}, global guides "
             "against NUTS", "",
             f"NUTS reference: {s['chains']} chains × {s['num_samples']} draws after {s['warmup']} warm-up steps "
             f"({s['sampled']}); on the compared quantities max r̂ {_f(d['r_hat_max'], 4)}"
             f"{'' if nuts['converged'] else f' (ABOVE {cfg.rhat_threshold}: not converged)'}, min bulk ESS "
             f"{_f(d['ess_bulk_min'], 0)}, min tail ESS {_f(d['ess_tail_min'], 0)}, {d['divergences']} divergences; "
             f"{nuts['train_seconds']:.1f} s{' (reused)' if nuts['reused'] else ''}.", "",
             f"Identifiable quantities only: {nuts['note']}.", "",
             "z = (mean_q − mean_NUTS) / sd_NUTS per scalar; sd ratio = sd_q / sd_NUTS (geometric mean over "
             "scalars; 1 = right width, < 1 too narrow; — for a point mass); k̂: PSIS shape of the joint weights "
             f"p(x_train, θ)/q(θ) over {cfg.posterior_samples} draws (< 0.7: importance sampling can correct q).",
             "", "| guide | mean \\|z\\| | max \\|z\\| | mean \\|sd error\\| | sd ratio | sd ratio min–max | k̂ |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        c, k = r["comparison"]["overall"], r["global_pareto_k"]["pareto_k_theta"]
        lines.append(f"| {r['guide']} | {_f(c['mean_abs_mean_error'])} | {_f(c['max_abs_mean_error'])} | "
                     f"{_f(c['mean_abs_sd_error'])} | {_f(c['sd_ratio_geomean'])} | {_f(c['sd_ratio_min'])}–"
                     f"{_f(c['sd_ratio_max'])} | {_f(k, 2)} |")
    lines += ["", "Per quantity (mean \\|z\\| / max \\|z\\| / sd ratio):", ""]
    names = list(nuts["compared"])
    lines += ["| guide | " + " | ".join(f"{n} ({doc['results'][0]['comparison']['by_quantity'][n]['count']})"
                                          for n in names) + " |", "|---|" + "---|" * len(names)]
    for r in doc["results"]:
        q = r["comparison"]["by_quantity"]
        lines.append(f"| {r['guide']} | " + " | ".join(
            f"{_f(q[n]['mean_abs_mean_error'])} / {_f(q[n]['max_abs_mean_error'])} / {_f(q[n]['sd_ratio_geomean'])}"
            for n in names) + " |")
    return "\n".join(lines) + "\n"


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or isinstance(v, str):
        return "—"
    return f"{v:.{digits}f}"


#: the forest plot's second title line, per model
FOREST_NOTES = {"bayesian_fa": "W is not identifiable (rotations): only the identifiable mu, psi, diag(W W^T + psi)",
                "gaussian_mixture": "components relabelled to NUTS's labelling (label switching)"}


def _forest_entries(idata: Any, name: str) -> dict[str, np.ndarray]:
    """The scalars of quantity ``name`` drawn in the forest plot (a covariance: its diagonal, the variances)."""
    from pyro_lvm.reference import scalar_entries

    entries = scalar_entries(idata, [name])
    if name == "cov":
        entries = {k: v for k, v in entries.items() if _is_diagonal(k)}
    return entries


def _is_diagonal(label: str) -> bool:
    index = label[label.index("[") + 1:-1].split(",")
    return index[-1] == index[-2]


def forest_plot(cfg: ComparePosteriorsConfig, model: LatentModel, guides: Sequence[str], path: Path,
                title: str) -> Path:
    """``az.plot_forest`` of NUTS and every guide side by side, one panel per compared quantity (covariances: their
    diagonal), 94% intervals; guides whose draws are missing are left out."""
    import arviz as az

    from pyro_lvm.reference import summary_for

    out = Path(cfg.output)
    sources = [("NUTS", out / NUTS_FILE)] + [(g, out / f"{guide_tag(g)}_posterior.nc") for g in guides]
    data = [(name, az.from_netcdf(p)) for name, p in sources if p.is_file()]
    names = summary_for(model).compared
    tables = {n: [az.from_dict(posterior={k: v[None] for k, v in _forest_entries(idata, n).items()})
                  for _, idata in data] for n in names}
    rows = max(len(next(iter(t)).posterior.data_vars) for t in tables.values())
    fig, axes = new_figure(figsize=(5.0 * len(names), 1.0 + 0.11 * rows * len(data)), ncols=len(names))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names, strict=True):
        labels = list(_forest_entries(data[0][1], name))
        with np.errstate(all="ignore"):  # a point mass (map) has a zero-width interval
            az.plot_forest(tables[name], model_names=[n for n, _ in data], var_names=labels, combined=True,
                           hdi_prob=0.94, ax=ax, legend=True, textsize=8, markersize=3, linewidth=1)
        if ax is not axes[-1] and ax.get_legend() is not None:  # one legend for the figure
            ax.get_legend().remove()
        ax.set_title(f"{name}{' (diagonal)' if name == 'cov' else ''}", fontsize=9)
    fig.suptitle(f"{title}\n{FOREST_NOTES[cfg.model]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(ComparePosteriorsExperiment(), argv)


if __name__ == "__main__":
    sys.exit(main())
