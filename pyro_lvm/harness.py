"""One harness for every experiment: for each guide, build, fit, evaluate, report.

An experiment is an :class:`Experiment` (registered in :data:`EXPERIMENTS`) with a config dataclass that
extends :class:`ExperimentConfig`; it overrides the hooks it needs (``build``, ``baselines``, ``extras``,
``figures``, ...) and :func:`run_experiment` does the rest, in this order:

1. every guide spec is parsed and checked against the model's traits (and the estimator against the
   model) — before any data are loaded or any guide trained;
2. the data: a registered data set (``dataset``, checked against the experiment's required tags) or the
   user's own file (``data``), with its provenance;
3. baselines; then for each guide, under one seed: build, fit (or restore from an earlier run), evaluate
   on the test split, add the experiment's extras, save the fit (``checkpoints/<guide>/fitted.pt``, loadable
   with :func:`pyro_lvm.load`) and rewrite ``results.json`` atomically, so finished guides are never lost;
   with ``--inspect``, then write its posterior for a few test points (:meth:`Experiment.inspect`:
   ``<guide>.nc`` and figures, an ``inspect`` entry in its row);
4. figures (with ``--inspect`` also ``forest.png``, every guide's posterior side by side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from pyro_lvm.config import ConfigError, check_config, to_dict
from pyro_lvm.data import DataConfig, Dataset, dataset_entry, dataset_names, load_dataset, load_file
from pyro_lvm.evaluate import EvalConfig, evaluate, public
from pyro_lvm.guides import GuideConfig, check_guide
from pyro_lvm.guides import build_guide as make_guide
from pyro_lvm.models.base import LatentModel, ModelTraits
from pyro_lvm.registry import Registry
from pyro_lvm.report import payload, plot_training_curves, write_results
from pyro_lvm.runtime import accelerator_device, default_dtype, seeded, threads
from pyro_lvm.saving import checkpoint_states, fit_differences, materialize, read_checkpoint, state_differences
from pyro_lvm.saving import load as load_fitted
from pyro_lvm.saving import save as save_fitted
from pyro_lvm.train import FitResult, TrainConfig, check_elbo, fit, load_checkpoint


@dataclass
class ExperimentConfig:
    """Settings every experiment shares (each experiment's config adds its own fields)."""

    #: a registered data set (``pyro-lvm --help`` lists them)
    dataset: str = ""
    #: the user's own data file (.csv, .npy, .npz, .parquet), used instead of ``dataset``
    data: str | None = None
    #: columns of a --data table to use, by name or index (default: all)
    columns: tuple[str, ...] = ()
    #: guide specs NAME[:K] to fit and compare
    guides: tuple[str, ...] = ("amortized",)
    #: one seed fixes the data split, the initialisation and every sample
    seed: int = 0
    #: directory for results.json, results.md, figures and checkpoints
    output: str = "runs/experiment"
    #: no progress bars or per-guide lines
    quiet: bool = False
    #: torch threads (command line default: 1, see the README on threads)
    threads: int | None = None
    #: importance samples per test point for IWAE-K
    iwae_k: int = 1000
    #: skip training: load each guide's fit from this earlier run's output directory
    from_checkpoints: str | None = None
    #: continue the stopped run in this directory (used as --output): finished guides are kept, the others resume
    #: from their last.ckpt
    resume: str | None = None
    #: after each guide, inspect its posterior on a seeded random subset of the test split: <guide>.nc (ArviZ
    #: InferenceData), <guide>_posterior.png, <guide>_ppc.png, <guide>_pair.png, a summary in results.json; and
    #: forest.png comparing the guides
    inspect: bool = False
    #: test points --inspect draws for (fewer where pyro_lvm.inspect.MAX_VALUES bounds the draws)
    inspect_points: int = 200
    #: draws per point --inspect takes from each guide
    inspect_samples: int = 200
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.guides = tuple(s.strip() for s in self.guides if s.strip())
        self.columns = tuple(self.columns)
        if not self.guides:
            raise ConfigError("guides", "give at least one guide name")
        check_config(self, positive_int=("iwae_k", "threads", "inspect_points", "inspect_samples"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("seed", f"must be an integer, got {self.seed!r}")
        if self.data is None and not self.dataset:
            raise ConfigError("dataset", "give a data set name or a --data file")
        if self.resume is not None:
            if self.from_checkpoints:
                raise ConfigError("resume", "continues training; --from-checkpoints skips it: give one of them")
            self.output = self.resume


class Experiment:
    """Hooks of one study; :func:`run_experiment` calls them. Override what differs, nothing else."""

    #: the experiment's name (``pyro-lvm NAME``); set by :func:`register_experiment`
    name: ClassVar[str] = ""
    Config: ClassVar[type[ExperimentConfig]] = ExperimentConfig
    #: every data set used must carry all of these tags
    required_tags: ClassVar[frozenset[str]] = frozenset()
    #: default dtype for the run (float64 where closed forms are compared to ~1e-12)
    dtype: ClassVar[torch.dtype] = torch.float32
    #: TrainConfig fields exposed as flags (the rest keep the experiment's defaults; :data:`TRAINER_FLAGS` always are)
    train_flags: ClassVar[tuple[str, ...]] = ("epochs", "lr", "batch_size", "num_particles")
    #: one-line description for ``pyro-lvm --help``
    summary: ClassVar[str] = ""

    # ------------------------------------------------------------------ before any data
    def model_traits(self, cfg: Any) -> ModelTraits:
        raise NotImplementedError

    def estimator(self, cfg: Any) -> str | None:
        """The ELBO estimator the run asks for (``None``: the model's default)."""
        return cfg.train.elbo

    # ------------------------------------------------------------------ data
    def data_config(self, cfg: Any) -> DataConfig:
        return DataConfig(seed=cfg.seed, dtype=self.dtype)

    def check_data(self, cfg: Any, ds: Dataset) -> None:
        """Data-dependent checks of the config (e.g. latent_dim below the data's width)."""

    def test_split(self, cfg: Any, ds: Dataset) -> torch.Tensor:
        return ds.test

    # ------------------------------------------------------------------ per guide
    def build_model(self, cfg: Any, ds: Dataset) -> LatentModel:
        raise NotImplementedError

    def build_guide(self, cfg: Any, spec: str, model: LatentModel) -> Any:
        return make_guide(spec, model, self.guide_config(cfg))

    def build(self, cfg: Any, ds: Dataset, spec: str, seed: int) -> tuple[LatentModel, Any]:
        """Model, then guide, initialised from one stream seeded by ``seed``: every guide of a run starts from
        the same model. (Two streams both seeded by ``seed`` would give the encoder's first layer the same
        random numbers as the decoder's: a correlated start that trained MNIST VAEs 1-6 nats worse after
        5 epochs in 3 of 3 seeds.)"""
        with seeded(seed):
            model = self.build_model(cfg, ds)
            guide = self.build_guide(cfg, spec, model)
        return model, guide

    def guide_config(self, cfg: Any) -> GuideConfig:
        return GuideConfig()

    def train_config(self, cfg: Any, spec: str, output: str) -> TrainConfig:
        return dataclasses.replace(cfg.train, seed=cfg.seed, quiet=cfg.quiet, output=output)

    def fit(self, cfg: Any, ds: Dataset, spec: str, model: LatentModel, guide: Any,
            train_cfg: TrainConfig) -> tuple[LatentModel, Any, FitResult]:
        """Fit one guide; may replace model and guide (restarts keep the best). Returns what to evaluate."""
        return model, guide, fit(model, guide, ds.train, ds.valid, train_cfg)

    def eval_config(self, cfg: Any) -> EvalConfig:
        return EvalConfig(iwae_k=cfg.iwae_k, seed=cfg.seed)

    def extras(self, cfg: Any, ds: Dataset, spec: str, model: LatentModel, guide: Any,
               fr: FitResult) -> dict[str, Any]:
        """Experiment-specific entries of a results row; a ``test`` dict joins the test metrics."""
        return {}

    def baselines(self, cfg: Any, ds: Dataset) -> list[dict[str, Any]]:
        return []

    def figures(self, cfg: Any, ds: Dataset, fitted: dict[str, tuple[LatentModel, Any]],
                histories: dict[str, list[dict[str, float]]]) -> None:
        """The training curves of every guide, then :meth:`guide_figures` for each fitted guide."""
        plot_training_curves(histories, Path(cfg.output) / "training_curves.png",
                             title=f"{self.name} on {source_name(cfg)}")
        for spec, (model, guide) in fitted.items():
            self.guide_figures(cfg, ds, spec, model, guide, str(Path(cfg.output) / guide_tag(spec)))

    def guide_figures(self, cfg: Any, ds: Dataset, spec: str, model: LatentModel, guide: Any, prefix: str) -> None:
        """Figures of one fitted guide, written to files named ``prefix_*.png`` (default: none)."""

    def inspect(self, cfg: Any, ds: Dataset, test: torch.Tensor, spec: str, model: LatentModel,
                guide: Any) -> dict[str, Any]:
        """``--inspect`` for one fitted guide: :func:`pyro_lvm.posterior_report.inspect_fit` on ``test`` (the
        evaluated split) writes ``<guide>.nc`` and its figures into the output; returns the row's ``inspect``."""
        from pyro_lvm.posterior_report import inspect_fit

        return inspect_fit(model, guide, test, cfg.output, guide_tag(spec), num_points=cfg.inspect_points,
                           num_samples=cfg.inspect_samples, seed=cfg.seed, feature_names=ds.meta.get("feature_names"),
                           title=f"{self.name} on {source_name(cfg)}, {spec}")

    def inspect_run(self, cfg: Any, netcdf: dict[str, Path]) -> None:
        """``--inspect``, once per run: ``forest.png``, the focus of every inspected guide's posterior
        (``netcdf``: spec -> its ``.nc``) side by side."""
        from pyro_lvm.posterior_report import plot_forest, read_posterior

        plot_forest({spec: read_posterior(path) for spec, path in netcdf.items()}, Path(cfg.output) / "forest.png",
                    title=f"{self.name} on {source_name(cfg)}")

    def describe(self, row: dict[str, Any]) -> str:
        t = row["test"]
        return f"{row['guide']:>18}: ELBO {t['elbo']:.3f}  IWAE-{t.get('iwae_k')} {t['iwae']:.3f}"


EXPERIMENTS: Registry[Experiment] = Registry("experiment")

#: TrainConfig fields every experiment exposes as flags: the optimiser, and where and how Lightning trains
TRAINER_FLAGS = ("optimizer", "accelerator", "devices", "num_nodes", "strategy", "precision", "workers")


def register_experiment(name: str) -> Any:
    """Class decorator: register an instance of an :class:`Experiment` subclass under ``name``."""

    def decorate(cls: type[Experiment]) -> type[Experiment]:
        cls.name = name
        if cls.__module__ != "__main__":  # run as a script (python -m ...), the module's main uses it directly
            EXPERIMENTS.register(name, origin=(cls.__module__, cls.__qualname__))(cls())
        return cls

    return decorate


def source_name(cfg: ExperimentConfig) -> str:
    return Path(cfg.data).name if cfg.data else cfg.dataset


def guide_tag(spec: str) -> str:
    """A guide spec as a file name: ``planar:10`` -> ``planar_10``."""
    return spec.replace(":", "_")


def preflight(experiment: Experiment, cfg: ExperimentConfig) -> None:
    """Everything that can be checked without data: guides fit the model, the estimator fits the model,
    the data set exists and carries the tags this experiment needs, the output directory is usable."""
    traits = experiment.model_traits(cfg)
    for spec in cfg.guides:
        check_guide(spec, traits)
    check_elbo(traits, experiment.estimator(cfg))
    if cfg.data is None:
        missing = experiment.required_tags - dataset_entry(cfg.dataset).tags
        if missing:
            raise ConfigError("dataset", f"{cfg.dataset!r} lacks {', '.join(sorted(missing))} data; usable here: "
                              f"{', '.join(dataset_names(experiment.required_tags))}, or --data FILE")
    check_output_dir(cfg.output)
    if cfg.resume is not None and not (Path(cfg.resume) / "checkpoints").is_dir():
        raise ConfigError("resume", f"{cfg.resume} holds no checkpoints/ (not the --output of an earlier run); "
                          "start the run anew with --output")
    if cfg.from_checkpoints and not Path(cfg.from_checkpoints).is_dir():
        raise ConfigError("from_checkpoints", f"{cfg.from_checkpoints} is not a directory (the --output of an "
                          "earlier run)")
    for spec in cfg.guides if cfg.from_checkpoints else ():
        files = checkpoint_files(cfg.from_checkpoints, spec)
        if not any(p.is_file() for p in files):
            raise FileNotFoundError(f"no checkpoint at {', '.join(map(str, files))}; train first, or point "
                                    "--from-checkpoints at the --output of an earlier run with the same guides")


def checkpoint_files(run: str, spec: str) -> tuple[Path, Path, Path]:
    """Where a guide's fit is looked for in an earlier run's output, in order: fitted.pt, best, last."""
    directory = Path(run) / "checkpoints" / guide_tag(spec)
    return directory / "fitted.pt", directory / "best.ckpt", directory / "last.ckpt"


def check_output_dir(output: str) -> None:
    """``output`` is a directory this process can write, or can be created: checked before any data are loaded,
    so a bad ``--output`` costs no training."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError("output", f"{out} exists and is not a directory; choose another --output")
    base = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if base is not None and not base.is_dir():
        raise ConfigError("output", f"cannot create {out}: {base} is a file; choose another --output")
    if base is not None and not os.access(base, os.W_OK | os.X_OK):
        what = "write to" if base == out else f"create {out} in"
        raise ConfigError("output", f"cannot {what} {base} (permission denied); choose a writable --output")
    if (out / "checkpoints").is_dir() and not os.access(out / "checkpoints", os.W_OK | os.X_OK):
        raise ConfigError("output", f"cannot write to {out / 'checkpoints'} (permission denied); choose another "
                          "--output")


def load_data(experiment: Experiment, cfg: ExperimentConfig) -> Dataset:
    data_cfg = experiment.data_config(cfg)
    if cfg.data is not None:
        return load_file(cfg.data, data_cfg, columns=list(cfg.columns) or None)
    return load_dataset(cfg.dataset, data_cfg)


def restore(experiment: Experiment, cfg: Any, ds: Dataset, spec: str, model: LatentModel,
            guide: Any) -> tuple[LatentModel, Any, FitResult]:
    """Load a guide's fit from an earlier run (``fitted.pt``, else its ``best.ckpt``/``last.ckpt``) instead of
    training."""
    fitted, best, last = checkpoint_files(cfg.from_checkpoints, spec)
    history = saved_history(last)
    fr = FitResult(history=history, train_seconds=history[-1]["seconds"] if history else 0.0)
    if fitted.is_file():
        f = load_fitted(fitted, device=accelerator_device(cfg.train.accelerator))
        _refuse_differences(fitted, fit_differences(f, model, guide))
        return f.model, f.guide, fr
    if not (best.is_file() or last.is_file()):
        raise FileNotFoundError(f"no checkpoint at {fitted}, {best} or {last}; train first, or point "
                                "--from-checkpoints at the --output directory of an earlier run with the same guides")
    path = best if best.is_file() else last
    materialize(model, guide)  # lazily built guide parameters exist before a state dict is loaded into them
    saved_model, saved_guide = checkpoint_states(read_checkpoint(path))
    _refuse_differences(path, state_differences(saved_model, model.state_dict(), "model")
                        + state_differences(saved_guide, guide.state_dict(), "guide"))
    ckpt = load_checkpoint(path, model, guide)
    fr.best_epoch = ckpt.get("pyro_lvm", {}).get("history", [{"epoch": 0}])[-1]["epoch"]
    return model, guide, fr


def saved_history(last: Path) -> list[dict[str, float]]:
    """The per-epoch history a fit left in its ``last.ckpt`` (none when there is no such file)."""
    return read_checkpoint(last).get("pyro_lvm", {}).get("history", []) if last.is_file() else []


def _refuse_differences(path: Path, differences: list[str]) -> None:
    if differences:
        raise ConfigError("from_checkpoints", f"{path} was saved by a run with other settings "
                          f"({'; '.join(differences)}); rerun with the settings of the run that wrote it, or train "
                          "anew without --from-checkpoints")


def check_checkpoints(experiment: Experiment, cfg: Any, ds: Dataset) -> None:
    """Every guide's saved fit exists and matches what this run builds, before any guide is scored."""
    for spec in cfg.guides:
        restore(experiment, cfg, ds, spec, *experiment.build(cfg, ds, spec, cfg.seed))


def _finished_rows(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The rows of ``out_dir/results.json`` by guide: the guides a stopped run had finished."""
    path = out_dir / "results.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"resume: {path} is not valid JSON ({e}); remove it to rerun every guide") from None
    return {row["guide"]: row for row in doc.get("results", [])}


def run_experiment(experiment: Experiment, cfg: ExperimentConfig) -> dict[str, Any]:
    """Run ``experiment`` with ``cfg``; returns the ``results.json`` payload (also written to ``cfg.output``)."""
    preflight(experiment, cfg)
    with default_dtype(experiment.dtype), threads(cfg.threads):
        return _run(experiment, cfg)


def _run(experiment: Experiment, cfg: Any) -> dict[str, Any]:
    ds = load_data(experiment, cfg)
    experiment.check_data(cfg, ds)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(".*.tmp"):  # an atomic write's temporary file, left by a process killed mid-write
        stale.unlink(missing_ok=True)
    test = experiment.test_split(cfg, ds)
    baselines = experiment.baselines(cfg, ds)
    if cfg.from_checkpoints:
        check_checkpoints(experiment, cfg, ds)
    results: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, float]]] = {}
    fitted: dict[str, tuple[LatentModel, Any]] = {}
    doc: dict[str, Any] = {}
    data_info = {**ds.sizes(), "test": len(test), "provenance": ds.provenance()}
    finished = _finished_rows(out_dir) if cfg.resume else {}
    inspected: dict[str, Path] = {}  # --inspect: guide spec -> its InferenceData file, for the run's forest plot
    worker = _launched_worker()  # a data-parallel process other than rank 0: it helps fit, writes nothing
    for spec in cfg.guides:
        ckpt_dir = out_dir / "checkpoints" / guide_tag(spec)
        model, guide = experiment.build(cfg, ds, spec, cfg.seed)  # the same start whatever ran before
        train_cfg = experiment.train_config(cfg, spec, str(ckpt_dir))
        if cfg.resume:  # every fit of this guide (restarts have their own directories) continues its last.ckpt
            train_cfg = dataclasses.replace(train_cfg, resume="last")
        if spec in finished and (ckpt_dir / "fitted.pt").is_file():  # resumed run: this guide had finished
            f = load_fitted(ckpt_dir / "fitted.pt", device=accelerator_device(cfg.train.accelerator))
            row = finished[spec]
            results.append(row)
            history = saved_history(ckpt_dir / "last.ckpt")
            histories[spec], fitted[spec] = history, (f.model, f.guide)
            if not cfg.quiet:
                print(f"{experiment.describe(row)}  (finished before the resume)", file=sys.stderr)
            if cfg.inspect and not worker:  # inspected now unless the stopped run had (and was not killed doing it)
                nc = out_dir / f"{guide_tag(spec)}.nc"
                if "inspect" not in row or not nc.is_file():
                    row["inspect"] = _inspect(experiment, cfg, ds, test, spec, f.model, f.guide)
                    doc = payload(experiment.name, source_name(cfg), to_dict(cfg), data_info, results, baselines)
                    write_results(out_dir, doc)
                inspected[spec] = nc
            continue
        if cfg.from_checkpoints:
            model, guide, fr = restore(experiment, cfg, ds, spec, model, guide)
        else:
            model, guide, fr = experiment.fit(cfg, ds, spec, model, guide, train_cfg)
        if fr.rank != 0:  # data-parallel training: the other processes only help fit; rank 0 evaluates and writes
            worker = True
            continue
        metrics = public(evaluate(model, guide, test, experiment.eval_config(cfg)))
        row: dict[str, Any] = {"guide": spec, "test": metrics, "train_seconds": fr.train_seconds,
                               "seconds_per_epoch": fr.seconds_per_epoch, "best_epoch": fr.best_epoch,
                               "epochs_run": len(fr.history), "best_valid_elbo": fr.best_valid_elbo,
                               "guide_parameters": sum(p.numel() for p in getattr(guide, "parameters", list)())}
        extra = experiment.extras(cfg, ds, spec, model, guide, fr)
        metrics.update(extra.pop("test", {}))  # extra per-point metrics join the test columns
        row.update(extra)
        row["config"] = {"seed": cfg.seed, "elbo": fr.elbo or train_cfg.elbo, "train": to_dict(train_cfg),
                         "model": to_dict(model.config), "guide": to_dict(getattr(guide, "guide_config", None)),
                         "fitted": str(ckpt_dir / "fitted.pt")}
        if not cfg.from_checkpoints:
            save_fitted(ckpt_dir / "fitted.pt", model, guide, data=ds, meta={"experiment": experiment.name})
        results.append(row)
        histories[spec], fitted[spec] = fr.history, (model, guide)
        doc = payload(experiment.name, source_name(cfg), to_dict(cfg), data_info, results, baselines)
        write_results(out_dir, doc)  # after every guide: a long run never loses a finished guide
        if not cfg.quiet:
            print(f"{experiment.describe(row)}  ({fr.train_seconds:.1f}s)", file=sys.stderr)
        if cfg.inspect:  # after the row is safe: a run stopped while inspecting is inspected again on --resume
            row["inspect"] = _inspect(experiment, cfg, ds, test, spec, model, guide)
            write_results(out_dir, doc)  # doc holds this row
            inspected[spec] = out_dir / f"{guide_tag(spec)}.nc"
    if fitted:
        experiment.figures(cfg, ds, fitted, histories)
    if inspected and not worker:
        experiment.inspect_run(cfg, inspected)
    return doc


def _launched_worker() -> bool:
    """Whether this process was launched as a data-parallel process other than rank 0 (Lightning re-runs the
    script in each, its rank in the environment), so that it writes nothing before its first fit says so."""
    return any(os.environ.get(k, "0").strip() not in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _inspect(experiment: Experiment, cfg: Any, ds: Dataset, test: torch.Tensor, spec: str, model: LatentModel,
             guide: Any) -> dict[str, Any]:
    """``experiment.inspect`` for one guide, with a line saying what it wrote (unless quiet)."""
    entry = experiment.inspect(cfg, ds, test, spec, model, guide)
    if not cfg.quiet:
        print(f"{'':>20}  inspected {entry['num_points']} test points: {entry['netcdf']} and "
              f"{len(entry['figures'])} figures  ({entry['seconds']:.1f}s)", file=sys.stderr)
    return entry
