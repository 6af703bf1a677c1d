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

While it runs, a run holds ``<output>/.lock`` (:func:`output_lock`): a second run on the same output is refused.
``--resume`` keeps a finished guide only if its ``fitted.pt`` and the ``results.json`` row match this run's
experiment, data, model, guide and settings (else one error line naming the difference), and says on stderr
which guides had finished and which continue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from pyro_lvm.config import ConfigError, ReadableConfig, check_config, to_dict
from pyro_lvm.data import DataConfig, Dataset, dataset_entry, dataset_names, load_dataset, load_file
from pyro_lvm.evaluate import EvalConfig, evaluate, public
from pyro_lvm.guides import GuideConfig, check_guide
from pyro_lvm.guides import build_guide as make_guide
from pyro_lvm.models.base import LatentModel, ModelTraits
from pyro_lvm.plan import fingerprint
from pyro_lvm.registry import Registry
from pyro_lvm.report import payload, plot_training_curves, write_results
from pyro_lvm.runtime import accelerator_device, default_dtype, seeded, threads
from pyro_lvm.saving import (
    checkpoint_states,
    config_differences,
    fit_differences,
    materialize,
    read_checkpoint,
    state_differences,
)
from pyro_lvm.saving import load as load_fitted
from pyro_lvm.saving import save as save_fitted
from pyro_lvm.train import FitResult, TrainConfig, check_elbo, fit, load_checkpoint


@dataclass
class ExperimentConfig(ReadableConfig):
    """Settings every experiment shares (each experiment's config adds its own fields)."""

    #: a registered data set (``pyro-lvm --help`` lists them)
    dataset: str = ""
    #: the user's own data file (.csv, .npy, .npz, .parquet), used instead of ``dataset``
    data: str | None = None
    #: columns of a --data table to use, by name or index (default: all)
    columns: tuple[str, ...] = ()
    #: read the --data file (.npy, .parquet) from disk minibatch by minibatch instead of loading it; unset:
    #: streamed where loading it would take more than half the memory available
    stream: bool | None = None
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
        from pyro_lvm.guides.registry import canonical_guide_specs

        self.guides = canonical_guide_specs(self.guides)
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
    #: whether the experiment trains and scores data streamed from disk (``--stream``, or a file too large to load);
    #: one that needs its data in memory (a scikit-learn baseline, a full-data initialisation) refuses them
    streams: ClassVar[bool] = False
    #: why it needs its data in memory, for that refusal
    in_memory_because: ClassVar[str] = "it needs the whole data set in memory"

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

#: TrainConfig fields every experiment exposes as flags: the optimiser, how a step runs, where and how Lightning
#: trains, how often a run whose output is not a terminal prints a progress line
TRAINER_FLAGS = ("optimizer", "step", "accelerator", "devices", "num_nodes", "strategy", "precision", "workers",
                 "ddp_timeout", "progress_seconds")


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


#: the lock file a run holds in its output directory while it writes there: ``<pid> <host>``
LOCK_NAME = ".lock"
_HELD: set[Path] = set()  # the locks this process holds


@contextlib.contextmanager
def output_lock(output: str | Path, field: str = "output") -> Iterator[None]:
    """Hold ``output/.lock`` (created atomically, holding this process's pid and host) while the block runs: a second
    run on the same output is refused (a :class:`ConfigError` on ``field`` naming the pid); a lock left by a dead
    process of this host (a run killed with -9) is taken over. The lock is removed at the end, also on an error or a
    signal, and so is the output directory if this created it and nothing was written. Under data-parallel training
    only rank 0 locks (the other processes, re-launched with their rank in the environment, write nothing)."""
    if _launched_worker():
        yield
        return
    out = Path(output)
    created = []  # the directories this makes, deepest first: removed again if left empty
    p = out
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    mine = f"{os.getpid()} {socket.gethostname()}\n"
    _acquire(path, mine, field)
    key = path.absolute()
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        with contextlib.suppress(OSError):
            if path.read_text() == mine:
                path.unlink()
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break


def _acquire(path: Path, mine: str, field: str) -> None:
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = path.read_text()
            except FileNotFoundError:  # its run ended meanwhile
                continue
            except (OSError, UnicodeDecodeError):
                held = ""
            if not _stale(path, held):
                raise ConfigError(field, _lock_message(path, held)) from None
            with contextlib.suppress(OSError):  # a dead run's lock: take it over
                if path.read_text() == held:
                    path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return
    raise ConfigError(field, f"{path.parent} is in use by another run (it took {path} meanwhile); wait for it to end, "
                      "or choose another --output")


