"""Writing results: ``results.json`` (machine-readable), ``results.md`` (a table), and figures."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

#: (key in a row's "test" dict, column title); a column shows when some row has a value for it, "—" where a row has none
COLUMNS: list[tuple[str, str]] = [
    ("elbo", "ELBO"),
    ("iwae", "IWAE-K"),
    ("exact_log_likelihood", "exact log p(x)"),
    ("gap_elbo", "gap exact−ELBO"),
    ("gap_iwae", "gap exact−IWAE"),
    ("analytic_mean_field_gap", "analytic MF gap"),
    ("log_lik_at_point_estimate", "log p(x|θ̂)"),
    ("predictive_log_likelihood", "log E_q(θ) p(x|θ)"),
    ("expected_log_likelihood", "E_q(θ) log p(x|θ)"),
    ("assignment_gap", "assignment gap ELBO"),
    ("assignment_gap_iwae", "assignment gap IWAE"),
    ("pareto_k_theta", "k̂ q(θ) train"),
    ("ess_theta", "ESS q(θ) train"),
    ("kl_theta_lower_bound", "KL(q(θ)‖p(θ|x))/N ≥"),
    ("reconstruction", "E log p(x|z)"),
    ("kl", "KL"),
    ("active_units", "active units"),
    ("pareto_k_mean", "mean k̂"),
    ("pareto_k_frac_above_0.7", "k̂ > 0.7"),
]

#: key -> a sentence printed under any table that shows that key's column: what a column measures where its title
#: cannot say it all
COLUMN_NOTES: dict[str, str] = {
    "log_lik_at_point_estimate": (
        "log p(x|θ̂): the likelihood at a point estimate of the global latents θ (the guide's; EM's for the EM row), "
        "a plug-in score, not the model's log p(x); log E_q(θ) p(x|θ) = log (1/S) Σ_s p(x|θ_s), θ_s ~ q(θ), is "
        "the posterior predictive under q(θ), E_q(θ) log p(x|θ) its Jensen lower bound (all three equal for a "
        "point-mass q(θ))."),
    "assignment_gap": (
        "ELBO and IWAE-K bound log p(x|θ) over the assignments c and are averaged over θ ~ q(θ), so their "
        "target is E_q(θ) log p(x|θ): the assignment gaps are that minus each, the gap q(c|x) leaves (0 when c is "
        "summed out or enumerated)."),
    "pareto_k_theta": (
        "k̂ q(θ), ESS q(θ) and KL/N ≥ are diagnostics of q(θ) against p(θ | x_train), on the training split: PSIS "
        "over log w_s = log p(θ_s, x_train) − log q(θ_s) for S draws θ_s ~ q(θ) (S in results.json; k̂ > 0.7: "
        "q(θ) misses posterior mass; ESS: the draws' worth, of S); KL/N ≥ = (IWAE-S − ELBO) of those weights per "
        "training point, a lower bound on the gap KL(q(θ) ‖ p(θ|x_train)) that q(θ) leaves against "
        "log p(x_train) (tight only where k̂ is small). — for a point-mass q(θ), which has no density."),
}


def _fmt(v: Any) -> str:
    """A table cell: 3 decimals for reals; "—" for a missing value or NaN. A value that rounds to zero prints
    0.000, never −0.000 (an exact −0.0 or a tiny negative gap is no sign of anything)."""
    if v is None:
        return "—"
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):  # float, NumPy floats
        if math.isnan(v):
            return "—"
        text = f"{float(v):.3f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text
    return str(v)


def _cell(text: str) -> str:
    """A Markdown table cell: a bare "|" (as in p(x|z)) would end the cell."""
    return text.replace("|", "\\|")


def payload(experiment: str, dataset: str, config: dict[str, Any], data: dict[str, int],
            results: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``results.json`` document every experiment writes (values: mean nats per test point)."""
    return {"experiment": experiment, "dataset": dataset, "config": config, "data": data, "results": results,
            "baselines": baselines}


