"""Shared fixtures."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_lvm.runtime import cli_threads, default_dtype

# The suite is the caller here, so it may choose torch's thread count: one thread (or $PYRO_LVM_THREADS), the
# command line's default, because torch's own default oversubscribes a 2-core machine that another job shares
# (README, "Threads"); subprocess tests set OMP_NUM_THREADS=1 themselves.
torch.set_num_threads(cli_threads(None))


@pytest.fixture
def float64() -> Iterator[None]:
    """Run a test in float64, where closed forms are checked to ~1e-10; the caller's dtype is restored."""
    with default_dtype(torch.float64):
        yield


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    """A directory holding a 500-image-per-split ``binarized_mnist.npz`` in the real file's format."""
    return write_fake_mnist(tmp_path / "data")


def binary_data(n: int, d: int, seed: int = 0, flip: float = 0.1) -> torch.Tensor:
    """n 0/1 rows of width d: two random prototype patterns, each bit flipped with probability ``flip`` --
    structure a VAE learns quickly."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(2, d, generator=g) < 0.5).float()
    x = protos[torch.randint(0, 2, (n,), generator=g)]
    flips = torch.rand(n, d, generator=g) < flip
    return torch.where(flips, 1 - x, x)


def write_fake_mnist(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {k: np.packbits((rng.random((500, 784)) < 0.13).astype(np.uint8), axis=1)
              for k in ("train", "valid", "test")}
    directory.mkdir()
    np.savez_compressed(directory / "binarized_mnist.npz", **arrays)
    return directory


@pytest.fixture(autouse=True)
def no_global_side_effects() -> Iterator[None]:
    """Every test leaves Pyro's global settings and parameter store, and torch's thread count and default
    dtype, as it found them: the library changes no global state its caller did not ask it to."""
    import pyro

    before = (pyro.settings.get("module_local_params"), sorted(pyro.get_param_store().keys()),
              torch.get_num_threads(), torch.get_default_dtype())
    yield
    after = (pyro.settings.get("module_local_params"), sorted(pyro.get_param_store().keys()),
             torch.get_num_threads(), torch.get_default_dtype())
    assert after == before, f"global state changed: {before} -> {after}"


# ---------------------------------------------------------------------------------------------------------------
# the command line forked from one warm interpreter (tests/cli_runner.py), shared by every test that asks for it

_warm_cli: list = []


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the warm interpreter as soon as the collected tests are known to need it, so that its imports overlap
    the tests that run before the first one that uses it."""
    if any("warm_cli" in getattr(item, "fixturenames", ()) for item in items):
        _start_warm_cli(session.config)


def _start_warm_cli(config: pytest.Config):  # noqa: ANN202
    from cli_runner import WarmCLI

    if not _warm_cli:
        factory = getattr(config, "_tmp_path_factory", None)  # pytest's tmp_path_factory, outside a fixture
        root = factory.mktemp("warm_cli") if factory is not None else Path(tempfile.mkdtemp(prefix="warm_cli."))
        _warm_cli.append(WarmCLI(root))
    return _warm_cli[0]


@pytest.fixture(scope="session")
def warm_cli(pytestconfig: pytest.Config) -> Iterator[object]:
    """:class:`cli_runner.WarmCLI`: ``python -m ...`` forked from one warm interpreter (see tests/cli_runner.py)."""
    cli = _start_warm_cli(pytestconfig)
    yield cli
    cli.close()
    _warm_cli.clear()
