"""One seed, one result: every experiment run twice with the same ``--seed`` (once in another process, once in this
one, from different working directories, with ``--inspect`` where the experiment has it) writes the same
``results.json`` once its wall-clock timings are removed, and byte-identical ``.nc`` files (ArviZ's ``created_at``
stamp is not written).

The other process is forked from the session's warm interpreter (tests/cli_runner.py): a fresh interpreter with its
own hash seed that has made the heavy imports and run nothing, so nothing is seeded before the run; it runs while
this process makes its own run. (tests/test_resume.py's Ctrl-C test compares a fresh interpreter's numbers with a
forked one's.)

Each run is as small as the experiment allows (two epochs, a few test points): a few seconds."""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Any

import pytest
from cli_runner import WarmCLI
from conftest import write_fake_mnist

#: the keys of results.json that hold wall-clock measurements; exactly these are dropped (at any depth) before two
#: runs are compared:
#:
#: * ``train_seconds``: each results row (and baseline row: EM, scikit-learn) -- the fit's wall-clock time;
#: * ``seconds_per_epoch``: each results row -- train_seconds / epochs;
#: * ``restart_seconds``: gaussian_mixture's per-row list of each restart's train_seconds;
#: * ``seconds``: a row's ``inspect`` entry (the time --inspect took), inference_gaps' per-guide optimisation;
#: * ``nuts_seconds``: compare_posteriors' NUTS row.
#:
#: Keys that hold "seconds" or "time" but are settings, not measurements, are kept and compared:
#: ``config.train.checkpoint_seconds`` (how often a checkpoint is written) and ``config.train.ddp_timeout``. Any
#: other key holding "seconds" or "time" is reported by the test (:func:`_timing_like`), so that a new timing
#: field is named here rather than silently compared or dropped.
TIMING_KEYS = frozenset({"train_seconds", "seconds_per_epoch", "restart_seconds", "seconds", "nuts_seconds"})
SETTINGS = frozenset({"checkpoint_seconds", "ddp_timeout", "progress_seconds"})

#: .nc attributes that are wall-clock measurements, by file name and group: compare_posteriors' ``nuts.nc`` keeps
#: the time NUTS took (``posterior.attrs["seconds"]``), which a later run that reuses the file reports as the NUTS
#: row's ``train_seconds``. Such a file is compared with those attributes removed, rewritten by the same in-memory
#: writer (``pyro_lvm.posterior_report.netcdf_bytes``), byte for byte; every other .nc file as it is on disk.
NC_TIMINGS = {"nuts.nc": {"posterior": ("seconds",)}}

#: a few test points; 100 draws each, not fewer: the pair plot's 2-D KDE (arviz) costs more the fewer the draws (its
#: kernel widens with the bandwidth), seconds of CPU per figure at 6 draws
INSPECT = ["--inspect", "--inspect-points", "3", "--inspect-samples", "100"]


def _strip_timings(v: Any) -> Any:
    """``v`` (a loaded results.json) without the keys of :data:`TIMING_KEYS`, recursively."""
    if isinstance(v, dict):
        return {k: _strip_timings(x) for k, x in v.items() if k not in TIMING_KEYS}
    if isinstance(v, list):
        return [_strip_timings(x) for x in v]
    return v


def _timing_like(v: Any) -> set[str]:
    """Every key of ``v``, at any depth, that holds "seconds" or "time"."""
    if isinstance(v, dict):
        return {k for k in v if "seconds" in k or "time" in k} | {k for x in v.values() for k in _timing_like(x)}
    if isinstance(v, list):
        return {k for x in v for k in _timing_like(x)}
    return set()


def _run_twice(tmp_path: Path, experiment: str, args: list[str], cli: WarmCLI) -> tuple[Path, Path]:
    """``pyro_lvm.experiments.<experiment> *args --quiet --output out`` twice, from two working directories: once
    forked from the warm interpreter (see the module doc), once in this process, at the same time."""
    argv = [*args, "--quiet", "--output", "out"]
    a, b = tmp_path / "a", tmp_path / "b"
    for cwd in (a, b):
        cwd.mkdir()
    other = cli.submit(f"pyro_lvm.experiments.{experiment}", argv, a)
    with contextlib.chdir(b):
        assert importlib.import_module(f"pyro_lvm.experiments.{experiment}").main(argv) == 0
    proc = other.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return a / "out", b / "out"


def _assert_same(a: Path, b: Path, netcdf: int) -> dict[str, Any]:
    """The same results.json up to timings, the same .nc files (``netcdf`` of them at least), byte for byte."""
    doc_a, doc_b = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert _timing_like(doc_a) <= TIMING_KEYS | SETTINGS, _timing_like(doc_a) - TIMING_KEYS - SETTINGS
    assert _strip_timings(doc_a) == _strip_timings(doc_b)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nc"))
    assert len(files) >= netcdf, files
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.nc"))
    for name in files:
        assert _nc_bytes(a / name) == _nc_bytes(b / name), f"{name} differs between two runs of one seed"
    return doc_a


