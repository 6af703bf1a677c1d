r"""Your own Pyro model function, fitted with each guide and compared on held-out bounds.

    python -m pyro_lvm.experiments.fit --model mymodels.py:poisson_pca --data counts.npy \
        --guide amortized,iaf:2 --seed 0 --output runs/mine
    pyro-lvm fit --model pyro_lvm.models.functions:factor_analysis --dataset wine --inspect

``--model`` is an import path (``package.module:function`` or ``path/to/file.py:function``) of a function
``fn(x)`` that follows :func:`pyro_lvm.wrap_model`'s rules; a rule it breaks is one ``error:`` line naming the site,
before any guide is trained. Data whose likelihood needs raw values (counts, 0/1 outcomes: a discrete observed
site) are not standardized, and the run says so once; ``--standardize``/``--no-standardize`` overrides
(``results.json`` records which). A function with global latent sites takes guide pairs,
``--guide amortized+meanfield,iaf:2+lowrank:2`` (``LOCAL+GLOBAL``). The same results.json, results.md, figures,
checkpoints, ``--resume``, ``--from-checkpoints`` and ``--inspect`` as the built-in experiments.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pyro_lvm.config import ConfigError, check_choice, check_config, check_split
from pyro_lvm.data import DataConfig, Dataset
from pyro_lvm.guides import GuideConfig, check_guide
from pyro_lvm.harness import Experiment, ExperimentConfig, register_experiment
from pyro_lvm.models.base import LatentModel, ModelTraits
from pyro_lvm.train import TrainConfig
from pyro_lvm.wrap import ENCODER_INPUTS, FunctionModel, import_target, wrap_model

from .cli import run_cli


@dataclass
class FitExperimentConfig(ExperimentConfig):
    #: the model function's import path: package.module:function or path/to/file.py:function
    model: str = "pyro_lvm.models.functions:factor_analysis"
    dataset: str = "wine"
    guides: tuple[str, ...] = ("amortized", "iaf:2")
    output: str = "runs/fit"
    #: standardize the data by the train split; unset: off where the observed site is discrete (counts, 0/1
    #: outcomes: the likelihood needs the raw values), on otherwise
    standardize: bool | None = None
    #: transform of x before every encoder: auto (log1p for count likelihoods), identity or log1p
    encoder_input: str = "auto"
    #: import path of the model's exact log p(x) per point, log_likelihood(x, **params) (empty: none)
    log_likelihood: str = ""
    #: train / valid / test fractions of the data
    split: tuple[float, ...] = (0.6, 0.2, 0.2)
    #: hidden layer sizes of the encoder MLP (every amortized guide's network from x)
    hidden: tuple[int, ...] = (64,)
    #: hidden layer sizes of each flow layer's hypernetwork
    flow_hidden: tuple[int, ...] = (64,)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=200, batch_size=128, lr=1e-2, eval_every=10, checkpoint_every=1, restore_best=True))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "encoder_input", ["auto", *ENCODER_INPUTS.names()])
        check_split(self)
        self.hidden, self.flow_hidden = tuple(self.hidden), tuple(self.flow_hidden)
        check_config(self, layers=("hidden", "flow_hidden"))
        for name in ("model", "log_likelihood"):  # an unimportable function is refused before any data are loaded
            if getattr(self, name):
                try:
                    import_target(getattr(self, name))
                except ValueError as e:
                    raise ConfigError(name, str(e).removeprefix("model: ")) from None


@functools.lru_cache(maxsize=8)
def _observed_is_discrete(target: str) -> bool:
    """Whether the function's observed site has a discrete support, read from a prototype trace before the data are
    loaded (their width unknown: the first of a few widths the function accepts)."""
    fn = import_target(target)
    for width in (4, 1, 13, 64):
        try:
            with torch.random.fork_rng(devices=[]):
                model = wrap_model(fn, data_dim=width, target=target)
        except ValueError:
            continue
        support = model.observed_support
        base = getattr(support, "base_constraint", support)
        return bool(getattr(base, "is_discrete", False))
    return False  # the function's own errors come when it is wrapped on the data


def standardized(cfg: FitExperimentConfig) -> bool:
    """``--standardize`` as given, else off for a discrete likelihood."""
    return cfg.standardize if cfg.standardize is not None else not _observed_is_discrete(cfg.model)


@register_experiment("fit")
class FitExperiment(Experiment):
    Config = FitExperimentConfig
    summary = "your own Pyro model function (--model file.py:fn): every guide on held-out bounds"
    streams = True  # minibatches, validation, evaluation and --inspect read a streamed split block by block
    choices = {"encoder_input": lambda: ["auto", *ENCODER_INPUTS.names()]}
    train_flags = ("epochs", "warmup_epochs", "patience", "batch_size", "lr", "lr_final_factor", "eval_every",
                   "num_particles")

    def guide_config(self, cfg: FitExperimentConfig) -> GuideConfig:
        return GuideConfig(hidden=cfg.hidden, flow_hidden=cfg.flow_hidden)

    def model_traits(self, cfg: FitExperimentConfig) -> ModelTraits:
        return FunctionModel.traits_for(None)

    def data_config(self, cfg: FitExperimentConfig) -> DataConfig:
        standardize = standardized(cfg)
        if cfg.standardize is None and not standardize and not cfg.quiet:
            print(f"--standardize: off, as {cfg.model}'s observed site is discrete (the likelihood needs the raw "
                  "values); --standardize overrides", file=sys.stderr)
        return DataConfig(seed=cfg.seed, split=tuple(cfg.split), dtype=torch.float32, standardize=standardize)

    def _wrap(self, cfg: FitExperimentConfig, data_dim: int) -> FunctionModel:
        try:
            return wrap_model(import_target(cfg.model), data_dim=data_dim, target=cfg.model,
                              encoder_input=cfg.encoder_input, log_likelihood=cfg.log_likelihood or None)
        except ValueError as e:
            raise ConfigError("model", f"{cfg.model}: {str(e).removeprefix('model: ')}") from None

    def check_data(self, cfg: FitExperimentConfig, ds: Dataset) -> None:
        with torch.random.fork_rng(devices=[]):
            model = self._wrap(cfg, ds.data_dim)  # the function's rules, checked before any guide is trained
        model.validate(ds.train, name="training data")
        for spec in cfg.guides:  # now that the function's global sites are known: pairs where they are needed
            try:
                check_guide(spec, model.traits)
            except (KeyError, ValueError) as e:
                raise ConfigError("guides", f"{cfg.model}: {str(e).strip(chr(39) + chr(34))}") from None
        ds.meta["encoder_input"] = model.encoder_input_name

    def build_model(self, cfg: FitExperimentConfig, ds: Dataset) -> LatentModel:
        return self._wrap(cfg, ds.data_dim)

    def extras(self, cfg: FitExperimentConfig, ds: Dataset, spec: str, model: LatentModel, guide: Any,
               fr: Any) -> dict[str, Any]:
        return {"model": {"target": cfg.model, "local_sites": list(model.sites),
                          "global_sites": list(model.global_sites),
                          "discrete_sites": list(model.discrete_sites), "encoder_input": model.encoder_input_name,
                          "standardized": standardized(cfg)}}

    def describe(self, row: dict[str, Any]) -> str:
        t = row["test"]
        return f"{row['guide']:>20}: ELBO {t['elbo']:.3f}  IWAE-{t['iwae_k']} {t['iwae']:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(FitExperiment(), argv)


if __name__ == "__main__":
    sys.exit(main())