def _lock_owner(held: str) -> tuple[int, str] | None:
    parts = held.split()
    if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) > 0:
        return int(parts[0]), parts[1]
    return None


def _stale(path: Path, held: str) -> bool:
    """Whether the lock was left by a process of this host that no longer runs (or by this process, which holds no
    such lock: a pid reused after a kill -9)."""
    owner = _lock_owner(held)
    if owner is None or owner[1] != socket.gethostname():
        return False
    pid = owner[0]
    if pid == os.getpid():
        return path.absolute() not in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's live process
        return False
    return False


def _lock_message(path: Path, held: str) -> str:
    owner = _lock_owner(held)
    if owner is None:
        return (f"{path.parent} is locked by {path}, which names no process (a run starting, or a broken lock); "
                f"wait, or if no run writes {path.parent}, delete {path}")
    pid, host = owner
    where = "" if host == socket.gethostname() else f" on {host}"
    return (f"{path.parent} is in use by another run (pid {pid}{where}, lock {path}); wait for it to end, or choose "
            f"another --output" + (f" (if no run on {host} writes there, delete {path})" if where else ""))


def stopped_line(what: str, output: str | Path, again: str) -> str:
    """The line a run stopped by Ctrl-C or SIGTERM prints: where its finished guides are (only if results.json
    exists) and the ``--resume`` command ``again`` (only if a checkpoint exists to continue)."""
    out = Path(output)
    results = out / "results.json"
    checkpoints = out / "checkpoints"
    saved = checkpoints.is_dir() and any(p.name in ("last.ckpt", "best.ckpt", "fitted.pt")
                                         for p in checkpoints.rglob("*"))
    if not saved:
        return (f"{what}: stopped before any guide was checkpointed, so there is nothing to resume in {out}; run the "
                "same command again to start over")
    done = f"finished guides are in {results}" if results.is_file() else "no guide had finished"
    return f"{what}: {done}; continue with: {again}"


def load_data(experiment: Experiment, cfg: ExperimentConfig) -> Dataset:
    data_cfg = experiment.data_config(cfg)
    if cfg.stream is not None:
        if cfg.data is None:
            raise ConfigError("stream", f"streams a --data file (.npy or .parquet); the built-in data set "
                                        f"{cfg.dataset!r} is held in memory")
        data_cfg = dataclasses.replace(data_cfg, stream=cfg.stream)
    if cfg.data is not None:
        return load_file(cfg.data, data_cfg, columns=list(cfg.columns) or None)
    return load_dataset(cfg.dataset, data_cfg)


def restore(experiment: Experiment, cfg: Any, ds: Dataset, spec: str, model: LatentModel,
            guide: Any) -> tuple[LatentModel, Any, FitResult]:
    """Load a guide's fit from an earlier run (``fitted.pt``, else its ``best.ckpt``/``last.ckpt``) instead of
    training."""
    fitted, best, last = checkpoint_files(cfg.from_checkpoints, spec)
    history = saved_history(last)
    fr = FitResult(history=history, train_seconds=history[-1]["seconds"] if history else 0.0,
                   model_name=getattr(model, "name", ""), guide_spec=spec)
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


def _finished_rows(out_dir: Path, field: str = "resume") -> dict[str, dict[str, Any]]:
    """The rows of ``out_dir/results.json`` by guide: the guides a stopped run had finished. A file that is not
    JSON, or JSON of another shape than a results.json, is one :class:`ConfigError` on ``field``."""
    doc = _results_doc(out_dir, field)
    return {row["guide"]: row for row in doc["results"]} if doc else {}


