r"""The inference gap of each fitted guide, split into approximation and amortization (Cremer et al. 2018).

    python -m pyro_lvm.experiments.inference_gaps --model vae --guide amortized,planar:10,iaf:2 \
        --from-checkpoints runs/vae_mnist --points 1000 --iwae-k 5000 --seed 0 --output runs/vae_mnist_gaps
    python -m pyro_lvm.experiments.inference_gaps --model factor_analysis --guide exact,amortized \
        --from-checkpoints runs/fa --output runs/fa_gaps

Scores the fits an earlier run saved (``DIR/checkpoints/<guide>/fitted.pt``; nothing is trained) on a seeded
random subset of the test split of the data that run used, reloaded from the provenance stored beside each
fit (binarized MNIST from ``--data-dir``, else the recorded file, else $PYRO_LVM_DATA_DIR). Per point:
log p(x) (exact, or IWAE-K), the amortized ELBO, and the best ELBO a q of the guide's own family reaches when
each point gets its own parameters (Adam from the amortized q, model fixed); approximation gap = log p(x) −
best ELBO, amortization gap = best ELBO − amortized ELBO (see :mod:`pyro_lvm.gaps`). Writes results.json,
results.md and inference_gaps.png (stacked bars per guide).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyro_lvm.config import ConfigError, ReadableConfig, check_choice, check_config, to_dict
from pyro_lvm.data import DataConfig, Dataset, dataset_entry, load_dataset, load_file
from pyro_lvm.gaps import GapConfig, inference_gaps
from pyro_lvm.guides import parse_guide_spec
from pyro_lvm.harness import check_output_dir, checkpoint_files
from pyro_lvm.models.base import LatentModel
from pyro_lvm.registry import Registry, UnknownNameError
from pyro_lvm.report import atomic_write_text, new_figure, payload, write_results
from pyro_lvm.runtime import DEVICES, cli_threads, threads
from pyro_lvm.saving import load

from .cli import ArgumentParser, add_config_arguments, plain_text, run_main
from .factor_analysis import FA_MODELS

#: --model FAMILY -> the registered model names whose fits it scores
FAMILIES: Registry[tuple[str, ...]] = Registry("model family")
FAMILIES.register("factor_analysis", origin=(__name__, "FA_MODELS"))(FA_MODELS)
FAMILIES.register("vae", origin=(__name__, "vae"))(("vae",))

#: provenance fields that must agree between the data a fit was trained on and the data reloaded for it
PROVENANCE_KEYS = ("source", "sha256", "shape", "columns", "splits", "standardized", "dropped_constant_columns",
                   "split_fractions", "seed")


@dataclass
class GapsExperimentConfig(ReadableConfig):
    #: model family of the fits: factor_analysis (factor analysis or PPCA) or vae
    model: str = "vae"
    #: guide specs NAME[:K] whose fits are scored, each from DIR/checkpoints/<guide>/fitted.pt
    guides: tuple[str, ...] = ("amortized",)
    #: the --output directory of the run whose fits are scored (required: there is no default)
    from_checkpoints: str = ""
    #: directory for results.json, results.md and inference_gaps.png
    output: str = "runs/inference_gaps"
    #: held-out points: a seeded random subset of this many test points (all of them when the split is smaller)
    points: int = 1000
    #: importance samples per point for log p(x) = IWAE-K where the model has no exact log-likelihood
    iwae_k: int = 5000
    #: most Adam steps of the per-point optimisation
    steps: int = GapConfig.num_steps
    #: Adam's learning rate for the per-point parameters (cut at each plateau of the mean ELBO)
    lr: float = GapConfig.lr
    #: draws per point per step for the optimisation's ELBO gradient
    elbo_particles: int = GapConfig.elbo_particles
    #: draws per point for the final ELBO estimates (their Monte Carlo error is reported)
    eval_particles: int = GapConfig.eval_particles
    #: nats per point: a window of the optimisation whose mean ELBO improves by less does not count as improving
    tol: float = GapConfig.tol
    #: one seed fixes the subset of points and every draw
    seed: int = 0
    #: directory with binarized_mnist.npz (default: where the fit's data were read, then $PYRO_LVM_DATA_DIR,
    #: then ../shared/data)
    data_dir: str | None = None
    #: where the fits are scored: cpu, cuda, mps or auto (a checkpoint written on any device loads on any other)
    device: str = "cpu"
    #: torch threads (command line default: 1, see the README on threads)
    threads: int | None = None
    #: no per-guide lines or table
    quiet: bool = False

    def __post_init__(self) -> None:
        self.guides = tuple(s.strip() for s in self.guides if s.strip())
        if not self.guides:
            raise ConfigError("guides", "give at least one guide name")
        check_choice(self, "model", FAMILIES.names())
        check_choice(self, "device", DEVICES)
        check_config(self, positive_int=("points", "threads"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("seed", f"must be an integer, got {self.seed!r}")
        self.gap_config()  # the optimisation's settings are checked now, under their flags' names

    def gap_config(self) -> GapConfig:
        """The :class:`~pyro_lvm.gaps.GapConfig` these flags ask for."""
        names = {"num_steps": "steps"}  # GapConfig field -> this config's
        try:
            return GapConfig(num_steps=self.steps, lr=self.lr, elbo_particles=self.elbo_particles,
                             eval_particles=self.eval_particles, iwae_k=self.iwae_k, tol=self.tol, seed=self.seed)
        except ConfigError as e:
            raise ConfigError(names.get(e.field, e.field), e.reason) from None


# ---------------------------------------------------------------------------------------------
# the data a fit was trained on


def _dataset_name(source: str) -> str | None:
    """The registered data set whose provenance records ``source`` (scikit-learn's sets record their loader)."""
    for name in (source, source.removeprefix("sklearn.datasets.").removeprefix("load_")):
        try:
            dataset_entry(name)
        except UnknownNameError:
            continue
        return name
    return None


def fitted_data(provenance: dict[str, Any] | None, model: LatentModel, *, where: str,
                data_dir: str | None = None) -> Dataset:
    """Reload the data set a fit was trained on from the provenance :func:`pyro_lvm.save` stored (``where`` names
    the file, for errors): a registered data set by name, or the user's file by path, with the recorded seed,
    split fractions and subset (read off the split sizes), in the model's dtype. The reloaded provenance must
    match the recorded one (hash, shape, splits, preprocessing), else ``ValueError`` naming what differs."""
    if not provenance:
        raise ValueError(f"{where} records no data provenance (saved without data=); score it with "
                         "pyro_lvm.gaps.inference_gaps on the data you trained it on")
    shape, splits = provenance.get("shape") or [0, 0], provenance.get("splits") or {}
    subset = max(splits.values()) if splits and shape[0] and sum(splits.values()) < shape[0] else None
    fractions = provenance.get("split_fractions")
    name = _dataset_name(str(provenance.get("source")))
    recorded = Path(provenance["path"]) if provenance.get("path") else None
    if data_dir is None and recorded is not None and recorded.exists():
        data_dir = str(recorded.parent if recorded.is_file() else recorded)
    config = DataConfig(seed=provenance.get("seed") or 0, split=tuple(fractions) if fractions else (0.6, 0.2, 0.2),
                        data_dir=data_dir, subset=subset, dtype=model.dtype, num_points=max(shape[0], 1),
                        data_dim=max(shape[1], 1), latent_dim=model.latent_dim, pca_dim=model.data_dim)
    if name is not None:
        ds = load_dataset(name, config)
    elif recorded is not None and recorded.is_file():
        ds = load_file(recorded, config, columns=provenance.get("columns"), standardize=provenance.get("standardized"))
    else:
        raise FileNotFoundError(f"{where} was trained on {provenance.get('source')!r}, which is neither a registered "
                                "data set nor a file that exists now; restore the file at its recorded path")
    now = ds.provenance()
    differ = [k for k in PROVENANCE_KEYS if provenance.get(k) is not None and now.get(k) != provenance.get(k)]
    if differ:
        details = "; ".join(f"{k}: trained on {provenance.get(k)!r}, reloaded {now.get(k)!r}" for k in differ)
        raise ValueError(f"{where}: the reloaded data differ from those the fit was trained on ({details}); point "
                         "--data-dir at the files it was trained on")
    return ds


def held_out_points(test: torch.Tensor, points: int, seed: int) -> torch.Tensor:
    """A seeded random subset of ``points`` test rows (all of them, shuffled, when there are fewer): MNIST's test
    file is ordered by digit, so its first rows are not a sample."""
    keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:points]
    return test[keep]