#: the columns a terminal shows first (:func:`results_table` with ``brief``): the bounds, and the number they bound
#: where there is one (the exact log p(x), else the plug-in log p(x|θ̂)), and how far to trust each row
BRIEF_COLUMNS = ("elbo", "iwae", "exact_log_likelihood", "log_lik_at_point_estimate", "pareto_k_mean")
BRIEF_WIDTH = 4


def results_table(payload: Mapping[str, Any], *, brief: bool = False) -> str:
    """A Markdown table of every result and baseline row (mean nats per test point). ``brief``: the few columns
    a newcomer reads first (:data:`BRIEF_COLUMNS`, at most :data:`BRIEF_WIDTH`); the rest stay in results.md and
    results.json, and the table says so."""
    rows = [(r["guide"], r["test"], r.get("train_seconds")) for r in payload.get("results", [])]
    rows += [(b["name"], b["test"], b.get("train_seconds")) for b in payload.get("baselines", [])]
    used = [(k, t) for k, t in COLUMNS if any(test.get(k) is not None for _, test, _ in rows)]
    hidden = 0
    if brief:
        lead = [k for k in BRIEF_COLUMNS if k in dict(used)][:BRIEF_WIDTH]
        hidden = len(used) - len(lead)
        used = [(k, t) for k, t in used if k in lead]
    head = ["guide"] + [t for _, t in used] + ["train s"]
    lines = ["| " + " | ".join(map(_cell, head)) + " |", "|" + "---|" * len(head)]
    for name, test, secs in rows:
        cells = [name] + [_fmt(test.get(k)) for k, _ in used] + [_fmt(secs)]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    k = next((test.get("iwae_k") for _, test, _ in rows if test.get("iwae_k")), None)
    title = f"{payload.get('experiment', '')} on {payload.get('dataset', '')}"
    note = "Mean nats per test point" + (f"; IWAE-K with K = {k}." if k else ".")
    notes = [note] + [COLUMN_NOTES[key] for key, _ in used if key in COLUMN_NOTES and not brief]
    if hidden:
        notes[0] += f" {hidden} more columns in results.md and results.json."
    return f"### {title}\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def current_umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux's /proc); elsewhere by setting and
    restoring it, a brief process-wide change."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


#: errors of a write that failed for want of room (disk full, quota, file size limit) or of the disk itself
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large for this file system or limit", errno.EIO: "input/output error"}


class WriteError(OSError, ValueError):
    """A file could not be written: the disk is full (or a quota or size limit is reached, or the disk failed).
    Nothing half-written is left: the temporary file is removed and any earlier file stays as it was. An ``OSError``
    (its ``errno`` kept), and a ``ValueError`` so that the command line reports it as one ``error:`` line, exit 2."""

    def __init__(self, path: Path, errno_: int | None, what: str) -> None:
        super().__init__(what)
        self.errno, self.path = errno_, path
        try:
            free = f", {shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = ""
        self.message = (f"could not write {path.name}: {what} ({path}{free}); free disk space, or write to another "
                        "disk (--output), then run the same command again")

    def __str__(self) -> str:
        return self.message