def _results_doc(out_dir: Path, field: str) -> dict[str, Any] | None:
    """``out_dir/results.json`` checked to have the shape this harness writes (``None`` when there is none)."""
    path = out_dir / "results.json"
    if not path.is_file():
        return None
    fix = ("remove it to rerun every guide, or start anew with another --output" if field == "resume" else
           "remove it, or write to another --output")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(field, f"{path} is not valid JSON ({' '.join(str(e).split())}); {fix}") from None
    except OSError as e:
        raise ConfigError(field, f"cannot read {path} ({e.strerror or type(e).__name__}); check its permissions") \
            from None
    if not isinstance(doc, dict):
        raise ConfigError(field, f"{path} is not a results.json (it holds a JSON {type(doc).__name__}, not an "
                          f"object); {fix}")
    rows = doc.get("results")
    if not isinstance(rows, list):
        raise ConfigError(field, f"{path} is not a results.json (its 'results' is {_json_kind(rows)}, not a list "
                          f"of rows); {fix}")
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("guide"), str) and isinstance(row.get("test"), dict)):
            raise ConfigError(field, f"{path} is not a results.json (row {i} is not an object with a 'guide' name "
                              f"and 'test' metrics); {fix}")
    specs = [row["guide"] for row in rows]
    if len(set(specs)) != len(specs):
        twice = ", ".join(sorted({g for g in specs if specs.count(g) > 1}))
        raise ConfigError(field, f"{path} holds a guide twice ({twice}); {fix}")
    if not isinstance(doc.get("experiment"), str) or not isinstance(doc.get("config"), dict) \
            or not isinstance(doc.get("data"), dict):
        raise ConfigError(field, f"{path} is not a results.json (it lacks the experiment, config or data "
                          f"entry); {fix}")
    return doc


def _json_kind(value: Any) -> str:
    return "missing" if value is None else f"a JSON {type(value).__name__}"


#: experiment config fields that say how or where a run goes, not what it computes: a --resume may change them
#: (``dataset``/``data`` name the data, compared by their provenance instead: the same file by another path, or
#: ``digits-pca`` for ``digits_pca``, is the same data)
RUN_FIELDS = frozenset({"guides", "output", "resume", "from_checkpoints", "quiet", "threads", "inspect",
                        "inspect_points", "inspect_samples", "dataset", "data"})
#: TrainConfig fields of the same kind: where and how fast the fit runs, where it writes
TRAIN_RUN_FIELDS = frozenset({"output", "resume", "quiet", "threads", "accelerator", "devices", "num_nodes",
                              "ddp_timeout", "strategy", "workers", "progress_seconds"})
#: what :meth:`Dataset.provenance` records that makes the data (``path`` aside: a moved file is the same data)
DATA_FIELDS = ("source", "sha256", "shape", "columns", "splits", "standardized", "dropped_constant_columns",
               "split_fractions", "seed")


def _short(value: Any) -> str:
    """A value for an error line: long strings (a sha256) cut to their first 12 characters."""
    if isinstance(value, str) and len(value) > 24:
        return repr(value[:12] + "...")
    return repr(value)


def data_differences(saved: Any, current: dict[str, Any]) -> list[str]:
    """What differs between a stored data provenance (``fitted.pt``'s ``data``, ``results.json``'s
    ``data.provenance``) and this run's (:meth:`Dataset.provenance`); none where nothing was stored."""
    if not isinstance(saved, dict):
        return []
    files = bool(saved.get("path")) and bool(current.get("path"))  # the user's files: the same bytes by any path
    return [f"data {k}: saved {_short(saved.get(k))}, this run {_short(current.get(k))}" for k in DATA_FIELDS
            if not (files and k == "source") and _jsonable(saved.get(k)) != _jsonable(current.get(k))]


