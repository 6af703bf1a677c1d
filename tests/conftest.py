"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from experiments.train import default_dtype


@pytest.fixture
def float64() -> Iterator[None]:
    """Run a test in float64, where closed forms are checked to ~1e-10; the caller's dtype is restored."""
    with default_dtype(torch.float64):
        yield
