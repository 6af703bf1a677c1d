"""pyro-lvm: latent-variable models in Pyro with swappable variational families.

    import pyro_lvm
    ds = pyro_lvm.from_array(x)                                  # NumPy / torch / pandas, any float dtype
    model = pyro_lvm.build_model("factor_analysis", data_dim=ds.data_dim, latent_dim=3)
    guide = pyro_lvm.build_guide("amortized", model)
    pyro_lvm.fit(model, guide, ds.train, ds.valid, epochs=200, seed=0)
    pyro_lvm.evaluate(model, guide, ds.test, iwae_k=100)

Importing the package changes no global setting (Pyro's, torch's, NumPy's or matplotlib's).
"""

from __future__ import annotations

from typing import Any

from pyro_lvm.config import ConfigError
from pyro_lvm.data import DataConfig, Dataset, from_array, load_dataset, load_file
from pyro_lvm.evaluate import EvalConfig, evaluate
from pyro_lvm.gaps import GapConfig, inference_gaps  # noqa: F401  (approximation vs amortization gap)
from pyro_lvm.guides import GUIDES, GuideConfig, build_guide
from pyro_lvm.inspect import to_inference_data
from pyro_lvm.models import MODELS, LatentModel
from pyro_lvm.models.base import data_plate
from pyro_lvm.registry import UnknownNameError, register_model
from pyro_lvm.runtime import local_params
from pyro_lvm.saving import Fitted, library_version, load, save
from pyro_lvm.train import FitResult, TrainConfig, TrainingError, fit
from pyro_lvm.wrap import wrap_model

__version__ = library_version()


def build_model(name: str, data_dim: int, **config: Any) -> LatentModel:
    """Build a registered model: ``build_model("vae", data_dim=784, latent_dim=20, decoder="bernoulli")``.

    ``config`` are fields of the model's config dataclass (``MODELS[name].Config``); an unknown field or a
    bad value raises ``ValueError`` naming it. Initial values are drawn from torch's global RNG (seed it, or
    use ``pyro_lvm.runtime.seeded``, for a reproducible start).
    """
    cls = MODELS[name]
    try:
        cfg = cls.Config(data_dim=data_dim, **config)
    except TypeError as e:  # an unknown keyword: name the valid ones
        import dataclasses

        valid = [f.name for f in dataclasses.fields(cls.Config)]
        raise ValueError(f"{name}: {e}; valid config fields: {', '.join(valid)}") from None
    return cls(cfg)


__all__ = [
    "ConfigError", "DataConfig", "Dataset", "EvalConfig", "FitResult", "Fitted", "GUIDES", "GuideConfig", "MODELS",
    "LatentModel", "TrainConfig", "TrainingError", "UnknownNameError", "__version__", "build_guide", "build_model",
    "evaluate", "fit", "from_array", "load", "load_dataset", "load_file", "local_params", "save",
    "to_inference_data", "wrap_model", "register_model", "data_plate",
]