def _jsonable(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists), so a stored config compares with the current one."""
    return json.loads(json.dumps(value, default=str))


def _config_differences(saved: dict[str, Any], current: dict[str, Any], train: bool = False) -> list[str]:
    """Fields of the experiment config (``train``: of its TrainConfig) that differ, as flags: ``--latent-dim: saved
    2, this run 3``; the fields in :data:`RUN_FIELDS`/:data:`TRAIN_RUN_FIELDS` may differ."""
    skip = TRAIN_RUN_FIELDS if train else RUN_FIELDS
    out = []
    for k in [*saved, *(k for k in current if k not in saved)]:
        if k in skip:
            continue
        s, c = saved.get(k), current.get(k)
        if k == "train" and not train and isinstance(s, dict) and isinstance(c, dict):
            out += _config_differences(s, c, train=True)
        elif s != c:
            out.append(f"--{k.replace('_', '-')}: saved {_short(s)}, this run {_short(c)}")
    return out


def _source(provenance: Any) -> str:
    source = provenance.get("source") if isinstance(provenance, dict) else None
    return Path(source).name if isinstance(source, str) and provenance.get("path") else str(source)


def _refuse(field: str, path: Path, what: str, differences: list[str], run: Path) -> None:
    if differences:
        shown = differences[:4] + ([f"and {len(differences) - 4} more"] if len(differences) > 4 else [])
        raise ConfigError(field, f"{path} {what} ({'; '.join(shown)}); resume with the data and flags of the run "
                          f"that wrote {run}, or start anew with another --output")


def check_results_doc(experiment: Experiment, cfg: Any, doc: dict[str, Any], provenance: dict[str, Any],
                      out_dir: Path, field: str, *, settings: bool = True) -> None:
    """An earlier ``results.json`` is this experiment's, on this run's data, (``settings``) with this run's
    settings: else one :class:`ConfigError` line naming the difference."""
    path = out_dir / "results.json"
    if doc["experiment"] != experiment.name:
        _refuse(field, path, f"holds results of the {doc['experiment']} experiment, this run is {experiment.name}",
                [f"experiment: saved {doc['experiment']!r}, this run {experiment.name!r}"], out_dir)
    saved = doc["data"].get("provenance")
    differences = data_differences(saved, provenance)
    if differences:
        _refuse(field, path, f"holds results on {_source(saved)}, this run uses {_source(provenance)}",
                differences, out_dir)
    if settings:
        _refuse(field, path, "was written by a run with other settings",
                _config_differences(doc["config"], _jsonable(to_dict(cfg))), out_dir)


def check_finished(experiment: Experiment, cfg: Any, ds: Dataset, spec: str, path: Path, out_dir: Path) -> Any:
    """A finished guide's ``fitted.pt`` (``path``) was fitted by this experiment on this run's data with this run's
    model and guide (every config field), as an unfinished guide's ``last.ckpt`` is checked when it resumes; returns
    the loaded fit."""
    f = load_fitted(path, device=accelerator_device(cfg.train.accelerator))
    saved = f.meta.get("data")
    current = ds.provenance()
    differences = data_differences(saved, current)
    if differences:
        _refuse("resume", path, f"was fitted on {_source(saved)}, this run uses {_source(current)}", differences,
                out_dir)
    meta = f.meta.get("meta") or {}
    if meta.get("experiment", experiment.name) != experiment.name:
        _refuse("resume", path, f"was fitted by the {meta['experiment']} experiment, this run is {experiment.name}",
                [f"experiment: saved {meta['experiment']!r}, this run {experiment.name!r}"], out_dir)
    model, guide = experiment.build(cfg, ds, spec, cfg.seed)
    _refuse("resume", path, "was saved by a run with other settings", fit_differences(f, model, guide), out_dir)
    return f


def run_experiment(experiment: Experiment, cfg: ExperimentConfig) -> dict[str, Any]:
    """Run ``experiment`` with ``cfg``; returns the ``results.json`` payload (also written to ``cfg.output``)."""
    preflight(experiment, cfg)
    with output_lock(cfg.output, "resume" if cfg.resume else "output"), default_dtype(experiment.dtype), \
            threads(cfg.threads):
        return _run(experiment, cfg)


def _run(experiment: Experiment, cfg: Any) -> dict[str, Any]:
    ds = load_data(experiment, cfg)
    if ds.streamed and not experiment.streams:
        why = "--stream" if cfg.stream else "it would take more than half the memory available to load"
        raise ConfigError("data", f"{cfg.data} is streamed from disk ({why}), and the {experiment.name} experiment "
                                  f"cannot stream: {experiment.in_memory_because}; load it (--no-stream) if it fits, "
                                  "or fit it with pyro-lvm vae or pyro-lvm fit, which stream")
    experiment.check_data(cfg, ds)
    out_dir = Path(cfg.output)
    test = experiment.test_split(cfg, ds)
    data_info = {**ds.sizes(), "test": len(test), "provenance": ds.provenance()}
    worker = _launched_worker()  # a data-parallel process other than rank 0: it helps fit, writes nothing
    # what an earlier run left in this output is checked before anything is trained or written: a finished guide
    # is kept only if this run would fit it the same way (experiment, data, model, guide, settings)
    finished: dict[str, dict[str, Any]] = {}
    loaded: dict[str, Any] = {}  # finished guide -> its checked fitted.pt
    kept: list[dict[str, Any]] = []  # rows of guides this run does not fit, kept in results.json
    rescored = bool(cfg.from_checkpoints) and _same_dir(cfg.from_checkpoints, out_dir)
    if cfg.resume or rescored:
        field_name = "resume" if cfg.resume else "output"
        earlier = _results_doc(out_dir, field_name)
        if earlier is not None:
            rows = {row["guide"]: row for row in earlier["results"]}
            if earlier["experiment"] == experiment.name:  # else check_results_doc says so below
                for spec in cfg.guides if cfg.resume else ():
                    fitted_pt = out_dir / "checkpoints" / guide_tag(spec) / "fitted.pt"
                    if spec in rows and fitted_pt.is_file():
                        loaded[spec] = check_finished(experiment, cfg, ds, spec, fitted_pt, out_dir)
                        finished[spec] = rows[spec]
            check_results_doc(experiment, cfg, earlier, data_info["provenance"], out_dir, field_name,
                              settings=bool(cfg.resume))
            kept = [row for spec, row in rows.items() if spec not in cfg.guides]
    if cfg.from_checkpoints:
        check_checkpoints(experiment, cfg, ds)
    for spec in cfg.guides if cfg.resume else ():
        last = out_dir / "checkpoints" / guide_tag(spec) / "last.ckpt"
        if spec not in finished and last.is_file():
            check_unfinished(experiment, cfg, ds, spec, last, out_dir)
    if not worker:
        _say_what_is_kept(cfg, out_dir, finished, kept)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(".*.tmp"):  # an atomic write's temporary file, left by a process killed mid-write
        stale.unlink(missing_ok=True)
    baselines = experiment.baselines(cfg, ds)
    results: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, float]]] = {}
    fitted: dict[str, tuple[LatentModel, Any]] = {}
    doc: dict[str, Any] = {}
    inspected: dict[str, Path] = {}  # --inspect: guide spec -> its InferenceData file, for the run's forest plot

    def report() -> dict[str, Any]:
        """The results.json of the rows so far (and the rows kept from the earlier run), written atomically."""
        out = payload(experiment.name, source_name(cfg), to_dict(cfg), data_info, [*results, *kept], baselines)
        write_results(out_dir, out)
        return out

    for spec in cfg.guides:
        ckpt_dir = out_dir / "checkpoints" / guide_tag(spec)
        if spec in finished:  # resumed run: this guide had finished (its fitted.pt checked above)
            f = loaded[spec]
            row = finished[spec]
            results.append(row)
            history = saved_history(ckpt_dir / "last.ckpt")
            histories[spec], fitted[spec] = history, (f.model, f.guide)
            if not cfg.quiet:
                print(f"{experiment.describe(row)}  (finished before the resume)", file=sys.stderr)
            if cfg.inspect and not worker:  # inspected now unless the stopped run had (and was not killed doing it)
                nc = out_dir / f"{guide_tag(spec)}.nc"
                if "inspect" not in row or not _readable_netcdf(nc):  # missing or damaged (truncated): again
                    row["inspect"] = _inspect(experiment, cfg, ds, test, spec, f.model, f.guide)
                    doc = report()
                inspected[spec] = nc
            continue
        model, guide = experiment.build(cfg, ds, spec, cfg.seed)  # the same start whatever ran before
        train_cfg = experiment.train_config(cfg, spec, str(ckpt_dir))
        if cfg.resume:  # every fit of this guide (restarts have their own directories) continues its last.ckpt
            train_cfg = dataclasses.replace(train_cfg, resume="last")
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
        doc = report()  # after every guide: a long run never loses a finished guide
        if not cfg.quiet:
            print(f"{experiment.describe(row)}  ({fr.train_seconds:.1f}s)", file=sys.stderr)
        if cfg.inspect:  # after the row is safe: a run stopped while inspecting is inspected again on --resume
            row["inspect"] = _inspect(experiment, cfg, ds, test, spec, model, guide)
            write_results(out_dir, doc)  # doc holds this row
            inspected[spec] = out_dir / f"{guide_tag(spec)}.nc"
    if results and not doc and not worker:  # every guide had finished before this --resume: report them again
        doc = report()
    if fitted:
        experiment.figures(cfg, ds, fitted, histories)
    if inspected and not worker:
        experiment.inspect_run(cfg, inspected)
    return doc


def check_unfinished(experiment: Experiment, cfg: Any, ds: Dataset, spec: str, last: Path, out_dir: Path) -> None:
    """An unfinished guide's ``last.ckpt`` was written by a fit of this run's model and guide on this run's data,
    checked before any guide trains (the fit checks it again when it loads it), so a refusal comes first."""
    state = read_checkpoint(last).get("pyro_lvm")
    if not isinstance(state, dict):
        return  # the fit refuses it in one line when it loads it
    model, guide = experiment.build(cfg, ds, spec, cfg.seed)
    differences = []
    saved_model, saved_guide = state.get("model") or {}, state.get("guide") or {}
    name = getattr(model, "name", type(model).__name__)
    if saved_model.get("name") != name:
        differences.append(f"model: saved {saved_model.get('name')!r}, this run {name!r}")
    else:
        differences += config_differences(_jsonable(saved_model.get("config") or {}),
                                          _jsonable(to_dict(model.config)), "model")
    spec_now = getattr(guide, "spec", type(guide).__name__)
    if saved_guide.get("spec") != spec_now:
        differences.append(f"guide: saved {saved_guide.get('spec')!r}, this run {spec_now!r}")
    else:
        differences += config_differences(_jsonable(saved_guide.get("config") or {}),
                                          _jsonable(to_dict(getattr(guide, "guide_config", None)) or {}), "guide")
    _refuse("resume", last, "was saved by a run with other settings", differences, out_dir)
    saved_data = state.get("data")
    if type(experiment).fit is Experiment.fit and isinstance(saved_data, dict):  # the fit sees ds.train
        now = fingerprint(ds.train)
        _refuse("resume", last, "was trained on other data than this run's",
                [f"data {k}: saved {_short(saved_data.get(k))}, this run {_short(now[k])}" for k in now
                 if saved_data.get(k) != now[k]], out_dir)


def _same_dir(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _say_what_is_kept(cfg: Any, out_dir: Path, finished: dict[str, Any], kept: list[dict[str, Any]]) -> None:
    """One line on stderr: what a --resume keeps and what it continues, or which rows a --from-checkpoints that
    re-scores into its own directory keeps (printed even with --quiet: it says what the results are)."""
    others = ", ".join(row["guide"] for row in kept)
    if cfg.resume:
        todo = [spec for spec in cfg.guides if spec not in finished]
        if not todo:
            text = (f"resumed {out_dir}: every guide ({', '.join(cfg.guides)}) had finished; their results are "
                    f"re-reported from {out_dir / 'results.json'}")
        else:
            parts = [f"{', '.join(finished)} had finished (kept)"] if finished else ["no guide had finished"]
            cont = [s for s in todo if any((out_dir / "checkpoints" / guide_tag(s)).rglob("last.ckpt"))]
            new = [s for s in todo if s not in cont]
            if cont:
                parts.append(f"{', '.join(cont)} continue{'s' if len(cont) == 1 else ''} from the last checkpoint")
            if new:
                parts.append(f"{', '.join(new)} start{'s' if len(new) == 1 else ''} anew (no checkpoint)")
            text = f"resuming {out_dir}: " + "; ".join(parts)
        if kept:
            text += f"; the rows of {others} (not in --guide) are kept"
        print(text, file=sys.stderr)
    elif kept:
        print(f"keeping the rows of {others} in {out_dir / 'results.json'} (not re-scored by this run)",
              file=sys.stderr)


def _launched_worker() -> bool:
    """Whether this process was launched as a data-parallel process other than rank 0 (Lightning re-runs the
    script in each, its rank in the environment), so that it writes nothing before its first fit says so."""
    return any(os.environ.get(k, "0").strip() not in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _readable_netcdf(path: Path) -> bool:
    """Whether ``path`` is a netCDF file whose posterior group reads (a truncated one is not)."""
    from pyro_lvm.posterior_report import read_posterior

    if not path.is_file():
        return False
    try:
        read_posterior(path)
    except Exception:  # noqa: BLE001 - any unreadable file is inspected again, not trusted
        return False
    return True


def _inspect(experiment: Experiment, cfg: Any, ds: Dataset, test: torch.Tensor, spec: str, model: LatentModel,
             guide: Any) -> dict[str, Any]:
    """``experiment.inspect`` for one guide, with a line saying what it wrote (unless quiet)."""
    entry = experiment.inspect(cfg, ds, test, spec, model, guide)
    if not cfg.quiet:
        print(f"{'':>20}  inspected {entry['num_points']} test points: {entry['netcdf']} and "
              f"{len(entry['figures'])} figures  ({entry['seconds']:.1f}s)", file=sys.stderr)
    return entry
