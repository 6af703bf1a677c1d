"""Generative latent-variable models written as Pyro model functions.

Each model is a :class:`~pyro_lvm.models.base.LatentModel` registered by name in :data:`MODELS`;
importing this package registers every model family and changes no global setting.
"""

from pyro_lvm.registry import MODELS, Registry, UnknownNameError, register_model

from . import bayesian_fa, factor_analysis, gaussian_mixture, vae  # noqa: F401  (registers)
from .base import DATA_PLATE, LatentModel, ModelTraits, check_matrix, data_plate
from .factor_analysis import PPCA, FactorAnalysis, FactorAnalysisConfig
from .gaussian_mixture import ASSIGNMENTS, COVARIANCES, GaussianMixture, GaussianMixtureConfig
from .vae import DECODERS, PRIORS, VAE, VAEConfig

__all__ = [
    "ASSIGNMENTS", "COVARIANCES", "GaussianMixture", "GaussianMixtureConfig", "ModelTraits",
    "DATA_PLATE", "MODELS", "PPCA", "FactorAnalysis", "FactorAnalysisConfig", "LatentModel", "Registry",
    "UnknownNameError", "check_matrix", "data_plate", "register_model", "DECODERS", "PRIORS", "VAE", "VAEConfig",
]