def _nc_bytes(path: Path) -> bytes:
    """The bytes of a .nc file, or, for one with wall-clock attributes (:data:`NC_TIMINGS`), of the file without
    them; the file written with no ``created_at`` stamp in either case."""
    timings = NC_TIMINGS.get(path.name)
    if timings is None:
        return path.read_bytes()
    import arviz as az

    from pyro_lvm.posterior_report import netcdf_bytes

    idata = az.from_netcdf(path)
    for group, keys in timings.items():
        attrs = getattr(idata, group).attrs
        assert set(keys) <= set(attrs), (path, group, keys)
        for key in keys:
            del attrs[key]
    assert all("created_at" not in getattr(idata, g).attrs for g in idata.groups()), path
    return netcdf_bytes(idata)


@pytest.fixture(scope="module")
def fa_runs(tmp_path_factory: pytest.TempPathFactory, warm_cli: WarmCLI) -> tuple[Path, Path]:
    """factor_analysis twice (its fits are also what inference_gaps scores)."""
    return _run_twice(tmp_path_factory.mktemp("fa"), "factor_analysis", [
        "--dataset", "wine", "--latent-dim", "2", "--guide", "exact,amortized", "--epochs", "2", "--iwae-k", "4",
        "--seed", "7", *INSPECT], warm_cli)


def test_factor_analysis_is_deterministic(fa_runs: tuple[Path, Path]) -> None:
    doc = _assert_same(*fa_runs, netcdf=2)  # exact.nc, amortized.nc
    assert [r["guide"] for r in doc["results"]] == ["exact", "amortized"]
    assert all("inspect" in r for r in doc["results"])


def test_gaussian_mixture_is_deterministic(tmp_path: Path, warm_cli: WarmCLI) -> None:
    a, b = _run_twice(tmp_path, "gaussian_mixture", [
        "--dataset", "synthetic_mixture", "--num-points", "40", "--epochs", "2", "--restarts", "1", "--guide",
        "meanfield", "--posterior-samples", "4", "--theta-samples", "21", "--iwae-k", "2", "--seed", "5", *INSPECT],
        warm_cli)
    _assert_same(a, b, netcdf=2)  # meanfield.nc (--inspect), meanfield_posterior.nc


def test_vae_is_deterministic(tmp_path: Path, warm_cli: WarmCLI) -> None:
    data = write_fake_mnist(tmp_path / "data")
    a, b = _run_twice(tmp_path, "vae", [
        "--data-dir", str(data), "--guide", "amortized", "--subset", "40", "--epochs", "2", "--hidden", "8",
        "--latent-dim", "2", "--iwae-k", "2", "--seed", "3", *INSPECT], warm_cli)
    _assert_same(a, b, netcdf=1)  # amortized.nc


def test_compare_posteriors_is_deterministic(tmp_path: Path, warm_cli: WarmCLI) -> None:
    a, b = _run_twice(tmp_path, "compare_posteriors", [
        "--model", "bayesian_fa", "--dataset", "synthetic", "--num-points", "40", "--data-dim", "3",
        "--latent-dim", "1", "--guide", "meanfield", "--epochs", "2", "--nuts-chains", "1", "--nuts-warmup", "10",
        "--nuts-samples", "10", "--posterior-samples", "21", "--iwae-k", "2", "--seed", "6", *INSPECT], warm_cli)
    _assert_same(a, b, netcdf=2)  # nuts.nc, meanfield_posterior.nc


def test_inference_gaps_is_deterministic(tmp_path: Path, fa_runs: tuple[Path, Path], warm_cli: WarmCLI) -> None:
    a, b = _run_twice(tmp_path, "inference_gaps", [
        "--model", "factor_analysis", "--guide", "exact,amortized", "--from-checkpoints", str(fa_runs[0]),
        "--points", "4", "--steps", "20", "--elbo-particles", "2", "--eval-particles", "8", "--iwae-k", "4",
        "--seed", "2"], warm_cli)
    doc = _assert_same(a, b, netcdf=0)
    assert [r["guide"] for r in doc["results"]] == ["exact", "amortized"]


def test_fit_of_a_users_function_is_deterministic(tmp_path: Path, warm_cli: WarmCLI) -> None:
    """``pyro-lvm fit`` on a function with global latents (Bayesian PCA: W under a prior, guided by ``meanfield``)
    and a local one, with --inspect: the same results and .nc bytes from one seed."""
    a, b = _run_twice(tmp_path, "fit", [
        "--model", "pyro_lvm.models.functions:bayesian_pca", "--dataset", "wine", "--guide", "amortized+meanfield",
        "--epochs", "2", "--iwae-k", "4", "--seed", "4", *INSPECT], warm_cli)
    doc = _assert_same(a, b, netcdf=1)  # amortized+meanfield's .nc
    assert [r["guide"] for r in doc["results"]] == ["amortized+meanfield"]
