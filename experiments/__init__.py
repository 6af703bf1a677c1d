"""Runnable studies: ``python -m pyro_lvm.experiments.<name>`` or ``pyro-lvm <name>``.

Importing this package registers every experiment in :data:`pyro_lvm.harness.EXPERIMENTS`.
"""

from . import factor_analysis, gaussian_mixture, quickstart, vae  # noqa: F401  (registers)
