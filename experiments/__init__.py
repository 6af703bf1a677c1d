"""Runnable studies: ``python -m pyro_lvm.experiments.<name>`` or ``pyro-lvm <name>``.

Importing this package imports no study (so ``python -m pyro_lvm.experiments.vae`` runs the module once);
:func:`load_all` imports every one, which registers it in :data:`pyro_lvm.harness.EXPERIMENTS`.
"""

import importlib

#: the modules that define experiments (each registers one with ``@register_experiment``)
MODULES = ("factor_analysis", "gaussian_mixture", "vae", "compare_posteriors", "fit")

#: studies that are not a fit-then-evaluate experiment of the harness: ``pyro-lvm NAME`` runs the module's ``main``
STANDALONE = ("quickstart", "inference_gaps")


def load_all() -> None:
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")