# ---------------------------------------------------------------------------------------------
# the run

#: (results key, column title) of results.md, in nats per point
TABLE = [("log_px", "log p(x)"), ("amortized_elbo", "amortized ELBO"), ("best_elbo", "best per-point ELBO"),
         ("approximation_gap", "approximation gap"), ("amortization_gap", "amortization gap")]


def preflight(cfg: GapsExperimentConfig) -> list[Path]:
    """Everything checked before any fit or data is loaded: the run directory, the guide specs, that every
    guide's ``fitted.pt`` exists, and that the output is writable. Returns the fitted.pt paths."""
    if not cfg.from_checkpoints:
        raise ConfigError("from_checkpoints", "give the --output directory of the run whose fits to score")
    if not Path(cfg.from_checkpoints).is_dir():
        raise ConfigError("from_checkpoints", f"{cfg.from_checkpoints} is not a directory (the --output of an "
                          "earlier run)")
    for spec in cfg.guides:
        parse_guide_spec(spec)
    paths = [checkpoint_files(cfg.from_checkpoints, spec)[0] for spec in cfg.guides]
    missing = [f"{spec} ({p})" for spec, p in zip(cfg.guides, paths, strict=True) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no fitted.pt for {', '.join(missing)} under --from-checkpoints; train those guides "
                                "first, or drop them from --guide")
    check_output_dir(cfg.output)
    return paths


