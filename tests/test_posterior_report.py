"""``--inspect`` (``pyro_lvm.posterior_report``): what it writes through the real command line, atomically, with no
global state changed; and how it picks the few latents it shows (the *focus*) from the posterior's dims.

The per-pair checks (every model × guide exports, summarises, plots, survives netCDF) are in test_inspect.py.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import pytest

from pyro_lvm import posterior_report as pr
from pyro_lvm.experiments import factor_analysis as fa_experiment

#: what --inspect writes per guide, and once per run
GUIDE_FILES = ("{}.nc", "{}_posterior.png", "{}_ppc.png", "{}_pair.png")
RUN_FILES = ("forest.png",)
#: one epoch, few draws: each inspected guide costs ~1 s, mostly drawing its three figures
FA = ["--dataset", "wine", "--latent-dim", "2", "--epochs", "1", "--iwae-k", "8", "--quiet"]
INSPECT = ["--inspect", "--inspect-points", "12", "--inspect-samples", "40"]


def _inspection_files(run: Path, tags: tuple[str, ...] = ("planar_2", "amortized")) -> list[str]:
    names = [p.format(tag) for tag in tags for p in GUIDE_FILES] + list(RUN_FILES)
    return [n for n in names if (run / n).exists()]


def _global_state() -> tuple[object, ...]:
    """What the library must leave alone: matplotlib's rcParams (read without resolving the backend: reading
    ``rcParams["backend"]`` picks one) and pyplot's figures, and the RNGs ArviZ's plot_ppc would draw from.
    (Not torch's: ``pyro_lvm.load``, which --resume uses for a finished guide, draws a fresh model's initial
    parameters from it before loading the saved ones.)"""
    import matplotlib

    rc = {k: dict.__getitem__(matplotlib.rcParams, k) for k in dict.keys(matplotlib.rcParams)}
    pyplot = sys.modules.get("matplotlib.pyplot")
    figures = pyplot.get_fignums() if pyplot is not None else []
    return rc, figures, np.random.get_state()[1].tobytes(), random.getstate()


def test_inspect_through_the_command_line(tmp_path: Path) -> None:
    """A run without --inspect writes no inspection file. Resumed with --inspect and a second guide, it inspects
    the guide that had finished uninspected (the resume path) and the new one after its evaluation (the path of
    every trained or --from-checkpoints guide): each guide's .nc loads, its three figures and the run's forest
    exist, each row has an ``inspect`` entry matching the file. No temporary file is left, and matplotlib's
    settings and NumPy's and Python's RNGs are as they were."""
    before = _global_state()
    assert fa_experiment.main([*FA, "--guide", "planar:2", "--output", str(tmp_path)]) == 0
    assert _inspection_files(tmp_path) == []
    assert "inspect" not in json.loads((tmp_path / "results.json").read_text())["results"][0]

    assert fa_experiment.main([*FA, "--guide", "planar:2,amortized", "--resume", str(tmp_path), *INSPECT]) == 0
    assert len(_inspection_files(tmp_path)) == 2 * len(GUIDE_FILES) + len(RUN_FILES)
    rows = {r["guide"]: r["inspect"] for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert list(rows) == ["planar:2", "amortized"]
    for spec, entry in rows.items():
        tag = spec.replace(":", "_")
        idata = az.from_netcdf(tmp_path / entry["netcdf"])
        assert entry["netcdf"] == f"{tag}.nc" and idata.posterior.attrs["guide"] == spec
        assert idata.posterior["z"].shape == (1, 40, 12, 2) and entry["num_points"] == 12
        assert entry["focus_points"] == idata.posterior["point"].values[:3].tolist()
        p0 = entry["focus_points"][0]
        assert len(entry["summary"]) == 3 * 2 and f"z[point: {p0}, latent: 1]" in entry["summary"]
        assert entry["summary"][f"z[point: {p0}, latent: 0]"]["mean"] == pytest.approx(
            float(idata.posterior["z"].sel(point=p0, latent=0).mean()), abs=1e-12)
        psis = entry["psis_means"]["z"]
        k = idata.sample_stats["pareto_k"].values
        assert psis["points_inspected"] == 12 and psis["trusted_points"] == int((k <= 0.7).sum())
        assert entry["pareto_k"]["pareto_k_max"] == pytest.approx(k.max())
        assert entry["figures"] == [f"{tag}_posterior.png", f"{tag}_ppc.png", f"{tag}_pair.png"]
        for name in entry["figures"]:
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob(".*.tmp"))
    assert _global_state() == before


class _Failing(Exception):
    pass


def test_write_netcdf_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies half-way leaves the previous file whole under the final name and no temporary file.
    ``write_netcdf`` makes the .nc bytes in memory and hands them to ``pyro_lvm.report.atomic_write``, which opens
    a temporary file with the builtin ``open``: that open, seen from ``pyro_lvm.report``, gives a file whose
    ``write`` writes half the bytes (really, to the temporary file) and then raises."""
    import builtins

    from pyro_lvm import report

    idata = az.from_dict(posterior={"a": np.arange(20.0).reshape(1, 10, 2)})
    path = pr.write_netcdf(idata, tmp_path / "fit.nc")
    old = path.read_bytes()
    bigger = az.from_dict(posterior={"a": np.arange(40.0).reshape(1, 20, 2)})
    new = pr.netcdf_bytes(bigger)
    assert new != old
    written: list[tuple[str, int]] = []

    class HalfThenDie:
        def __init__(self, file: Any) -> None:
            self.file = file

        def __enter__(self) -> HalfThenDie:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, data: bytes) -> int:
            self.file.write(data[:len(data) // 2])
            self.file.flush()
            written.append((self.file.name, Path(self.file.name).stat().st_size))
            raise _Failing

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(file, mode, *args, **kwargs)
        return HalfThenDie(f) if "w" in mode else f

    monkeypatch.setattr(report, "open", fake_open, raising=False)
    with pytest.raises(_Failing):
        pr.write_netcdf(bigger, path)
    # the half was written, to a temporary file beside the target, never to fit.nc itself
    [(tmp, size)] = written
    assert Path(tmp).parent == tmp_path and Path(tmp).name != "fit.nc" and size == len(new) // 2 > 0
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["fit.nc"]
    np.testing.assert_array_equal(az.from_netcdf(path).posterior["a"].values, idata.posterior["a"].values)

    # with no earlier file, the failed write leaves nothing at all
    written.clear()
    with pytest.raises(_Failing):
        pr.write_netcdf(idata, tmp_path / "fresh.nc")
    assert len(written) == 1 and [p.name for p in tmp_path.iterdir()] == ["fit.nc"]


def _posterior(**shapes: tuple[tuple[str, ...], tuple[int, ...]]) -> object:
    rng = np.random.default_rng(0)
    values = {k: rng.normal(size=(1, 5, *shape)) for k, (_, shape) in shapes.items()}
    return az.from_dict(posterior=values, dims={k: list(dims) for k, (dims, _) in shapes.items()}).posterior


def test_the_focus_is_read_from_the_dims() -> None:
    """Globals where there are any, smallest first within the budget (the mixture: weights, then means); else the
    local latents of the first points; a global too big alone is cut to its leading entries; nothing to show is
    a ValueError. No site name is assumed."""
    mixture = _posterior(locs=(("component", "feature"), (3, 4)), weights=(("component",), (3,)),
                         scales=(("component", "feature"), (3, 4)), c=(("point",), (7,)))
    f = pr.focus_of(mixture)
    assert f.var_names == ("weights", "locs") and not f.local and f.keep == {}  # 3 + 12 <= 16 < 3 + 12 + 12
    assert pr.focus_of(mixture, budget=6).var_names == ("weights",)
    local = _posterior(h=(("point", "latent"), (7, 5)))
    f = pr.focus_of(local)
    assert f.local and f.var_names == ("h",) and f.select(local)["h"].shape == (1, 5, 3, 2)
    big = _posterior(W=(("feature", "latent"), (10, 3)), v=(("point", "latent"), (7, 5)))
    f = pr.focus_of(big, budget=4)
    assert f.var_names == ("W",) and f.select(big)["W"].shape == (1, 5, 4, 1)
    with pytest.raises(ValueError, match="no global or continuous local latent"):
        pr.focus_of(_posterior(c=(("point",), (7,))).astype(np.int64))


def test_ppc_statistics_reduce_wide_data_to_a_per_point_mean() -> None:
    """Narrow data: the per-point mean and the first features; wide data (images): the per-point mean only."""
    rng = np.random.default_rng(0)
    for width, names in ((5, ["mean over features", "x[0]", "x[1]", "x[2]"]), (784, ["mean over features"])):
        idata = az.from_dict(posterior_predictive={"x": rng.random((1, 60, 4, width))},
                             observed_data={"x": rng.random((4, width))},
                             dims={"x": ["point", "feature"]})
        stats = pr.ppc_statistics(idata)
        assert list(stats.observed_data.data_vars) == names
        obs = stats.observed_data["mean over features"].values
        np.testing.assert_allclose(obs, idata.observed_data["x"].values.mean(-1))
        assert stats.posterior_predictive["mean over features"].shape == (1, pr.PPC_DRAWS, 4)


def test_inspection_points_are_seeded_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    state = np.random.get_state()[1].copy()
    a = pr.inspection_points(200, 1000, 200, 830, seed=3)
    assert len(a) == 200 and len(set(a.tolist())) == 200 and a.max() < 1000
    np.testing.assert_array_equal(a, pr.inspection_points(200, 1000, 200, 830, seed=3))
    assert not np.array_equal(a, pr.inspection_points(200, 1000, 200, 830, seed=4))
    assert len(pr.inspection_points(200, 50, 200, 830, seed=3)) == 50
    monkeypatch.setattr("pyro_lvm.inspect.MAX_VALUES", 200 * 830 * 10)  # room for 10 points of 830 numbers x 200
    assert len(pr.inspection_points(200, 1000, 200, 830, seed=3)) == 10
    assert np.array_equal(state, np.random.get_state()[1])


def test_the_focus_shows_the_most_active_latents_not_the_first() -> None:
    """A VAE's latents are mostly inactive (their posterior means do not vary over points): the figures show the
    ones that vary most, here latents 5 and 2 of 8, in that order."""
    import xarray as xr

    from pyro_lvm.posterior_report import focus_of

    rng = np.random.default_rng(0)
    spread = np.zeros(8)
    spread[5], spread[2] = 3.0, 1.0
    means = rng.normal(size=(6, 8)) * spread  # (point, latent): only latents 5 and 2 move between points
    draws = means[None, None] + 0.1 * rng.normal(size=(1, 40, 6, 8))
    posterior = xr.Dataset({"z": (("chain", "draw", "point", "latent"), draws)})
    focus = focus_of(posterior, latents=2)
    assert focus.local and focus.keep["latent"] == (5, 2)
    assert focus.select(posterior)["z"].sizes == {"chain": 1, "draw": 40, "point": 3, "latent": 2}
