"""Variational families, swappable by name through :data:`GUIDES`.

Importing this package registers every family; ``build_guide("planar:10", model)`` builds one.
"""

from . import amortized, autoguides, flows, zuko_flows  # noqa: F401  (registers)
from .amortized import (
    AmortizedGuide,
    DiagonalGaussianGuide,
    ExactPosteriorGuide,
    FullCovGaussianGuide,
)
from .autoguides import AmortizedCategorical, AutoFlowNormal, GlobalGuide
from .config import GuideConfig
from .flows import FLOWS, AmortizedFlowGuide
from .registry import (
    GUIDES,
    GuideEntry,
    build_guide,
    check_guide,
    check_guide_belongs,
    guide_names,
    parse_guide_spec,
    register_guide,
    usable_guides,
)
from .zuko_flows import ZUKO_FLOWS, ZukoDistribution, ZukoFlowGuide

__all__ = [
    "AmortizedCategorical", "AutoFlowNormal", "GlobalGuide", "FLOWS", "GUIDES", "AmortizedFlowGuide",
    "AmortizedGuide", "DiagonalGaussianGuide",
    "ExactPosteriorGuide", "FullCovGaussianGuide", "GuideConfig", "GuideEntry", "build_guide", "guide_names",
    "parse_guide_spec", "register_guide", "check_guide", "check_guide_belongs", "usable_guides",
    "ZUKO_FLOWS", "ZukoFlowGuide", "ZukoDistribution",
]