def run(cfg: GapsExperimentConfig) -> dict[str, Any]:
    """Score every guide of ``cfg``; returns the ``results.json`` payload (written after each guide)."""
    paths = preflight(cfg)
    out = Path(cfg.output)
    results: list[dict[str, Any]] = []
    data: dict[str, tuple[Dataset, torch.Tensor]] = {}  # by provenance: guides of one run share their points
    doc: dict[str, Any] = {}
    source = ""
    with threads(cfg.threads):
        for spec, path in zip(cfg.guides, paths, strict=True):
            fitted = load(path, device=cfg.device)
            family = FAMILIES[cfg.model]
            if fitted.meta["model_name"] not in family:
                other = next((f for f, names in FAMILIES.items() if fitted.meta["model_name"] in names), None)
                raise ConfigError("model", f"{path} holds a {fitted.meta['model_name']!r} model, not one of "
                                  f"{', '.join(family)}" + (f"; use --model {other}" if other else ""))
            key = json.dumps(fitted.meta["data"], sort_keys=True, default=str)
            if key not in data:
                ds = fitted_data(fitted.meta["data"], fitted.model, where=str(path), data_dir=cfg.data_dir)
                data[key] = ds, held_out_points(ds.test, cfg.points, cfg.seed)
            ds, x = data[key]
            source = source or ds.name
            gaps = inference_gaps(fitted.model, fitted.guide, x, cfg.gap_config())
            per_point = {k: v.tolist() for k, v in gaps.pop("per_point").items()}
            optimisation = gaps.pop("optimisation")
            row = {"guide": spec, "test": gaps, "optimisation": optimisation, "per_point": per_point,
                   "config": {"fitted": str(path), "model_name": fitted.meta["model_name"],
                              "model": to_dict(fitted.model.config), "guide": to_dict(fitted.guide.guide_config)}}
            results.append(row)
            info = {**ds.sizes(), "points": len(x), "provenance": ds.provenance()}
            doc = payload("inference_gaps", source, to_dict(cfg), info, results, [])
            write_results(out, doc)
            atomic_write_text(out / "results.md", gaps_table(doc))  # the gap columns, not report.COLUMNS
            if not cfg.quiet:
                print(describe(row), file=sys.stderr)
    plot_gaps(results, out / "inference_gaps.png", title=f"inference gaps on {source}")
    return doc