def _stop_signal(e: BaseException) -> BaseException | None:
    """The ``KeyboardInterrupt`` (or SIGTERM's ``BaseException``, or ``SystemExit``) behind ``e``, if a stop arrived
    while a library wrote: torch's writer turns an exception raised inside its ``write`` callback into
    ``RuntimeError: [enforce fail ...] unexpected pos``, chaining the original as its context. That is a stop, not a
    failed write, and must stop the run as a stop does."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if not isinstance(x, Exception):
            return x
        x = x.__cause__ or x.__context__
    return None


def _write_failure(e: BaseException) -> tuple[int | None, str] | None:
    """(errno, what) when ``e`` is a failed write: an ``OSError`` with a disk-full errno, or a library's wrapper of
    one (torch's ``RuntimeError: [enforce fail at inline_container.cc] ... file write failed`` / ``unexpected pos``,
    which chains the ``OSError`` of the Python file it wrote to; h5py's ``file write failed ... errno = 28``)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _WRITE_ERRNOS:
            return x.errno, _WRITE_ERRNOS[x.errno]
        m = re.search(r"errno = (\d+)", str(x))
        if m and int(m.group(1)) in _WRITE_ERRNOS:
            return int(m.group(1)), _WRITE_ERRNOS[int(m.group(1))]
        x = x.__cause__ or x.__context__
    text = str(e)
    if isinstance(e, RuntimeError) and ("file write failed" in text or
                                        ("enforce fail" in text and "unexpected pos" in text)):
        return None, "the write failed part way (" + " ".join(text.split())[:160] + ")"
    return None


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (``.<name>.*.tmp``) to write to; on leaving the block it is fsynced, given
    the mode a plain ``open()`` would give, and renamed into place: a reader (or a crash, or ``kill -9``) sees the
    old file or the new one, never half of one. On an error the temporary file is removed. For writers that need
    a path rather than an open file (ArviZ's ``to_netcdf``, matplotlib's ``savefig``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # no room even for an empty file (inodes, quota)
        failed = _write_failure(e)
        if failed is None:
            raise
        raise WriteError(path, *failed) from e
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        stop = _stop_signal(e)
        if stop is not None and stop is not e:
            raise stop from None  # Ctrl-C or SIGTERM during the write: the run stops as it would anywhere else
        failed = None if isinstance(e, WriteError) else _write_failure(e)
        if failed is None:
            raise
        raise WriteError(path, *failed) from e


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place (:func:`atomic_target`)."""
    with atomic_target(path) as tmp, open(tmp, "wb" if binary else "w") as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def write_results(output: str | Path, payload: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``results.json`` and ``results.md`` into ``output`` (each atomically); returns their paths."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    text = json.dumps(_finite(payload), indent=2, default=_jsonable, allow_nan=False)
    atomic_write_text(paths["json"], text + "\n")
    atomic_write_text(paths["markdown"], results_table(payload))
    return paths


def new_figure(*, figsize: tuple[float, float], ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib ``Figure`` and its axes, made without pyplot: no backend is chosen or switched, so
    the caller's (a notebook's inline backend, say) is left as it is. Save with ``fig.savefig``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def _finite(v: Any) -> Any:
    """Strict JSON has no NaN or infinity: such floats become the strings "nan", "inf", "-inf" (e.g. the Pareto
    k̂ of exactly constant importance weights is -inf), so every JSON reader can load results.json."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Mapping):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, tuple | set):
        return list(v)
    return str(v)


def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                         title: str = "training curves") -> Path:
    """Per-point training loss (−ELBO) and validation ELBO per epoch, one line per guide."""
    fig, axes = new_figure(figsize=(11, 4), ncols=2)
    for name, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        axes[0].plot(epochs, [-h["train_loss"] for h in hist], label=name)
        key = next((k for k in ("valid_elbo", "valid_iwae") if any(k in h for h in hist)), None)
        val = [(h["epoch"], h[key]) for h in hist if key in h] if key else []
        if val:  # an IWAE-trained guide is validated on IWAE-K: its line says so
            axes[1].plot(*zip(*val, strict=True), label=name + (" (IWAE-K)" if key == "valid_iwae" else ""))
    axes[0].set(xlabel="epoch", ylabel="−training loss (nats / point)", title="training objective (ELBO or IWAE-K)")
    axes[1].set(xlabel="epoch", ylabel="valid bound (nats / point)", title="validation ELBO (or IWAE-K)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
            lo = min(min(line.get_ydata()[len(line.get_ydata()) // 10:], default=0) for line in ax.lines)
            hi = max(max(line.get_ydata(), default=0) for line in ax.lines)
            if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
                ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
