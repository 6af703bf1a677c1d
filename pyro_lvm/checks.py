"""Input checks at the boundary: one clear ``ValueError`` that says what is wrong and where."""

from __future__ import annotations

import torch


def check_matrix(x: object, *, name: str = "data", width: int | None = None) -> torch.Tensor:
    """Return ``x`` as a 2-D floating tensor or raise a ``ValueError`` that says what is wrong."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # noqa: BLE001 - anything torch cannot read is bad input
            raise ValueError(f"{name}: cannot be read as a numeric array ({e})") from None
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D array (points x features), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 points)")
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name}: expected {width} features per point, got {x.shape[1]}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(-1).nonzero().flatten()
        kinds = "NaN" if torch.isnan(x).any() else "inf"
        raise ValueError(
            f"{name}: contains {kinds} values in {len(rows)} of {x.shape[0]} rows "
            f"(first bad row: {int(rows[0])}); clean or impute the data first"
        )
    return x


__all__ = ["check_matrix"]