def describe(row: dict[str, Any]) -> str:
    t, o = row["test"], row["optimisation"]
    return (f"{row['guide']:>18}: log p(x) {t['log_px']:.3f} ({t['log_px_method']})  approximation gap "
            f"{_num(t['approximation_gap'])}  amortization gap {_num(t['amortization_gap'])}  "
            f"({o['steps']} steps{'' if o['converged'] else ', not converged'}, {t['seconds']:.0f}s)")


def _num(v: float) -> str:
    return f"{v + 0.0 if round(v, 3) != 0 else 0.0:.3f}"  # a rounded zero prints 0.000, never -0.000


def _pm(t: dict[str, Any], key: str) -> str:
    return f"{_num(t[key])} ± {_num(t[f'{key}_se'])}"


def gaps_table(doc: dict[str, Any]) -> str:
    """results.md: per guide, each quantity's mean ± standard error over points, and how it was estimated."""
    head = ["guide", *(title for _, title in TABLE), "log p(x) by", "MC error (approx., amort.)", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["results"]:
        t, o = r["test"], r["optimisation"]
        cells = [r["guide"], *(_pm(t, k) for k, _ in TABLE), t["log_px_method"],
                 f"{_num(t['approximation_gap_mc_error'])}, {_num(t['amortization_gap_mc_error'])}",
                 f"{o['steps']}{'' if o['converged'] else ' (not converged)'}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = doc["data"]["points"]
    note = (f"Mean nats per point over {n} held-out test points, ± the standard error over points; the MC error is "
            "the Monte Carlo standard error of each mean gap. approximation gap = log p(x) − best per-point ELBO, "
            "amortization gap = best per-point ELBO − amortized ELBO (Cremer et al. 2018).")
    return f"### inference gaps on {doc['dataset']}\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def plot_gaps(results: Sequence[dict[str, Any]], path: Path, title: str = "inference gaps") -> Path:
    """Stacked bars per guide: the approximation gap below, the amortization gap on it (± standard errors over
    points); the bar's height is the whole gap log p(x) − amortized ELBO."""
    names = [r["guide"] for r in results]
    approx = [r["test"]["approximation_gap"] for r in results]
    amort = [r["test"]["amortization_gap"] for r in results]
    fig, ax = new_figure(figsize=(max(4.0, 1.2 * len(names) + 2), 4))
    pos = list(range(len(names)))
    ax.bar(pos, approx, color="tab:blue", label="approximation gap",
           yerr=[r["test"]["approximation_gap_se"] for r in results], capsize=3)
    ax.bar(pos, amort, bottom=approx, color="tab:orange", label="amortization gap",
           yerr=[r["test"]["amortization_gap_se"] for r in results], capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(pos, names, rotation=20 if len(names) > 4 else 0)
    ax.set(ylabel="nats per point", title=title)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def parse(argv: Sequence[str] | None) -> GapsExperimentConfig:
    """Flags -> a checked config (a bad value: one ``error:`` line, exit status 2)."""
    p = ArgumentParser(prog="pyro-lvm inference_gaps", description=plain_text(__doc__ or ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = add_config_arguments(p, GapsExperimentConfig, GapsExperimentConfig(),
                                  choices={"model": FAMILIES.names, "device": lambda: list(DEVICES)})
    ns = p.parse_args(argv)
    return GapsExperimentConfig(**{k: getattr(ns, k) for k in fields})


def main(argv: Sequence[str] | None = None) -> int:
    def go() -> int:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        cfg = dataclasses.replace(cfg, threads=cli_threads(cfg.threads))
        started = time.perf_counter()
        doc = run(cfg)
        if not cfg.quiet:
            print(gaps_table(doc))
            print(f"results written to {cfg.output}/results.json ({time.perf_counter() - started:.0f}s)")
        return 0

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
