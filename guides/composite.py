r"""A guide pair for models with per-point latents and global latent sites: ``LOCAL+GLOBAL``.

    q(θ, z_{1:N} | x) = q(θ) · Π_n q(z_n | x_n)

q(θ) is an autoguide over the model's global latent sites (``map``, ``meanfield``, ``fullrank``, ``lowrank:R``,
``auto-iaf:K``; :class:`~pyro_lvm.guides.GlobalGuide`), q(z_n | x_n) any amortized family over the point's local
vector. The local family does not see θ: it amortizes over the data alone, as an encoder does beside a decoder's
point-estimated weights, so a held-out point is scored in one pass of the encoder whatever q(θ) is.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.nn import PyroModule


class LocalGlobalGuide(PyroModule):
    """``local`` (an amortized guide over the per-point sites) beside ``global_part`` (a
    :class:`~pyro_lvm.guides.GlobalGuide` over the global latent sites). Called as every guide is,
    ``guide(x, total_size)``: q(θ) first, then q(z|x). Everything a local guide offers downstream (``encode``,
    ``distribution``, ...) is the local guide's; the globals' draws and point estimate are the global part's."""

    def __init__(self, local: PyroModule, global_part: PyroModule) -> None:
        super().__init__()
        self.local = local
        self.global_part = global_part

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> Any:
        theta = self.global_part(x, total_size)
        self.local(x, total_size)
        return theta

    def init_from_data(self, x: torch.Tensor) -> None:
        for part in (self.global_part, self.local):
            hook = getattr(part, "init_from_data", None)
            if hook is not None:
                hook(x)

    # -- the globals
    @property
    def is_point_mass(self) -> bool:
        return bool(self.global_part.is_point_mass)

    def sample_globals(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One draw θ ~ q(θ) of every global latent site (constrained values)."""
        return self.global_part.sample_globals(x)

    def point_estimate(self, x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """θ̂: the MAP point for ``map``, the image of the base median for the others."""
        return self.global_part.point_estimate(x)

    # -- the points
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("local", "global_part"):
                raise
            return getattr(self._modules["local"], name)


__all__ = ["LocalGlobalGuide"]
