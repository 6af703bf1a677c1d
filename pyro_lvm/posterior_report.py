r"""A fit's posterior at a glance: a few points' latents as a table and figures, written next to its results.

What an experiment's ``--inspect`` writes for each guide (:func:`inspect_fit`), from the ArviZ
``InferenceData`` of :func:`pyro_lvm.to_inference_data` on a seeded random subset of the test split:

* ``<guide>.nc``: the InferenceData (netCDF, written atomically: a killed run leaves the old file or none);
* ``<guide>_posterior.png``: ``az.plot_posterior`` of the *focus* (below);
* ``<guide>_ppc.png``: ``az.plot_ppc``, the observed points against data replicated from their posteriors,
  as the distribution over the inspected points of a per-point statistic (see :func:`plot_ppc`);
* ``<guide>_pair.png``: ``az.plot_pair`` of one point's latent posterior (its first :data:`PAIR_LATENTS`
  dims; where a flow's non-Gaussian shape, or a diagonal guide's missing correlation, shows);
* a results-row entry (:func:`inspect_fit`'s return): ``az.summary`` of the focus, k̂ summaries, and the guide's
  raw posterior means against their PSIS-corrected values;

and once per run (:func:`plot_forest`) ``forest.png``: ``az.plot_forest`` of the focus across every guide.

The *focus* (:func:`focus_of`) is what the guides are posteriors over, read from the posterior's dims, never
from a site name: a model with global latents (variables without a ``point`` dim: the mixture's θ) is shown
by its smallest global variables, at most :data:`GLOBAL_BUDGET` numbers (the mixture: its weights and
component means); a model whose only latents are local (a float variable whose first dim after the draws is
``point``, e.g. ``z``) by its first :data:`FOCUS_POINTS` inspected points and their first
:data:`FOCUS_LATENTS` latent dims.

Figures are drawn on ``matplotlib.figure.Figure`` objects (``pyro_lvm.report.new_figure``'s object API, no
pyplot figure), inside ``matplotlib.rc_context`` and ``pyro_lvm.runtime.seeded``, so the caller's backend,
rcParams and RNG states (ArviZ's ``plot_ppc`` draws from NumPy's global RNG) are as they were afterwards.
ArviZ and matplotlib are imported inside the functions (importing ArviZ takes seconds).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pyro_lvm.inspect as lvm_inspect
from pyro_lvm.evaluate import PARETO_K_THRESHOLD, pareto_k_summary
from pyro_lvm.inspect import to_inference_data
from pyro_lvm.models.base import in_data_plate
from pyro_lvm.report import atomic_write
from pyro_lvm.runtime import local_params, seeded

#: inspected points whose local latents the summary, the posterior figure and the forest show
FOCUS_POINTS = 3
#: latent dims shown per point (the first ones)
FOCUS_LATENTS = 2
#: latent dims of the one point in the pair plot
PAIR_LATENTS = 4
#: most numbers of global latents in the summary and the forest (the mixture's weights and means: K + K·D)
GLOBAL_BUDGET = 16
#: ... in the posterior figure (the mixture: its weights) and the pair plot
GLOBAL_FIGURE_BUDGET = 6
PAIR_GLOBAL_BUDGET = 4
#: data at most this wide also get one PPC panel for each of their first :data:`PPC_FEATURES` features
PPC_MAX_DIM = 32
PPC_FEATURES = 3
#: replicated data sets drawn in the PPC (the first draws; each is an independent posterior draw)
PPC_DRAWS = 50
#: fewer inspected points than this: the PPC compares ECDFs, not KDEs
PPC_KDE_MIN_POINTS = 10


@dataclass(frozen=True)
class Focus:
    """The few latents a summary or figure shows: variables, and the leading entries kept of each dim."""

    var_names: tuple[str, ...]
    #: dim -> how many of its leading entries are kept, or which entries (dims not named are kept whole)
    keep: dict[str, int | tuple[int, ...]] = field(default_factory=dict)
    #: whether the variables are per-point (local) latents
    local: bool = True

    def select(self, posterior: Any) -> Any:
        """``posterior`` (an xarray Dataset with chain and draw dims) cut to the focus."""
        sub = posterior[list(self.var_names)]
        return sub.isel({d: slice(0, n) if isinstance(n, int) else list(n)
                         for d, n in self.keep.items() if d in sub.dims})


def _is_local(da: Any) -> bool:
    return da.dims[2:3] == ("point",) and np.issubdtype(da.dtype, np.floating)


def focus_of(posterior: Any, *, points: int = FOCUS_POINTS, latents: int = FOCUS_LATENTS,
             budget: int = GLOBAL_BUDGET) -> Focus:
    r"""Which latents of ``posterior`` (chain, draw, ...) to show, read from its dims: what the guides differ in.

    A model with global latents (variables without a ``point`` dim: the mixture's θ, a Bayesian factor
    model's W, μ, Ψ), whose guides are posteriors over them, is shown by its smallest global variables while
    their numbers per draw add up to at most ``budget``; a first variable larger than ``budget`` is cut to
    the leading entries of its dims (each dim keeps at most ``budget`` / (what the dims before it keep)).
    Otherwise its continuous local latents (float, first dim ``point``: ``z``): every such variable, its first
    ``points`` points and, of its first latent dim, the ``latents`` most active entries (largest variance over the
    inspected points of their posterior means: a VAE's 40 latents are mostly inactive, and latents 0–3 may all be),
    of any further dim the first ``latents``. Raises ``ValueError`` when the posterior has neither.
    """
    names = list(posterior.data_vars)
    glob = [v for v in names if "point" not in posterior[v].dims]
    if not glob:
        local = [v for v in names if _is_local(posterior[v])]
        if not local:
            raise ValueError(f"posterior: no global or continuous local latent to show among {names}")
        keep: dict[str, int | tuple[int, ...]] = {"point": points}
        for v in local:
            dims = posterior[v].dims[3:]
            keep.update({d: latents for d in dims})
            if dims and posterior.sizes[dims[0]] > latents:
                means = posterior[v].mean(("chain", "draw"))  # (point, dim0, ...)
                activity = means.var("point").values.reshape(posterior.sizes[dims[0]], -1).max(-1)
                keep[dims[0]] = tuple(int(i) for i in np.argsort(-activity, kind="stable")[:latents])
        return Focus(tuple(local), keep, local=True)
    size = {v: math.prod(posterior[v].shape[2:]) for v in glob}
    chosen: list[str] = []
    for v in sorted(glob, key=lambda v: size[v]):  # stable: ties keep the posterior's order
        if chosen and sum(size[c] for c in chosen) + size[v] > budget:
            break
        chosen.append(v)
    keep = {}
    if size[chosen[0]] > budget:  # one variable, too big: its leading entries
        kept = 1
        for d in posterior[chosen[0]].dims[2:]:
            keep[d] = min(posterior.sizes[d], max(1, budget // kept))
            kept *= keep[d]
    return Focus(tuple(chosen), keep, local=False)


def inspection_points(num_points: int, available: int, num_samples: int, width: int, seed: int) -> np.ndarray:
    """Indices of up to ``num_points`` of ``available`` points, by a permutation seeded with ``seed`` (the
    caller's RNG untouched), no more than :data:`pyro_lvm.inspect.MAX_VALUES` allows at ``num_samples`` draws
    of ``width`` numbers per point (data dim + latent dim + 4)."""
    most = max(1, lvm_inspect.MAX_VALUES // (num_samples * width))  # read here: a test may lower it
    return np.random.default_rng(seed).permutation(available)[:min(num_points, available, most)]


# ---------------------------------------------------------------------------------------------- numbers


def summary(idata: Any, focus: Focus) -> dict[str, dict[str, float]]:
    """``az.summary`` (mean, sd, 94% HDI) of the focus, as {label: {statistic: value}}; labels name dims and
    coordinates, e.g. ``z[point: 17, latent: 0]``."""
    import arviz as az

    table = az.summary(focus.select(idata.posterior), kind="stats", round_to="none",
                       labeller=az.labels.DimCoordLabeller())
    return {str(label): {k: float(v) for k, v in row.items()} for label, row in table.iterrows()}


def psis_mean_report(idata: Any, points: int = FOCUS_POINTS, latents: int = FOCUS_LATENTS) -> dict[str, Any]:
    r"""The guide's raw posterior means against their PSIS-corrected values (``sample_stats.<v>_mean_raw`` and
    ``<v>_mean_psis`` of :func:`pyro_lvm.to_inference_data`), per continuous local latent ``v``.

    For the first ``points`` points: both means (first ``latents`` dims) and k̂. Over every inspected point
    with k̂ ≤ 0.7 (the corrected mean is NaN elsewhere): ``max_abs_diff`` = max |raw − corrected| over points
    and dims, and ``max_abs_diff_sd`` the same in units of the guide's posterior sd of that dim (``None``
    when no point qualifies); ``trusted_points`` of ``points_inspected``. Empty for models without one.
    """
    stats, k = idata.sample_stats, idata.sample_stats["pareto_k"].values
    trusted = k <= PARETO_K_THRESHOLD
    out: dict[str, Any] = {}
    for name in idata.posterior.data_vars:
        if f"{name}_mean_psis" not in stats:
            continue
        raw, corrected = stats[f"{name}_mean_raw"].values, stats[f"{name}_mean_psis"].values
        sd = idata.posterior[name].values[0].std(0)  # (point, ...) over the draws of the one chain
        diff = np.abs(raw - corrected)[trusted]
        rel = (diff / np.where(sd[trusted] > 0, sd[trusted], np.nan)) if diff.size else diff
        first = {str(p): {"raw": _flat(raw[i], latents), "psis": _flat(corrected[i], latents), "pareto_k": float(k[i])}
                 for i, p in enumerate(idata.posterior["point"].values[:points])}
        out[name] = {"points": first,
                     "max_abs_diff": float(diff.max()) if diff.size else None,
                     "max_abs_diff_sd": float(np.nanmax(rel)) if diff.size and np.isfinite(rel).any() else None,
                     "trusted_points": int(trusted.sum()), "points_inspected": int(k.size)}
    return out


def _flat(v: np.ndarray, n: int) -> list[float]:
    return [float(x) for x in np.ravel(v)[:n]]


# ---------------------------------------------------------------------------------------------- files


def write_netcdf(idata: Any, path: str | Path) -> Path:
    """``idata.to_netcdf``, written atomically (:func:`pyro_lvm.report.atomic_write`): a reader, a crash or
    ``kill -9`` sees the old file or the new one, never half of one. The netCDF is made in memory
    (:func:`netcdf_bytes`) and only its bytes go to disk, by Python: HDF5 writing to a full disk can crash the
    process (a segmentation fault), where a Python write raises an error that becomes one line
    (:class:`pyro_lvm.report.WriteError`: disk full, nothing half-written left)."""
    data = netcdf_bytes(idata)
    return atomic_write(path, lambda f: f.write(data), binary=True)


def netcdf_bytes(idata: Any) -> bytes:
    """The bytes of ``idata.to_netcdf(path)`` (ArviZ's defaults: h5netcdf, compressed), made in memory: the run's
    attributes at the root, each group as a netCDF group."""
    import io

    import xarray as xr
    from arviz.data.inference_data import _compressible_dtype

    buffer = io.BytesIO()
    mode = "w"
    attrs = dict(idata.attrs) if getattr(idata, "attrs", None) else {}
    if attrs:
        xr.Dataset(attrs=attrs).to_netcdf(buffer, mode=mode, engine="h5netcdf", group="/")
        mode = "a"
    for group in idata.groups():
        data = getattr(idata, group)
        encoding = {name: {"zlib": True} for name, v in data.variables.items() if _compressible_dtype(v.dtype)}
        data.to_netcdf(buffer, mode=mode, group=group, engine="h5netcdf", encoding=encoding)
        mode = "a"
    if mode == "w":  # an empty InferenceData: an empty netCDF file, as ArviZ writes it
        import h5netcdf

        h5netcdf.File(buffer, mode="w").close()
    return buffer.getvalue()


@contextlib.contextmanager
def _drawing() -> Iterator[None]:
    """ArviZ plotting with the caller's matplotlib settings and RNG states restored afterwards (``plot_ppc``
    draws its replicates with NumPy's global RNG; seeded here, so figures are reproducible)."""
    import matplotlib

    # a fixed legend corner: "best" (the default) searches every line's vertices at each draw, ~1 s for a PPC
    with matplotlib.rc_context({"legend.loc": "upper right"}), seeded(0), np.errstate(all="ignore"):
        yield


def _save(fig: Any, path: str | Path) -> Path:
    """Save a figure atomically (a killed run leaves no half-written PNG) and release it."""
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    fig.clear()
    return Path(path)


def _figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Any, np.ndarray]:
    """A ``Figure`` (no pyplot) with an (nrows, ncols) array of axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width * ncols, 6.4), height * nrows))  # at least as wide as a title needs
    return fig, np.asarray(fig.subplots(nrows, ncols, squeeze=False))


def _count(ds: Any) -> int:
    """Numbers per draw in a Dataset (chain, draw, ...): the panels a plot of it has."""
    return sum(math.prod(ds[v].shape[2:]) for v in ds.data_vars)


def _constant(ds: Any) -> bool:
    """Every variable equal in every draw to within rounding (a point-mass guide such as ``map``, whose float32
    draws differ by ~1e-7 through its transforms): there is no density to estimate."""
    for v in ds.data_vars:
        a = ds[v].values
        tol = math.sqrt(np.finfo(a.dtype).eps) * np.maximum(1.0, np.abs(a).max((0, 1)))
        if (np.ptp(a, axis=(0, 1)) > tol).any():
            return False
    return True


def _labels(ds: Any) -> tuple[list[str], np.ndarray]:
    """Every number of a Dataset (chain, draw, ...) as (``name[dim: coord, ...]`` labels, its first draw)."""
    labels, values = [], []
    for v in ds.data_vars:
        da = ds[v]
        dims = da.dims[2:]
        for idx in np.ndindex(*da.shape[2:]):
            where = ", ".join(f"{d}: {da[d].values[i]}" for d, i in zip(dims, idx, strict=True))
            labels.append(f"{v}[{where}]" if where else v)
            values.append(float(da.values[(0, 0, *idx)]))
    return labels, np.asarray(values)


def _point_mass(ds: Any, path: str | Path, title: str) -> Path:
    """A point-mass posterior (every draw equal) as its values: one row per number."""
    labels, values = _labels(ds)
    fig, axes = _figure(1, 1, 6.0, 0.3 * len(labels) + 1.2)
    ax = axes[0, 0]
    ax.plot(values, np.arange(len(values)), "o")
    ax.set_yticks(np.arange(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.15, y=0.15)
    ax.grid(alpha=0.3)
    ax.set_title("the guide is a point mass: every draw is this value", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _title(prefix: str, what: str) -> str:
    """A figure's title: what it shows, after the caller's ``prefix`` (the run and the guide) when given."""
    return f"{prefix}: {what}" if prefix else what


def plot_posterior(idata: Any, path: str | Path, title: str = "", exact: Any = None,
                   prior: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """``az.plot_posterior`` (density, mean, 94% HDI) of the focus: 3 points × 2 latent dims, or the globals
    (the mixture: its weights). A point-mass guide (every draw equal) gets its values instead.

    What to compare against, where there is something: each point's panel is titled with its k̂, in red above
    0.7 (the guide is not to be trusted there); ``exact`` (the model's exact posterior p(z | x) of the inspected
    points, a distribution with batch (points,) and event (latents,): factor analysis) is drawn over each panel
    as its exact marginal, dashed; ``prior`` (a local variable's name -> the (loc, scale) of the normal prior of
    each of its latents, ``{"z": (0.0, 1.0)}`` where p(z) is standard normal: :func:`normal_priors`) is drawn over
    its panels as a grey dashed density labelled ``prior``, to show how far each posterior moved from it."""
    import arviz as az

    focus = focus_of(idata.posterior, budget=GLOBAL_FIGURE_BUDGET)
    ds = focus.select(idata.posterior)
    title = _title(title, "posterior of " + ("a few test points' latents" if focus.local else "the global latents"))
    n = _count(ds)
    ncols = min(n, FOCUS_LATENTS if n % FOCUS_LATENTS == 0 else 3)
    with _drawing():
        if _constant(ds):
            return _point_mass(ds, path, title)
        fig, axes = _figure(math.ceil(n / ncols), ncols, 3.6, 2.6)
        for ax in axes.ravel()[n:]:
            ax.set_axis_off()
        az.plot_posterior(ds, ax=axes.ravel()[:n], textsize=9, show=False, labeller=az.labels.DimCoordLabeller())
        if focus.local:
            _mark_reference(idata, ds, axes.ravel()[:n], exact, prior or {})
        fig.suptitle(title, fontsize=10)
        return _save(fig, path)


def _mark_reference(idata: Any, ds: Any, axes: Sequence[Any], exact: Any,
                    prior: Mapping[str, tuple[float, float]]) -> None:
    """Per panel of a local latent (ArviZ's order: variable, then each coordinate in C order): its point's k̂ in the
    title (red above :data:`PARETO_K_THRESHOLD`), given ``exact`` the exact marginal density, dashed, and where
    ``prior`` names the variable its normal prior density, dashed grey."""
    from scipy import stats

    k_of = dict(zip(idata.sample_stats["point"].values.tolist(), idata.sample_stats["pareto_k"].values.tolist(),
                    strict=True))
    points = idata.posterior["point"].values.tolist()
    panels = []
    for v in ds.data_vars:
        da = ds[v]
        extra = da.dims[3:]
        for p in da["point"].values.tolist():
            for idx in np.ndindex(*[da.sizes[d] for d in extra]):
                coords = [int(da[d].values[i]) for d, i in zip(extra, idx, strict=True)]
                panels.append((v, int(p), coords))
    for ax, (v, p, coords) in zip(axes, panels, strict=False):
        k = k_of.get(p, float("nan"))
        bad = np.isfinite(k) and k > PARETO_K_THRESHOLD
        ax.set_title(f"{ax.get_title()}\nk̂ = {k:.2f}" if np.isfinite(k) else ax.get_title(), fontsize=8,
                     color="tab:red" if bad else "black")
        if exact is not None and len(coords) == 1:
            i = points.index(p)
            loc = float(exact.mean[i, coords[0]])
            sd = float(exact.covariance_matrix[i, coords[0], coords[0]].sqrt())
            lo, hi = ax.get_xlim()
            lo, hi = min(lo, loc - 3 * sd), max(hi, loc + 3 * sd)  # the whole exact marginal, however wide
            grid = np.linspace(lo, hi, 300)
            ax.plot(grid, stats.norm.pdf(grid, loc, sd), "--", color="tab:orange", lw=1.2, label="exact p(z|x)")
            ax.set_xlim(lo, hi)
        if v in prior:  # over the panel's range as it is: a wide prior's tails run off it, the posterior stays legible
            loc, sd = prior[v]
            grid = np.linspace(*ax.get_xlim(), 300)
            ax.plot(grid, stats.norm.pdf(grid, loc, sd), "--", color="tab:gray", lw=1.0,
                    label=f"prior N({loc:g}, {sd:g}²)" if sd != 1 else f"prior N({loc:g}, 1)")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7, loc="upper right", frameon=False)


def plot_pair(idata: Any, path: str | Path, title: str = "") -> Path:
    """``az.plot_pair`` (scatter + KDE contours, marginals on the diagonal) of the first inspected point's
    first :data:`PAIR_LATENTS` latent dims, or the first :data:`PAIR_GLOBAL_BUDGET` global numbers. A
    point-mass guide gets its values instead."""
    import arviz as az

    focus = focus_of(idata.posterior, points=1, latents=PAIR_LATENTS, budget=PAIR_GLOBAL_BUDGET)
    ds = focus.select(idata.posterior)
    title = _title(title, "joint posterior of " + ("one test point's latents" if focus.local else "the global latents"))
    n = _count(ds)
    with _drawing():
        if _constant(ds):
            return _point_mass(ds, path, title)
        if n < 2:  # one number: its density is all there is
            fig, axes = _figure(1, 1, 4.5, 3.5)
            az.plot_posterior(ds, ax=axes[0, 0], textsize=9, show=False, labeller=az.labels.DimCoordLabeller())
        else:
            fig, axes = _figure(n, n, 2.4, 2.4)
            # the 2-D KDE's 30/60/90% highest-density regions, the draws on top of them
            az.plot_pair(ds, kind=["scatter", "kde"], marginals=True, ax=axes, textsize=8, show=False,
                         scatter_kwargs={"alpha": 0.4, "s": 3, "color": "k", "zorder": 3},
                         kde_kwargs={"hdi_probs": [0.3, 0.6, 0.9]},
                         labeller=az.labels.DimCoordLabeller())
        fig.suptitle(title, fontsize=10)
        return _save(fig, path)


def ppc_statistics(idata: Any) -> Any:
    r"""The posterior predictive check's per-point statistics T(x_n) as InferenceData (observed_data and
    posterior_predictive, the first :data:`PPC_DRAWS` draws).

    ``mean over features`` = (1/D) Σ_d x_{n,d} for every data set (for binary images the fraction of pixels
    on, for standardized data the point's mean level): a PPC over the raw values of hundreds of pixels pools
    numbers whose distributions differ by pixel, and says nothing. Data at most :data:`PPC_MAX_DIM` features
    wide also get ``x[<feature>]``, the values of each of the first :data:`PPC_FEATURES` features. Each
    panel compares the distribution of T over the inspected points with that of T over their replicates.
    """
    import arviz as az
    import xarray as xr

    obs, rep = idata.observed_data["x"], idata.posterior_predictive["x"]
    rep = rep.isel(draw=slice(0, PPC_DRAWS))
    stats = {"mean over features": (obs.mean("feature"), rep.mean("feature"))}
    if obs.sizes["feature"] <= PPC_MAX_DIM:
        for f in obs["feature"].values[:PPC_FEATURES]:
            stats[f"x[{f}]"] = (obs.sel(feature=f, drop=True), rep.sel(feature=f, drop=True))
    return az.InferenceData(observed_data=xr.Dataset({k: v[0] for k, v in stats.items()}),
                            posterior_predictive=xr.Dataset({k: v[1] for k, v in stats.items()}))


def plot_ppc(idata: Any, path: str | Path, title: str = "") -> Path:
    """``az.plot_ppc`` of :func:`ppc_statistics`: one panel per statistic, the observed distribution (black)
    over the replicated ones."""
    import arviz as az

    stats = ppc_statistics(idata)
    n = len(stats.observed_data.data_vars)
    with _drawing():
        ncols = 2 if n == 4 else min(n, 3)
        fig, axes = _figure(math.ceil(n / ncols), ncols, 3.8, 3.0)
        for ax in axes.ravel()[n:]:
            ax.set_axis_off()
        # ECDFs rather than KDEs for counts (a KDE of a replicate that is constant has no density; ArviZ fails on it)
        # and for a handful of points (a KDE of a few values shows mostly its kernel, and its bandwidth search costs
        # seconds a figure there)
        discrete = bool(np.all(np.mod(idata.posterior_predictive["x"].values, 1) == 0))
        few = stats.observed_data.sizes["point"] < PPC_KDE_MIN_POINTS
        az.plot_ppc(stats, ax=axes.ravel()[:n], kind="cumulative" if discrete or few else "kde", textsize=9,
                    show=False, legend=True)
        for ax in axes.ravel()[1:n]:  # one legend says it all
            if ax.get_legend() is not None:
                ax.get_legend().remove()
        fig.suptitle(_title(title, f"posterior predictive check, {idata.observed_data.sizes['point']} test points"),
                     fontsize=10)
        return _save(fig, path)


def plot_forest(posteriors: Mapping[str, Any], path: str | Path, title: str = "") -> Path | None:
    """``az.plot_forest`` (94% HDI, combined chain) of the focus of every guide's posterior, one colour per guide
    (``posteriors``: guide spec -> its ``posterior`` group, the same model and points). ``None`` when empty."""
    import arviz as az

    if not posteriors:
        return None
    first = next(iter(posteriors.values()))
    focus = focus_of(first)
    data = [focus.select(p) for p in posteriors.values()]
    n = _count(data[0])
    with _drawing():
        fig, axes = _figure(1, 1, 7.0, max(3.0, 0.25 * n * len(data) + 1.5))
        ax = axes[0, 0]
        labeller = az.labels.mix_labellers((az.labels.DimCoordLabeller, az.labels.NoModelLabeller))()
        az.plot_forest(data, model_names=list(posteriors), combined=True, ax=ax, textsize=9, show=False,
                       labeller=labeller)  # the guides are told by colour, in the legend
        legend = ax.get_legend()
        if legend is not None:  # outside the axes, where it hides no interval
            handles, labels = legend.legend_handles, [t.get_text() for t in legend.get_texts()]
            legend.remove()
            ax.legend(handles, labels, title="guide", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        fig.suptitle(_title(title, "94% HDI of the same latents under each guide"), fontsize=10)
        return _save(fig, path)


def read_posterior(path: str | Path, focus_only: bool = True) -> Any:
    """The ``posterior`` group of a saved InferenceData, loaded into memory (cut to its focus by default, so a
    run's forest holds a few numbers per guide, not every draw)."""
    import xarray as xr

    try:
        with xr.open_dataset(path, group="posterior", engine="h5netcdf") as ds:
            return (focus_of(ds).select(ds) if focus_only else ds).load()
    except (OSError, ValueError, KeyError) as e:  # truncated, not netCDF, no posterior group: one line
        raise ValueError(f"{path}: not a readable InferenceData file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]}); delete it and run the same command again") from None


# ---------------------------------------------------------------------------------------------- one guide


def normal_priors(model: Any, x: Any) -> dict[str, tuple[float, float]]:
    """The local latent sites of ``model`` whose prior is the standard normal, each as ``{name: (0.0, 1.0)}``: read
    from one run of the model on a few points ``x`` (a site drawn from ``Normal(0, 1)``, every entry, whatever
    plates and ``to_event`` wrap it). A site whose prior is another distribution, a learned one (a VAE's mixture or
    VampPrior) or one that depends on other latents is left out (there is no closed form to draw), as is every site
    of a model that cannot be run so."""
    import pyro.distributions as dist
    from pyro import poutine

    try:
        x = model.validate(x, name="data")
        with torch.no_grad(), local_params(model), seeded(0):
            trace = poutine.trace(model).get_trace(x)
    except Exception:  # noqa: BLE001 - a model that cannot run alone: no prior drawn, the figure as before
        return {}
    out = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or not in_data_plate(site):
            continue
        fn = site["fn"]
        while isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
            fn = fn.base_dist
        if type(fn) in (dist.Normal, torch.distributions.Normal) and bool((fn.loc == 0).all()) and \
                bool((fn.scale == 1).all()):
            out[name] = (0.0, 1.0)
    return out


def inspect_fit(model: Any, guide: Any, data: Any, output: str | Path, tag: str, *, num_points: int = 200,
                num_samples: int = 200, seed: int = 0, feature_names: Sequence[str] | None = None,
                title: str = "") -> dict[str, Any]:
    """Everything ``--inspect`` writes for one fitted guide, into ``output``: ``<tag>.nc``, ``<tag>_posterior.png``,
    ``<tag>_ppc.png``, ``<tag>_pair.png``; returns the results-row entry (JSON-small).

    The InferenceData holds ``num_samples`` draws for up to ``num_points`` points of ``data`` chosen by
    :func:`inspection_points` with ``seed`` (which also seeds the draws). The entry: ``netcdf`` (the file name),
    ``focus_points`` (the first :data:`FOCUS_POINTS` inspected indices into ``data``: a local-latent model's
    focus), ``num_points`` (how many were inspected), ``num_samples``,
    ``summary`` (:func:`summary` of the focus), ``pareto_k`` (``pareto_k_mean``/``max``/``frac_above_0.7``
    over the inspected points), ``psis_means`` (:func:`psis_mean_report`), ``figures`` and ``seconds``.
    """
    start = time.perf_counter()
    out = Path(output)
    n = len(data)
    index = inspection_points(num_points, n, num_samples, model.data_dim + model.latent_dim + 4, seed)
    names = list(feature_names) if feature_names is not None and len(feature_names) == model.data_dim else None
    idata = to_inference_data(model, guide, data, num_samples=num_samples, points=index, seed=seed,
                              feature_names=names)
    nc = write_netcdf(idata, out / f"{tag}.nc")
    what = title or tag
    exact = None
    if getattr(model, "has_exact_posterior", False):  # factor analysis: overlay p(z|x) of the inspected points
        with torch.no_grad():
            points = model.validate(data, name="data")[torch.as_tensor(index)]
            exact = model.exact_posterior(points)
    few = model.validate(data, name="data")[torch.as_tensor(index[:2])]  # where the model's prior is read
    figures = [plot_posterior(idata, out / f"{tag}_posterior.png", what, exact=exact, prior=normal_priors(model, few)),
               plot_ppc(idata, out / f"{tag}_ppc.png", what),
               plot_pair(idata, out / f"{tag}_pair.png", what)]
    k = torch.from_numpy(np.asarray(idata.sample_stats["pareto_k"].values, dtype=np.float64))
    return {"netcdf": nc.name, "focus_points": [int(i) for i in index[:FOCUS_POINTS]], "num_points": len(index),
            "num_samples": num_samples, "summary": summary(idata, focus_of(idata.posterior)),
            "pareto_k": pareto_k_summary(k, num_samples), "psis_means": psis_mean_report(idata),
            "figures": [f.name for f in figures], "seconds": time.perf_counter() - start}


__all__ = ["Focus", "focus_of", "inspect_fit", "inspection_points", "netcdf_bytes", "normal_priors", "plot_forest",
           "plot_pair", "plot_posterior", "plot_ppc", "ppc_statistics", "psis_mean_report", "read_posterior",
           "summary", "write_netcdf"]
